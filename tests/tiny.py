"""Tiny models and tokenizers built offline, shared by the tests."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

WORDS = (
    "the answer is a b c d e f g h cat dog sat on mat + - = . , ? what plus minus times then so we get add "
    "take it is number first next question solve result"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary plus the digits 0-99, with pad/eos/bos and a chat template."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    # "is" is listed twice in WORDS and keeps its later id, so the largest id ("99") equals len(tokenizer). The tests'
    # numbers were measured with these ids; a test whose text may contain "99" sizes its vocabulary by the largest
    # id (tests/test_examples.py).
    vocab = {token: i for i, token in enumerate(special + WORDS + [str(n) for n in range(100)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_llama_config(tokenizer, hidden_size=32, layers=2, initializer_range=0.02) -> LlamaConfig:
    """A 2-layer Llama. With the default init its tied LM head can barely move the logits (|logit| < 1); tests that
    must learn to emit a token quickly pass a larger `initializer_range` (e.g. 0.2)."""
    return LlamaConfig(
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
        tie_word_embeddings=True,
    )


def tiny_qwen2_config(tokenizer, hidden_size=32, layers=2, initializer_range=0.02) -> Qwen2Config:
    return Qwen2Config(
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
        tie_word_embeddings=False,
    )
