"""Tiny models and tokenizers built offline, in seconds: the builders of the package's tests and of the benchmarks'
`--tiny` smoke runs, and for your own tests of code that uses trl_ladi (as `transformers.testing_utils` is for
transformers).

    from trl_ladi.testing import make_tokenizer, tiny_ladir_model

    tokenizer = make_tokenizer()
    model = tiny_ladir_model(tokenizer, latent_tokens_per_block=3, latent_dim=8, max_blocks=2)
"""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from trl_ladi import LaDiRModel

WORDS = (
    "the answer is a b c d e f g h cat dog sat on mat + - = . , ? what plus minus times then so we get add "
    "take it number first next question solve result"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
FAMILIES = ("llama", "qwen2")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary plus the digits 0-99, with pad/eos/bos and a chat template.

    Ids run from 0 to `len(tokenizer) - 1` without gaps, so `vocab_size=len(tokenizer)` covers every token."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tokens = special + WORDS + [str(n) for n in range(100)]
    assert len(set(tokens)) == len(tokens), "a token listed twice would leave a gap in the ids"
    tokenizer = Tokenizer(models.WordLevel(vocab={token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(tokenizer, family="llama", hidden_size=32, layers=2, initializer_range=0.02):
    """A 2-layer Llama (tied LM head) or Qwen2 (untied) config. With the default init the tied head can barely move
    the logits (|logit| < 1); tests that must learn to emit a token quickly pass a larger `initializer_range` (0.2)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    config_class = LlamaConfig if family == "llama" else Qwen2Config
    return config_class(
        initializer_range=initializer_range,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=family == "llama",
    )


def tiny_causal_lm(tokenizer, family="llama", seed=0, **config_options):
    """A randomly initialised tiny causal LM (`torch.manual_seed(seed)` first, unless `seed` is None)."""
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(tokenizer, family, **config_options))


def tiny_ladir_model(tokenizer=None, family="llama", seed=0, language_model=None, config_options=None, **ladir_options):
    """A LaDiR model around `language_model`, or around a fresh `tiny_causal_lm(tokenizer, family, seed)`.

    `ladir_options` go to `LaDiRModel.from_base` (latent sizes, ranks, ...); `config_options` to `tiny_config`.
    Everything else a test needs (randomised heads, a pre-trained base) it does itself, after this call."""
    if language_model is None:
        language_model = tiny_causal_lm(tokenizer, family, seed, **(config_options or {}))
    elif seed is not None:
        torch.manual_seed(seed)
    return LaDiRModel.from_base(language_model, **ladir_options)


def spread_latent_codebook(model: LaDiRModel, spacing: float = 2.0) -> LaDiRModel:
    """Set a token-aligned model's `latent_scaling_factor` so that the median distance from a codebook row to its
    nearest neighbour is ``spacing``. A tiny model's rows sit ~0.02 apart, so every noise level hides which token a
    slot holds; SmolLM2-135M's chain_sum tokens sit 2-3 apart at unit latent scale."""
    codebook = model.latent_codebook().float()
    nearest = torch.cdist(codebook, codebook).topk(2, largest=False).values[:, 1].median().item()
    model.config.latent_scaling_factor *= spacing / nearest
    return model
