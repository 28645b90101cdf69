"""`LaDiRConfig` and `LaDiRModel`: one causal LM that encodes, denoises and decodes latent reasoning blocks.

One base LM is shared by every role, so a large model is held in memory once:

* VAE encoder: the LM with the ``"encoder"`` LoRA adapter reads a reasoning sentence followed by ``L`` learned query
  tokens; linear heads on the query positions give ``mu, logvar`` of ``L`` latent tokens of size ``D``.
* VAE decoder: the LM with adapters off (or with its own ``"vae_decoder"`` adapter, when the config gives it a
  rank) reads ``latent_in(z), <ae>`` and reconstructs the sentence.
* Token-aligned latents (``token_aligned_latents=True``): instead of query tokens, latent token ``j`` of a block
  belongs to the sentence's ``j``-th token: ``mu_j = token_projection(e_j) + mean_head(h_j)``, a fixed-size slot
  for every token (empty slots read a learned vector), so a block holds the sentence's tokens, compressed to ``D``
  numbers each, plus what the encoder adds from their context.
* Reasoner (the diffusion policy) and answer decoder: the LM with the ``"reasoner"`` adapter reads

      prompt, [<bot>, t-embed, z_1..z_L, <eot>] x blocks, <soa>, answer tokens

  Attention is causal across blocks and bidirectional inside a block (``<eot>`` sees its whole block). The block
  being denoised is ``<bot>, t-embed, z_t,1..z_t,L``; an adaLN head maps its hidden states to the velocity (or, with
  ``velocity_parameterization="token_readout"``, the LM's token head predicts each slot's token and the velocity
  follows from the expected codebook latent). A stop head at each ``<eot>`` says "another block" (0) or "start the
  answer" (1).

Two ways to run the reasoner give the same numbers (tested):
* ``_packed_forward``: one forward over whole traces, used for training. Noisy copies of a block sit at the block's
  positions and see only what that block saw, so many denoising steps are scored in one pass.
* the cached step methods, used for sampling (the loop is in ``trl_ladi/pipeline.py``): ``prefill`` reads the
  prompt into a key/value cache, ``denoising_velocity`` feeds only the ``L + 2`` tokens of the block being denoised
  and cuts the cache back, ``append_block`` adds a finished block and returns its stop logits, ``answer_step``
  feeds one answer position. ``BlockLayout`` says where each token of a block sits, for both.
"""

import contextlib
import copy
import math
import os
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    StaticCache,
)
from transformers.cache_utils import StaticLayer

from trl_ladi import sampling
from trl_ladi.default_model import base_model_hub_id

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENCODER_ADAPTER, REASONER_ADAPTER, DENOISER_ADAPTER, VAE_DECODER_ADAPTER = "encoder", "reasoner", "denoiser", "vae_decoder"
CONTINUE, ANSWER = 0, 1  # stop-head classes
REASONER_MARKERS = {"bot": 0, "eot": 1, "soa": 2}  # rows of `marker_embeddings`
VELOCITY_PARAMETERIZATIONS = ("direct", "token_readout", "token_posterior")
STATIC_SHAPE_MULTIPLE = 64  # a static-cache pass rounds its prompt width and cache length up to a multiple of this


class LaDiRConfig(PretrainedConfig):
    r"""Configuration of a [`LaDiRModel`].

    Args:
        text_config (`dict` or `PretrainedConfig`): config of the base causal LM (Llama, Qwen2, Qwen3, Mistral).
        latent_tokens_per_block (`int`, defaults to 4): latent tokens ``L`` per reasoning block (one sentence).
        latent_dim (`int`, defaults to 128): size ``D`` of one latent token.
        max_blocks (`int`, defaults to 6): most latent blocks the reasoner writes before it must answer.
        encoder_lora_rank (`int`, defaults to 64): LoRA rank of the VAE encoder adapter.
        reasoner_lora_rank (`int`, defaults to 64): LoRA rank of the reasoner adapter.
        denoiser_lora_rank (`int`, defaults to 0): LoRA rank of the denoiser adapter, which acts on top of the reasoner
            adapter at the positions of blocks being denoised only (0: no such adapter). RL adds it
            (`LaDiRLConfig.latent_policy_parameters="denoiser_adapter"`): it changes the velocity field and nothing the
            answer decoder or the stop head reads, since a noisy block is context for no other position.
        vae_decoder_lora_rank (`int`, defaults to 0): LoRA rank of the VAE decoder's own adapter, trained in the VAE
            stage and used only to turn latents into text (0: the frozen base LM decodes, as in LaDiR). The reasoner
            never runs it. At 135M a frozen decoder does not learn to read latents back exactly in a CPU budget; with
            this adapter it reads exact token embeddings back in 10 steps (docs/sft.md).
        token_aligned_latents (`bool`, defaults to `False`): latent token ``j`` of a block encodes the sentence's
            ``j``-th token (see the module docstring); sentences are cut to ``latent_tokens_per_block`` tokens, so
            make that the longest sentence's length. The first VAE stage starts ``token_projection`` and
            ``vae_latent_in`` as the top principal components of its sentences' token embeddings and their transpose
            (`init_token_aligned_maps`), so the latents carry each token from the first step; at its end it fits
            ``reasoner_latent_in`` by least squares to map each scaled latent slot to the embedding the encoder read
            there, so the reasoner starts by reading a latent block as its sentence's tokens.
        lora_alpha_ratio (`float`, defaults to 2.0): LoRA alpha as a multiple of the rank.
        lora_target_modules (`list[str]`): linear layers of the base LM that get adapters.
        timestep_embedding_dim (`int`, defaults to 256): sinusoidal features of the diffusion time.
        latent_scaling_factor (`float`, defaults to 1.0): reasoner latents are ``scaling_factor * mu``, so that they
            have about unit variance (set after the VAE stage from the data, as Stable Diffusion's VAE factor).
        num_denoise_steps (`int`, defaults to 10): default sampler steps per block.
        timestep_shift (`float`, defaults to 1.0): shift of the flow-matching schedule (diffusers' meaning).
        initial_noise_scale (`float`, defaults to 2.0): std of the noise a block starts from (LaDiR: 2.0).
        sde_max_t (`float`, defaults to `sampling.SDE_MAX_T` = 0.9): cap on ``t`` inside the SDE noise level
            ``sqrt(t / (1 - t))``.
        initial_latent_logvar (`float`, *optional*): the VAE posterior's log-variance at initialisation (its head
            starts as this constant); ``None`` (default) keeps torch's init. With torch's init the posterior std of
            SmolLM2-135M starts near 1.3 while the encoder's means differ between sentences by ~0.3, so the sampled
            latent carries little and the decoder learns to read it slowly; with -4 (std 0.14) the VAE overfits 8
            sentences in 100 steps (token accuracy 1.0, against 0.82 with torch's init; docs/sft.md).
        velocity_parameterization (`str`, defaults to `"direct"`): how the denoiser's velocity is read from the LM.
            `"direct"`: the adaLN head maps the hidden states of the noisy latent tokens to the velocity (LaDiR).
            `"token_readout"` (needs `token_aligned_latents`): the LM's own token head predicts which token fills
            each slot (read one position earlier, where a causal LM predicts the next token); the clean latent
            estimate is the expected codebook latent of that prediction (`latent_codebook`) plus the adaLN head's
            correction (zero at first), and ``v = (z_t - z_0_estimate) / t``, the velocity that estimate implies.
            The reasoner stage then trains the estimate (x0 loss) and each slot's token (cross-entropy) instead of
            the velocity, so the denoiser starts from the pretrained LM's next-token knowledge (cf. CDCD, Dieleman
            et al. 2022).
            `"token_posterior"` (needs `token_aligned_latents`): the exact denoiser of a codebook prior, nothing to
            learn but the LM. Each slot's clean latent is one token's codebook latent; the LM's token head reads slot
            ``j``'s prior ``p(v | slots < j)`` from the clean slots before it (a noisy block attends causally, at time
            0), and Bayes' rule with the Gaussian noise gives the posterior mean
            (`sampling.codebook_posterior_mean`, noise std `initial_noise_scale`). The sampler denoises a block's slots
            one after another, each in `num_denoise_steps` steps; the reasoner stage is the slot tokens'
            cross-entropy from clean prefixes (teacher forcing, as text SFT), plus the answer and stop losses; RL
            trains the LM through the prior (`LaDiRLConfig.latent_policy_parameters="denoiser_adapter"` or
            `"reasoner"`). Measured on SmolLM2-135M, `chain_sum`, at text SFT's 300 s CPU budget: sampled latents
            answer 21-36% of held-out problems at pass@1 (two runs; text SFT in the same run: 43%; docs/sft.md).
        token_readout_temperature (`float`, defaults to 1.0): temperature of the slot predictions in the token-readout
            estimate, ``softmax(logits / temperature)``, in sampling and in every loss alike. 1.0 is the posterior
            mean that the flow's ODE assumes; below 1 sharpens the estimate towards the most likely token, as
            Diffusion-LM's clamping does, which helps when a block is denoised in a few steps.
        causal_denoiser (`bool`, defaults to `False`, needs `"token_readout"`): a block being denoised attends
            causally, as the LM reads text, instead of bidirectionally (LaDiR), and each readout position also gets the
            noisy latent of the slot it predicts, through `denoiser_lookahead` (a linear map, zero at first). So at
            first the readout of slot ``j`` is the pretrained LM's next token after the slots before it, which the
            future slots' noise cannot disturb (measured on SmolLM2-135M: result digits 43% right from a clean prefix,
            against 18% when the prefix attends to noise; docs/sft.md).
        stop_token_id (`int`, *optional*): how the reasoner decides to stop writing blocks and answer. ``None``
            (default): a new linear stop head reads each block's ``<eot>`` (LaDiR). A token id, the first token of the
            answer (``tokenizer.convert_tokens_to_ids("####")`` for ``"#### {answer}"``): the LM's own token head at
            ``<eot>`` predicts what is written next, as a text model does at the end of a line: the answer's first
            token (stop) or, with token-aligned latents, the next sentence's first token (its training target);
            ``p(stop)`` is that token's probability. No new weights. Measured on SmolLM2-135M, `chain_sum`, at
            benchmarks/ladir_quality.py's 300 s recipe (docs/sft.md): with the linear head, two of four training
            seeds ended the reasoner stage with the stop loss at 0.06-0.12, near what the block index alone gives
            (0.27); with the token head the same two ended at 0.011 and 0.0001.
        base_model_name_or_path (`str`, *optional*): the base LM's Hub id, when known (`from_base` records it). A local
            folder is never recorded: the config is what `push_to_hub` uploads, and a path of the machine that trained
            the model means nothing elsewhere (see `trl_ladi.default_model.base_model_hub_id`).
    """

    model_type = "ladir"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        latent_tokens_per_block: int = 4,
        latent_dim: int = 128,
        max_blocks: int = 6,
        encoder_lora_rank: int = 64,
        reasoner_lora_rank: int = 64,
        denoiser_lora_rank: int = 0,
        vae_decoder_lora_rank: int = 0,
        token_aligned_latents: bool = False,
        lora_alpha_ratio: float = 2.0,
        lora_target_modules: list[str] | None = None,
        timestep_embedding_dim: int = 256,
        latent_scaling_factor: float = 1.0,
        num_denoise_steps: int = 10,
        timestep_shift: float = 1.0,
        initial_noise_scale: float = 2.0,
        sde_max_t: float = sampling.SDE_MAX_T,
        initial_latent_logvar: float | None = None,
        velocity_parameterization: str = "direct",
        token_readout_temperature: float = 1.0,
        causal_denoiser: bool = False,
        stop_token_id: int | None = None,
        base_model_name_or_path: str | None = None,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.latent_tokens_per_block = latent_tokens_per_block
        self.latent_dim = latent_dim
        self.max_blocks = max_blocks
        self.encoder_lora_rank = encoder_lora_rank
        self.reasoner_lora_rank = reasoner_lora_rank
        self.denoiser_lora_rank = denoiser_lora_rank
        self.vae_decoder_lora_rank = vae_decoder_lora_rank
        self.token_aligned_latents = token_aligned_latents
        self.lora_alpha_ratio = lora_alpha_ratio
        self.lora_target_modules = list(lora_target_modules or DEFAULT_LORA_TARGETS)
        self.timestep_embedding_dim = timestep_embedding_dim
        self.latent_scaling_factor = latent_scaling_factor
        self.num_denoise_steps = num_denoise_steps
        self.timestep_shift = timestep_shift
        self.initial_noise_scale = initial_noise_scale
        self.sde_max_t = sde_max_t
        self.initial_latent_logvar = initial_latent_logvar
        self.velocity_parameterization = velocity_parameterization
        self.token_readout_temperature = token_readout_temperature
        self.causal_denoiser = causal_denoiser
        self.stop_token_id = stop_token_id
        self.base_model_name_or_path = base_model_hub_id(base_model_name_or_path)
        if text_config is not None:  # the sub-config keeps where it was loaded from too: the same rule
            text_config.name_or_path = base_model_hub_id(text_config.name_or_path) or ""
        super().__init__(**kwargs)
        self.validate()

    def validate(self):
        if self.text_config is None:
            return  # an empty config, as transformers builds for introspection
        if self.text_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Base model type '{self.text_config.model_type}' is not supported; LaDiRModel supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoders that take `inputs_embeds`, 4D float attention masks "
                "and a DynamicCache). Use a base model of one of these families."
            )
        for name in ("latent_tokens_per_block", "latent_dim", "max_blocks", "num_denoise_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.denoiser_lora_rank < 0:
            raise ValueError(f"`denoiser_lora_rank` must be >= 0 (0: no denoiser adapter), got {self.denoiser_lora_rank}.")
        if self.vae_decoder_lora_rank < 0:
            raise ValueError(
                f"`vae_decoder_lora_rank` must be >= 0 (0: the frozen base LM decodes), got {self.vae_decoder_lora_rank}."
            )
        if self.latent_dim > self.text_config.hidden_size * 4:
            raise ValueError(
                f"latent_dim={self.latent_dim} is more than 4x the base model's hidden size "
                f"({self.text_config.hidden_size}); a latent token would carry more numbers than the LM can read. "
                "Use a smaller latent_dim (LaDiR: 128)."
            )
        if self.timestep_embedding_dim % 2:
            raise ValueError(f"timestep_embedding_dim must be even, got {self.timestep_embedding_dim}.")
        if not 0 < self.sde_max_t < 1:
            raise ValueError(f"sde_max_t must be in (0, 1), got {self.sde_max_t}.")
        if self.velocity_parameterization not in VELOCITY_PARAMETERIZATIONS:
            raise ValueError(
                f"velocity_parameterization must be one of {VELOCITY_PARAMETERIZATIONS}, got "
                f"'{self.velocity_parameterization}'."
            )
        if self.token_readout_temperature <= 0:
            raise ValueError(f"token_readout_temperature must be > 0, got {self.token_readout_temperature}.")
        if self.velocity_parameterization == "token_readout" and not self.token_aligned_latents:
            raise ValueError(
                "velocity_parameterization='token_readout' reads each latent slot as a token, which needs "
                "token_aligned_latents=True; set it, or use velocity_parameterization='direct'."
            )
        if self.velocity_parameterization == "token_posterior" and not self.token_aligned_latents:
            raise ValueError(
                "velocity_parameterization='token_posterior' puts one token's codebook latent in each slot, which needs "
                "token_aligned_latents=True; set it, or use velocity_parameterization='direct'."
            )
        if self.causal_denoiser and self.velocity_parameterization != "token_readout":
            raise ValueError(
                "causal_denoiser=True reads each slot one position earlier, which is the token-readout velocity: set "
                "velocity_parameterization='token_readout' (and token_aligned_latents=True), or causal_denoiser=False "
                "(a 'token_posterior' denoiser attends causally already)."
            )
        vocab_size = getattr(self.text_config, "vocab_size", None)
        if self.stop_token_id is not None and not 0 <= self.stop_token_id < (vocab_size or self.stop_token_id + 1):
            raise ValueError(
                f"stop_token_id must be a token id of the base LM (0 to {vocab_size - 1}), got {self.stop_token_id}: "
                "pass the answer's first token, e.g. tokenizer.convert_tokens_to_ids('####'), or None for a stop head."
            )


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(name_or_path) -> None:
    """Refuse a local model folder without weights, or whose weights exist only as pickle files.

    Unpickling can run code that the file carries, so trl_ladi loads safetensors only (and never `trust_remote_code`).
    Hub ids are passed on with `use_safetensors=True`, which makes transformers fetch nothing else.
    """
    path = os.fspath(name_or_path)
    if not os.path.isdir(path):
        return
    files = os.listdir(path)
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if name.endswith(PICKLE_WEIGHT_SUFFIXES))
    if not pickles:
        raise FileNotFoundError(
            f"The model folder {path} has no weights (no .safetensors file): a save that did not finish, or a file "
            "that was moved. Save the model again with `model.save_pretrained(folder)`, or load a complete folder (each "
            "checkpoint-N folder of a run holds its own model.safetensors)."
        )
    raise ValueError(
        f"The model folder {path} has only pickle weights ({', '.join(pickles)}) and no .safetensors file. "
        "trl_ladi loads safetensors only: unpickling a file can run code it carries. If you trust the file, convert "
        "it once: `model = AutoModelForCausalLM.from_pretrained(folder)` then `model.save_pretrained(new_folder)` "
        "(transformers writes safetensors)."
    )



def load_causal_lm(name_or_path, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` with trl_ladi's loading rule: safetensors only (`require_safetensors`)."""
    require_safetensors(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name_or_path, use_safetensors=True, **kwargs)

@dataclass(frozen=True)
class BlockLayout:
    """Where the tokens of a latent block sit: ``<bot>, t-embed, z_1..z_L, <eot>``, ``L + 3`` positions.

    A block being denoised is the first ``L + 2`` of them (no ``<eot>``: nothing reads a noisy block, and the stop
    decision is taken on the finished one). Block ``b`` of a row whose prompt has ``P`` real tokens starts at position
    ``P + b (L + 3)``; the answer starts where one more block would. The packed training forward and the cached step
    methods both place tokens through this class.
    """

    num_latent_tokens: int

    @property
    def width(self) -> int:
        """Tokens of a finished block."""
        return self.num_latent_tokens + 3

    @property
    def noisy_width(self) -> int:
        """Tokens of a block being denoised: ``<bot>, t-embed, z_t``."""
        return self.num_latent_tokens + 2

    @property
    def latent_tokens(self) -> slice:
        """The latent tokens inside a block (where the velocity head reads)."""
        return slice(2, 2 + self.num_latent_tokens)

    @property
    def readout_tokens(self) -> slice:
        """Where a token-readout velocity predicts each slot's token: one position before the slot (``t-embed`` for
        the first), where a causal LM predicts the next token."""
        return slice(1, 1 + self.num_latent_tokens)

    @property
    def eot(self) -> int:
        """Offset of ``<eot>`` (where the stop head reads)."""
        return self.num_latent_tokens + 2

    def position_ids(self, prompt_lengths: torch.Tensor, blocks, width: int) -> torch.Tensor:
        """Position ids of the first ``width`` tokens of blocks ``blocks`` (an int, or ``(R, n)`` indices) of rows
        with ``prompt_lengths`` ``(R, 1)`` real prompt tokens, flattened to ``(R, n * width)``."""
        starts = prompt_lengths + blocks * self.width  # (R, n)
        return (starts[:, :, None] + torch.arange(width, device=prompt_lengths.device)).flatten(1)


@dataclass
class ReasonerContext:
    """What the reasoner has read so far in a cached pass: the key/value cache and what each cached key is.

    Made by :meth:`LaDiRModel.prefill` and advanced by the step methods, in this order: denoising steps and
    finished blocks, then answer positions. Every row holds the same number of cached positions: a row that has
    stopped gets each later block as positions that ``key_is_real`` masks out (zeros: the sampler feeds only the
    other rows, through :meth:`select_rows` and :meth:`append_from`).

    With ``static_length`` set (``prefill(..., static_cache_length=...)``) the cache is a transformers ``StaticCache``
    of that many positions per row: every forward writes in place and attends over all of them (the unwritten ones
    masked), so a step has the same shapes and memory addresses every time it runs, which a compiled decoder
    (``torch.compile``, CUDA graphs) needs to replay it. Such a context keeps every row in the batch (no
    :meth:`select_rows`).
    """

    cache: DynamicCache | StaticCache
    key_is_real: torch.Tensor  # (R, S): may be attended to (not left padding, not a block after the row stopped)
    key_is_prompt: torch.Tensor  # (R, S): a prompt position (hidden from the unconditional velocity of CFG)
    prompt_lengths: torch.Tensor  # (R, 1): real prompt tokens per row
    num_real_blocks: torch.Tensor  # (R,): blocks appended while the row had not stopped
    num_blocks: int = 0  # blocks appended, the same for every row
    num_answer_tokens: int = 0  # answer positions fed (``<soa>`` included)
    latent_codebook: torch.Tensor | None = None  # the token-readout velocity's codebook, computed once per pass
    num_lm_tokens: int = 0  # positions fed to the LM so far, over all rows (shows the cache at work)
    num_open_slot_positions: int = 0  # token posterior: positions of the block being written, cut off when it ends
    static_length: int | None = None  # positions per row of a StaticCache; None: a DynamicCache that grows

    @property
    def rows(self) -> int:
        return self.key_is_real.shape[0]

    def repeat_interleave(self, repeats: int, into: StaticCache | None = None):
        """Repeat every row ``repeats`` times (consecutively), cache included: the ``M`` answers of a latent are
        decoded from one computation of its prefix. A static-cache context is copied ``into`` an empty StaticCache
        of ``rows x repeats`` rows and as many positions."""
        if self.static_length is None:
            self.cache.batch_repeat_interleave(repeats)
        elif repeats > 1:  # StaticCache has no batch_repeat_interleave: the positions written go into `into`
            if into is None or into.get_max_length() != self.static_length:
                raise ValueError(
                    f"A static-cache context is repeated into another StaticCache of {self.static_length} positions "
                    "per row: pass `into` (LaDiRModel.reusable_static_cache)."
                )
            written = self.key_is_real.shape[1]  # positions written so far, the same in every layer
            for layer, target in zip(self.cache.layers, into.layers):
                target.update(
                    layer.keys[..., :written, :].repeat_interleave(repeats, dim=0),
                    layer.values[..., :written, :].repeat_interleave(repeats, dim=0),
                )
            self.cache = into
        for name in ("key_is_real", "key_is_prompt", "prompt_lengths", "num_real_blocks"):
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def select_rows(self, rows: torch.Tensor) -> "ReasonerContext":
        """A copy of the context holding only ``rows`` (indices), cache included: the sampler feeds the rows still
        writing blocks, not those whose stop head chose the answer. :meth:`append_from` brings the block back."""
        if self.static_length is not None:
            raise ValueError("A static-cache context keeps every row (its shapes must not change): mask rows instead.")
        cache = copy.deepcopy(self.cache)
        cache.batch_select_indices(rows)
        return ReasonerContext(
            cache=cache,
            key_is_real=self.key_is_real[rows],
            key_is_prompt=self.key_is_prompt[rows],
            prompt_lengths=self.prompt_lengths[rows],
            num_real_blocks=self.num_real_blocks[rows],
            num_blocks=self.num_blocks,
            num_answer_tokens=self.num_answer_tokens,
            latent_codebook=self.latent_codebook,
        )  # num_lm_tokens counts from zero: append_from adds it

    def append_from(self, selected: "ReasonerContext", rows: torch.Tensor):
        """Append the positions that ``selected`` (a :meth:`select_rows` copy for ``rows``) has beyond this context:
        its keys and values for ``rows``, masked zeros for the other rows (as if they had been fed a masked block,
        which is what every row holds when no row is left out), and what ``selected`` fed to the LM."""
        num_new = selected.key_is_real.shape[1] - self.key_is_real.shape[1]
        for layer_index, layer in enumerate(selected.cache.layers):
            keys = layer.keys.new_zeros(self.rows, *layer.keys.shape[1:-2], num_new, layer.keys.shape[-1])
            values = layer.values.new_zeros(self.rows, *layer.values.shape[1:-2], num_new, layer.values.shape[-1])
            keys[rows], values[rows] = layer.keys[..., -num_new:, :], layer.values[..., -num_new:, :]
            self.cache.update(keys, values, layer_index)
        for name in ("key_is_real", "key_is_prompt"):
            new = getattr(self, name).new_zeros(self.rows, num_new)
            new[rows] = getattr(selected, name)[:, -num_new:]
            setattr(self, name, torch.cat([getattr(self, name), new], 1))
        self.num_real_blocks = self.num_real_blocks.index_copy(0, rows, selected.num_real_blocks)
        self.num_blocks = selected.num_blocks
        self.num_answer_tokens = selected.num_answer_tokens
        self.latent_codebook = selected.latent_codebook
        self.num_lm_tokens += selected.num_lm_tokens  # a copy counts from zero


def _float32_or_wider(tensor: torch.Tensor) -> torch.Tensor:
    """Head outputs for the sampler's and the losses' math: float32 from half-precision models, float64 kept."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's timestep features of ``1000 t`` (t in [0, 1]), ``(batch,) -> (batch, dim)``."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000 * t.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Diffusion time ``t`` -> a vector of the LM's hidden size (one extra input token, and adaLN conditioning)."""

    def __init__(self, frequency_dim: int, hidden_size: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class AdaLNVelocityHead(nn.Module):
    """DiT's final layer: LayerNorm, shift and scale from the time embedding, then a linear map to the latent size."""

    def __init__(self, hidden_size: int, latent_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, latent_dim)

    def forward(self, hidden_states: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(time_embedding).unsqueeze(-2).chunk(2, dim=-1)
        return self.linear(self.norm(hidden_states) * (1 + scale) + shift)


class LaDiRModel(PreTrainedModel):
    """A causal LM turned into a latent diffusion reasoner; see the module docstring for the layout."""

    config_class = LaDiRConfig
    base_model_prefix = "ladir"
    main_input_name = "prompt_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # flash attention cannot take the 4D block masks

    def __init__(self, config: LaDiRConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("LaDiRConfig needs a `text_config`; build the model with `LaDiRModel.from_base(...)`.")
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        # The block masks are 4D float masks, which eager and SDPA attention take (flash attention does not).
        attention = config._attn_implementation if config._attn_implementation in ("eager", "sdpa") else "sdpa"
        self.language_model.config._attn_implementation = attention
        self._static_caches = {}  # purpose -> (sizes, StaticCache): see reusable_static_cache
        self._compiled_cached_step = None  # see compile_cached_steps
        hidden_size, latent_dim, num_latent_tokens = (
            config.text_config.hidden_size,
            config.latent_dim,
            config.latent_tokens_per_block,
        )
        embedding_std = getattr(config.text_config, "initializer_range", 0.02)

        # Learned input vectors: the VAE encoder's query tokens (token-aligned latents have none), the decoder's <ae>
        # marker, and the reasoner's <bot>, <eot>, <soa> markers. They are parameters of this module itself (not of a
        # container module) so that DeepSpeed ZeRO-3 gathers them with this module's forward.
        if not config.token_aligned_latents:
            self.query_embeddings = nn.Parameter(torch.randn(num_latent_tokens, hidden_size) * embedding_std)
        self.vae_marker_embedding = nn.Parameter(torch.randn(hidden_size) * embedding_std)
        self.marker_embeddings = nn.Parameter(torch.randn(len(REASONER_MARKERS), hidden_size) * embedding_std)
        # VAE heads (encoder side) and the decoder's input projection.
        self.latent_mean_head = nn.Linear(hidden_size, latent_dim)
        self.latent_logvar_head = nn.Linear(hidden_size, latent_dim)
        self.vae_latent_in = nn.Linear(latent_dim, hidden_size)
        if config.token_aligned_latents:
            # token-aligned encoder: each slot's token embedding, projected to the latent size, and the input of
            # the slots after the sentence's last token
            self.token_projection = nn.Linear(hidden_size, latent_dim)
            self.empty_slot_embedding = nn.Parameter(torch.randn(hidden_size) * embedding_std)
        # Reasoner: input projection, time embedding, velocity head, stop head.
        self.reasoner_latent_in = nn.Linear(latent_dim, hidden_size)
        self.timestep_embedding = TimestepEmbedding(config.timestep_embedding_dim, hidden_size)
        self.velocity_head = AdaLNVelocityHead(hidden_size, latent_dim)
        # with `stop_token_id` the LM's token head decides when to stop: no stop head
        self.stop_head = nn.Linear(hidden_size, 2) if config.stop_token_id is None else None
        if config.causal_denoiser:
            # a noisy slot's latent, added at the position that reads it out (one earlier); zero at first
            self.denoiser_lookahead = nn.Linear(latent_dim, hidden_size)

        for adapter_name, rank in ((ENCODER_ADAPTER, config.encoder_lora_rank), (REASONER_ADAPTER, config.reasoner_lora_rank)):
            self._inject_adapter(adapter_name, rank)
        if config.vae_decoder_lora_rank > 0:
            self._inject_adapter(VAE_DECODER_ADAPTER, config.vae_decoder_lora_rank)
        # Where the denoiser adapter acts in the current forward: a (B, S, 1) 0/1 mask, or None for every position fed.
        self._denoiser_position_mask = None
        if config.denoiser_lora_rank > 0:
            self._inject_denoiser_adapter(config.denoiser_lora_rank)
        self._active_adapter = None
        self._set_adapter(REASONER_ADAPTER)
        self.post_init()
        # DiT: zero modulation and output, so the reasoner stage starts from a zero velocity
        with torch.no_grad():
            for parameter in (*self.velocity_head.modulation[-1].parameters(), *self.velocity_head.linear.parameters()):
                parameter.zero_()
            if config.causal_denoiser:
                for parameter in self.denoiser_lookahead.parameters():
                    parameter.zero_()
            # a nearly deterministic posterior at first, so the decoder learns to read the latents (config docstring)
            if config.initial_latent_logvar is not None:
                self.latent_logvar_head.weight.zero_()
                self.latent_logvar_head.bias.fill_(config.initial_latent_logvar)
            if config.token_aligned_latents:
                # the encoder's contextual part starts at zero: a fresh latent is the projected token embedding
                self.latent_mean_head.weight.zero_()
                self.latent_mean_head.bias.zero_()
        # The base LM's special tokens (GRPOTrainer writes pad/eos ids here too). An empty generation config would make
        # every trainer log that it "aligned" the tokenizer's ids into it.
        text_config = config.text_config
        self.generation_config = GenerationConfig(
            bos_token_id=text_config.bos_token_id,
            eos_token_id=text_config.eos_token_id,
            pad_token_id=text_config.pad_token_id,
        )

    def _init_weights(self, module):
        # Nothing here: the base LM keeps its pretrained weights and our heads keep torch's defaults, except the
        # velocity head, which __init__ zeroes (transformers 5 marks submodules initialised before this would see them).
        pass

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(
        cls, base_model, latent_tokens_per_block: int = 4, latent_dim: int = 128, dtype=None, **config_kwargs
    ) -> "LaDiRModel":
        """Wrap a causal LM (a local directory, a hub id when online, or a loaded model) into a fresh LaDiR model."""
        if isinstance(base_model, (str, bytes)) or hasattr(base_model, "__fspath__"):
            base_config = AutoConfig.from_pretrained(base_model)
            if base_config.model_type not in SUPPORTED_MODEL_TYPES:
                LaDiRConfig(text_config=base_config)  # raises the unsupported-type error before loading weights
            base_model = load_causal_lm(base_model, dtype=dtype or torch.float32)
        config = LaDiRConfig(
            text_config=base_model.config,
            latent_tokens_per_block=latent_tokens_per_block,
            latent_dim=latent_dim,
            base_model_name_or_path=getattr(base_model.config, "_name_or_path", None),
            **config_kwargs,
        )
        return cls(config, language_model=base_model)

    @torch.no_grad()
    def init_token_aligned_maps(self, token_ids: list[int]):
        """Start ``token_projection`` and ``vae_latent_in`` as the top ``D`` principal components of the embeddings of
        ``token_ids`` (the tokens the sentences use) and their transpose: ``vae_latent_in(token_projection(e))`` is
        then ``e``'s best rank-``D`` approximation among those tokens, so a latent says which token fills each slot
        before any training. The empty slot starts as the eos embedding. The VAE stage calls this on a model that no
        VAE stage has trained yet (measured: components of the whole vocabulary leave digits indistinguishable, and
        the VAE at 0.60 token accuracy after 20 steps, against 0.996 with the sentences' tokens; docs/sft.md)."""
        if not self.config.token_aligned_latents:
            raise ValueError("init_token_aligned_maps is for a model built with token_aligned_latents=True.")
        embedding_weight = self.language_model.get_input_embeddings().weight
        embeddings = embedding_weight.detach()[sorted(set(token_ids))].float()
        mean = embeddings.mean(0)
        generator_state = torch.random.get_rng_state()  # pca_lowrank draws random numbers: leave the caller's seed be
        # centred embeddings of n tokens span at most n - 1 directions
        num_components = min(self.config.latent_dim, embeddings.shape[0] - 1, embeddings.shape[1])
        _, _, top = torch.pca_lowrank(embeddings - mean, q=num_components, center=False)  # (H, num_components)
        torch.random.set_rng_state(generator_state)
        components = torch.zeros(embeddings.shape[1], self.config.latent_dim)  # the remaining latent dims start unused
        components[:, :num_components] = top
        self.token_projection.weight.copy_(components.T)
        self.token_projection.bias.copy_(-(components.T @ mean))
        self.vae_latent_in.weight.copy_(components)
        self.vae_latent_in.bias.copy_(mean)
        if self.config.text_config.eos_token_id is not None:
            self.empty_slot_embedding.copy_(embedding_weight[self._eos_token_id()])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "LaDiRModel":
        """Load a saved LaDiR model (a folder or a Hub id). Safetensors weights only, and no code from the folder."""
        if kwargs.get("trust_remote_code"):
            raise ValueError(
                "LaDiRModel.from_pretrained never runs code from a model folder; drop trust_remote_code=True (a LaDiR "
                "model needs none: its classes are in trl_ladi)."
            )
        require_safetensors(pretrained_model_name_or_path)
        kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except (RuntimeError, ValueError) as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} do not fit its config.json (the sizes transformers "
                "logged above differ): the config was edited, or the folder mixes two models. Use the config.json that "
                "was saved with these weights, or save the model again with `model.save_pretrained(folder)`."
            ) from error

    # ------------------------------------------------------------------ adapters

    def _inject_adapter(self, adapter_name: str, rank: int):
        lora_config = LoraConfig(
            r=rank, lora_alpha=self.config.lora_alpha_ratio * rank, target_modules=self.config.lora_target_modules,
            lora_dropout=0.0,
        )
        with warnings.catch_warnings():
            # peft warns that another adapter joins the first ("multiple adapters"): several adapters are the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            inject_adapter_in_model(lora_config, self.language_model, adapter_name=adapter_name)

    def _inject_denoiser_adapter(self, rank: int):
        self._inject_adapter(DENOISER_ADAPTER, rank)
        # The adapter's update lora_B(lora_A(x)) is multiplied by the 0/1 position mask, so at every other position
        # it adds exactly 0: their hidden states are bit for bit those of the reasoner adapter alone. The mask is applied
        # to lora_B's rank-r input, which gives the same product with a tensor of r columns instead of the layer's width.
        for module in self.language_model.modules():
            if isinstance(module, BaseTunerLayer) and DENOISER_ADAPTER in getattr(module, "lora_B", {}):
                module.lora_B[DENOISER_ADAPTER].register_forward_pre_hook(self._mask_denoiser_update)

    def _mask_denoiser_update(self, module, inputs):
        mask = self._denoiser_position_mask
        return inputs if mask is None else (inputs[0] * mask.to(inputs[0].dtype), *inputs[1:])

    def add_denoiser_adapter(self, rank: int = 16):
        """Add the denoiser LoRA adapter (see `LaDiRConfig.denoiser_lora_rank`), initialised so that it changes
        nothing yet (peft's zero ``lora_B``); recorded in the config, so a saved model reloads with it."""
        if self.config.denoiser_lora_rank > 0:
            raise ValueError(f"The model already has a denoiser adapter (rank {self.config.denoiser_lora_rank}).")
        if rank < 1:
            raise ValueError(f"The denoiser adapter's rank must be at least 1, got {rank}.")
        active = self._active_adapter
        self._set_adapter(None)  # switch again after the injection, so peft's flags cover the new layers
        self._inject_denoiser_adapter(rank)
        self.config.denoiser_lora_rank = rank
        for parameter in self.adapter_parameters(DENOISER_ADAPTER):
            parameter.requires_grad_(False)  # as every other parameter until training code says otherwise
        self._set_adapter(active)

    @contextlib.contextmanager
    def _denoiser_adapter_at(self, positions: torch.Tensor | None):
        """Run the LM with the denoiser adapter on top of the reasoner's at ``positions`` ``(B, S)`` (``None``: at every
        position fed). Without a denoiser adapter this changes nothing.

        The adapter and the mask are state of the module for the duration of the forward, so a backward pass that
        recomputes activations later (activation checkpointing) would not see them: LaDiRLConfig refuses that
        combination.
        """
        if self.config.denoiser_lora_rank == 0:
            yield
            return
        previous = self._active_adapter
        self._set_adapter((REASONER_ADAPTER, DENOISER_ADAPTER))
        self._denoiser_position_mask = None if positions is None else positions[..., None]
        try:
            yield
        finally:
            self._denoiser_position_mask = None
            self._set_adapter(previous)

    def _set_adapter(self, adapter_name: str | tuple[str, ...] | None):
        """Activate one LoRA adapter, a tuple of them (summed), or none (the plain base LM) without changing any
        ``requires_grad`` flag.

        peft's own switch also marks the active adapter trainable; training code decides that, not a forward pass.
        """
        if adapter_name == self._active_adapter:
            return
        trainable = {parameter: parameter.requires_grad for parameter in self.language_model.parameters()}
        for module in self.language_model.modules():
            if isinstance(module, BaseTunerLayer):
                if adapter_name is None:
                    module.enable_adapters(False)
                else:
                    module.enable_adapters(True)
                    module.set_adapter(list(adapter_name) if isinstance(adapter_name, tuple) else adapter_name)
        for parameter, requires_grad in trainable.items():
            parameter.requires_grad_(requires_grad)
        self._active_adapter = adapter_name

    @contextlib.contextmanager
    def using_adapter(self, adapter_name: str | None):
        """``with model.using_adapter("encoder"): ...`` runs the LM with that adapter, then restores the previous one."""
        previous = self._active_adapter
        self._set_adapter(adapter_name)
        try:
            yield
        finally:
            self._set_adapter(previous)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [p for n, p in self.language_model.named_parameters() if f".{adapter_name}." in n and "lora_" in n]

    def vae_parameters(self) -> list[nn.Parameter]:
        """What the VAE stage trains: encoder adapter, query tokens (or the token-aligned encoder's projection and
        empty slot), mu/logvar heads, the decoder's input map and the decoder's adapter when it has one.

        A token posterior's codebook (`latent_codebook`: the projection and the empty slot) stays as
        `init_token_aligned_maps` set it: its reasoner reads the codebook rows, and a VAE stage that moved them cost
        its reasoner a quarter of its exact sentences (SmolLM2-135M, 30 VAE steps; docs/sft.md)."""
        heads = [self.vae_marker_embedding]
        modules = [self.latent_mean_head, self.latent_logvar_head, self.vae_latent_in]
        if self.config.token_aligned_latents:
            if self.config.velocity_parameterization != "token_posterior":
                heads.append(self.empty_slot_embedding)
                modules.append(self.token_projection)
        else:
            heads.append(self.query_embeddings)
        for module in modules:
            heads.extend(module.parameters())
        return self.adapter_parameters(ENCODER_ADAPTER) + self.adapter_parameters(VAE_DECODER_ADAPTER) + heads

    @property
    def vae_decoder_adapter(self) -> str | None:
        """The adapter the VAE decoder runs: its own, or none (the frozen base LM)."""
        return VAE_DECODER_ADAPTER if self.config.vae_decoder_lora_rank > 0 else None

    def shared_reasoner_parameters(self) -> list[nn.Parameter]:
        """What the denoiser shares with the answer decoder: reasoner adapter, markers, latent input, time embedding."""
        shared = self.adapter_parameters(REASONER_ADAPTER) + [self.marker_embeddings]
        for module in (self.reasoner_latent_in, self.timestep_embedding):
            shared.extend(module.parameters())
        return shared

    def velocity_head_parameters(self) -> list[nn.Parameter]:
        """The denoiser's own output head; nothing the answer decoder reads depends on it. A token-posterior denoiser
        has none (its velocity is the exact posterior's): the list is empty."""
        if self.config.velocity_parameterization == "token_posterior":
            return []
        return list(self.velocity_head.parameters())

    def denoiser_parameters(self) -> list[nn.Parameter]:
        """What belongs to the denoiser alone: the velocity head, the denoiser adapter and the lookahead input (when
        the model has them)."""
        lookahead = list(self.denoiser_lookahead.parameters()) if self.config.causal_denoiser else []
        return self.velocity_head_parameters() + self.adapter_parameters(DENOISER_ADAPTER) + lookahead

    def reasoner_parameters(self) -> list[nn.Parameter]:
        """What the reasoner stage trains: the shared reasoner parameters, the denoiser's own and the stop head."""
        return self.shared_reasoner_parameters() + self.denoiser_parameters() + self.stop_head_parameters()

    def train_only(self, parameters: list[nn.Parameter]):
        """Freeze everything, then unfreeze ``parameters``."""
        self.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)

    # ------------------------------------------------------------------ small helpers

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def block_layout(self) -> BlockLayout:
        return BlockLayout(self.config.latent_tokens_per_block)

    @property
    def causal_noisy_blocks(self) -> bool:
        """Whether a block being denoised attends causally inside (`causal_denoiser`, `"token_posterior"`)."""
        return self.config.causal_denoiser or self.causal_clean_blocks

    @property
    def causal_clean_blocks(self) -> bool:
        """Whether a finished block attends causally inside (`"token_posterior"`): its positions then read as the
        noisy copy at time 0 of the same block does, so the slot priors can be read from the finished blocks."""
        return self.config.velocity_parameterization == "token_posterior"

    @property
    def is_gradient_checkpointing(self) -> bool:
        # TRL 1.16 still reads this deprecated alias (`unwrap_model_for_generation`); answer it without transformers'
        # FutureWarning, which would otherwise print at every rollout.
        return self.is_activation_checkpointing

    def _token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(token_ids)

    def _marker(self, name: str, *leading: int) -> torch.Tensor:
        marker = self.vae_marker_embedding if name == "ae" else self.marker_embeddings[REASONER_MARKERS[name]]
        return marker.to(self.dtype).expand(*leading, self.hidden_size)

    def _decoder_hidden_states(self, inputs_embeds, attention_mask, position_ids, cache=None, forward=None):
        """Run the base decoder (without the LM head; ``forward``: a compiled one) and return its last hidden
        states."""
        outputs = (forward or self.language_model.get_decoder())(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return outputs.last_hidden_state

    def _lm_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_output_embeddings()(hidden_states)

    def _stop_logits(self, eot_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``<eot>`` hidden states ``(..., H)`` -> stop logits ``(..., 2)`` ("another block", "answer"), and the LM's
        next-token logits there ``(..., V)`` when it decides (`LaDiRConfig.stop_token_id`; else None). Then "another
        block" is every token but the answer's first, ``log sum_{v != stop} exp(logit_v)``, and "answer" that token's
        logit, so ``softmax`` of the pair gives ``p(stop)`` = that token's probability."""
        if self.config.stop_token_id is None:
            return _float32_or_wider(self.stop_head(eot_hidden)), None
        token_logits = _float32_or_wider(self._lm_logits(eot_hidden))
        others = token_logits.clone()
        others[..., self.config.stop_token_id] = float("-inf")
        return torch.stack([others.logsumexp(-1), token_logits[..., self.config.stop_token_id]], -1), token_logits

    def stop_head_parameters(self) -> list[nn.Parameter]:
        """The linear stop head's weights; none when the LM's token head decides (`LaDiRConfig.stop_token_id`)."""
        return [] if self.stop_head is None else list(self.stop_head.parameters())

    def _additive_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean ``(B, Q, K)`` allow-matrix -> the 4D additive float mask transformers expects."""
        dtype = self.language_model.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def _block_embeddings(self, latents: torch.Tensor, time_embedding: torch.Tensor, with_eot: bool) -> torch.Tensor:
        """``<bot>, t-embed, latent_in(z_1..z_L)[, <eot>]`` for latents ``(R, L, D)``, time embeddings ``(R, H)``.
        A noisy block (``with_eot=False``) of a causal denoiser also gets ``denoiser_lookahead(z_j)`` at the position
        that reads slot ``j`` out (``t-embed`` for ``z_1``, ``z_{j-1}`` for ``z_j``)."""
        rows = latents.shape[0]
        parts = [
            self._marker("bot", rows, 1),
            time_embedding[:, None],
            self.reasoner_latent_in(latents.to(self.dtype)),
        ]
        if with_eot:
            parts.append(self._marker("eot", rows, 1))
        embeddings = torch.cat(parts, dim=1)
        if self.config.causal_denoiser and not with_eot:
            lookahead = self.denoiser_lookahead(latents.to(self.dtype))  # (R, L, H) -> positions 1..L of L + 2
            embeddings = embeddings + nn.functional.pad(lookahead, (0, 0, 1, 1))
        return embeddings

    # ------------------------------------------------------------------ VAE

    def encode(self, sentence_ids: torch.Tensor, sentence_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE encoder: left-padded sentences ``(B, S)`` -> ``mu, logvar`` of shape ``(B, L, D)``."""
        if self.config.token_aligned_latents:
            return self._encode_token_aligned(sentence_ids, sentence_mask)
        batch, num_latent_tokens = sentence_ids.shape[0], self.config.latent_tokens_per_block
        inputs_embeds = torch.cat(
            [self._token_embeddings(sentence_ids), self.query_embeddings.to(self.dtype).expand(batch, -1, -1)], dim=1
        )
        attention_mask = torch.cat([sentence_mask, sentence_mask.new_ones(batch, num_latent_tokens)], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with self.using_adapter(ENCODER_ADAPTER):
            hidden = self.language_model.get_decoder()(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids
            ).last_hidden_state[:, -num_latent_tokens:]
        return self.latent_mean_head(hidden).float(), self.latent_logvar_head(hidden).float().clamp(-30, 20)

    def _encode_token_aligned(self, sentence_ids: torch.Tensor, sentence_mask: torch.Tensor):
        """Slot ``j`` holds the sentence's ``j``-th token (its first ``L`` tokens); the slots after it hold the empty
        slot vector. ``mu_j = token_projection(e_j) + mean_head(h_j)``, ``h`` the encoder's hidden states over the
        ``L`` slots (causal, every slot real)."""
        inputs_embeds = self.token_aligned_slot_embeddings(sentence_ids, sentence_mask)
        with self.using_adapter(ENCODER_ADAPTER):
            hidden = self.language_model.get_decoder()(inputs_embeds=inputs_embeds).last_hidden_state
        mu = self.token_projection(inputs_embeds) + self.latent_mean_head(hidden)
        return mu.float(), self.latent_logvar_head(hidden).float().clamp(-30, 20)

    def token_aligned_slot_embeddings(self, sentence_ids: torch.Tensor, sentence_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L, H)``: what the token-aligned encoder reads at each slot of left-padded sentences ``(B, S)``: the
        embedding of the sentence's ``j``-th token, or the empty slot vector after its last token."""
        num_slots = self.config.latent_tokens_per_block
        lengths = sentence_mask.sum(-1)
        # left-padded -> the first L real tokens from slot 0: real token k of row b sits at column (S - len_b) + k
        slots = torch.arange(num_slots, device=sentence_ids.device)
        columns = (sentence_ids.shape[1] - lengths[:, None] + slots).clamp(max=sentence_ids.shape[1] - 1)
        filled = slots < lengths[:, None]  # (B, L); a sentence longer than L fills every slot
        token_embeddings = self._token_embeddings(sentence_ids.gather(1, columns))
        empty = self.empty_slot_embedding.to(token_embeddings.dtype).expand_as(token_embeddings)
        return torch.where(filled[..., None], token_embeddings, empty)

    def _vae_decoder_inputs(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae_latent_in(z), <ae>``: the prefix the VAE decoder reconstructs a sentence from."""
        return torch.cat([self.vae_latent_in(latents.to(self.dtype)), self._marker("ae", latents.shape[0], 1)], dim=1)

    def vae_loss(
        self,
        sentence_ids: torch.Tensor,
        sentence_mask: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
        kl_weight: float = 1e-5,
        latent_noise_std: float = 0.0,
    ) -> dict:
        """β-VAE loss: reconstruct ``target_ids`` (right-padded sentence + eos) from a sample of the latent.

        ``sentence_ids`` is the (left-padded, possibly token-substituted) encoder input; the decoder is the base LM
        with adapters off or with its own adapter (`vae_decoder_lora_rank`): the base LM's weights never learn.
        """
        mu, logvar = self.encode(sentence_ids, sentence_mask)
        latents = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # reparameterisation
        if latent_noise_std > 0:
            latents = latents + latent_noise_std * torch.randn_like(latents)  # LaDiR's latent noise augmentation
        prefix = self._vae_decoder_inputs(latents)
        inputs_embeds = torch.cat([prefix, self._token_embeddings(target_ids)], dim=1)
        attention_mask = torch.cat([target_mask.new_ones(prefix.shape[:2]), target_mask], dim=1)
        with self.using_adapter(self.vae_decoder_adapter):
            hidden = self.language_model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        # position of <ae> predicts the first target token, and so on
        logits = self._lm_logits(hidden[:, prefix.shape[1] - 1 : -1]).float()
        token_loss = F.cross_entropy(logits.transpose(1, 2), target_ids, reduction="none")
        mask = target_mask.float()
        reconstruction_loss = (token_loss * mask).sum() / mask.sum().clamp(min=1)
        # KL(q(z|x) || N(0, I)) per latent number: averaged over the L x D numbers and the sentences, as LaDiR's
        # reference code does, so that its beta (1e-5) means the same here (a sum over L x D would be L x D times it)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        token_accuracy = ((logits.argmax(-1) == target_ids).float() * mask).sum() / mask.sum().clamp(min=1)
        return {
            "loss": reconstruction_loss + kl_weight * kl,
            "reconstruction_loss": reconstruction_loss.detach(),
            "kl": kl.detach(),
            "token_accuracy": token_accuracy.detach(),
        }

    @torch.no_grad()
    def decode_latents_to_text(self, latents: torch.Tensor, tokenizer, max_new_tokens: int = 48) -> list[str]:
        """Show latent blocks ``(B, L, D)`` (reasoner space) as text with the VAE decoder, greedily."""
        raw_latents = latents / self.config.latent_scaling_factor
        prefix = self._vae_decoder_inputs(raw_latents)
        with self.using_adapter(self.vae_decoder_adapter):
            token_ids = self.language_model.generate(
                inputs_embeds=prefix,
                attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        return tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    @torch.no_grad()
    def nearest_codebook_tokens(self, latents: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """The token ids ``(...)`` of the codebook rows nearest to latent slots ``(..., D)`` (reasoner space; eos is the
        empty slot). ``codebook``: `latent_codebook()`, when the caller already has it."""
        codebook = (self.latent_codebook() if codebook is None else codebook).to(latents.dtype)
        # |z - c|^2 up to |z|^2, without a (..., V, D) difference tensor
        distances = codebook.pow(2).sum(-1) - 2 * latents @ codebook.T
        return distances.argmin(-1)

    @torch.no_grad()
    def read_latent_tokens(self, latents: torch.Tensor, tokenizer) -> list[str]:
        """Show token-aligned latent blocks ``(B, L, D)`` (reasoner space) as the text of each slot's nearest codebook
        token (`nearest_codebook_tokens`; empty slots dropped): what a token posterior's blocks hold, with no decoder."""
        eos = self._eos_token_id()
        return [tokenizer.decode([t for t in row.tolist() if t != eos]) for row in self.nearest_codebook_tokens(latents)]

    # ------------------------------------------------------------------ the packed reasoner forward (training)

    def _packed_forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        latents: torch.Tensor,
        block_mask: torch.Tensor,
        noisy_latents: torch.Tensor | None = None,
        noisy_timesteps: torch.Tensor | None = None,
        noisy_block_index: torch.Tensor | None = None,
        answer_ids: torch.Tensor | None = None,
        answer_mask: torch.Tensor | None = None,
        drop_prompt: torch.Tensor | None = None,
        detach_velocity_features: bool = False,
        clean_slot_logits: bool = False,
    ) -> dict:
        """One reasoner forward over whole traces: prompt, clean blocks, noisy block copies, answer.

        Shapes: prompt ``(B, P)`` left-padded; ``latents`` ``(B, Bm, L, D)`` clean blocks with ``block_mask``
        ``(B, Bm)``; ``noisy_latents`` ``(B, Q, L, D)`` at ``noisy_timesteps`` ``(B, Q)``, copy ``q`` standing in for
        block ``noisy_block_index[:, q]``; ``answer_ids`` ``(B, A)`` right-padded. ``drop_prompt`` ``(B, Q)`` hides the
        prompt from noisy copy ``q`` (the unconditional velocity of classifier-free guidance). Only the copy loses the
        prompt: the clean blocks it reads did see it, exactly as the cached sampler's unconditional step sees them.

        Returns ``velocity`` ``(B, Q, L, D)``, ``stop_logits`` ``(B, Bm, 2)`` and ``answer_logits`` ``(B, A, V)``
        (the logits that predict ``answer_ids``); with the token-readout velocity also ``clean_latents``
        ``(B, Q, L, D)`` and ``slot_logits`` ``(B, Q, L, V)`` (see :meth:`_velocity`). ``clean_slot_logits=True``
        (token posterior) adds ``clean_slot_logits`` ``(B, Bm, L, V)``: the slot priors read from the clean blocks.
        """
        device = prompt_ids.device
        layout = self.block_layout
        width, noisy_width = layout.width, layout.noisy_width
        batch, prompt_length = prompt_ids.shape
        num_blocks = latents.shape[1]
        num_noisy = 0 if noisy_latents is None else noisy_latents.shape[1]
        answer_length = 0 if answer_ids is None else answer_ids.shape[1]
        block_mask = block_mask.bool()

        # --- inputs
        parts = [self._token_embeddings(prompt_ids)]
        clean_time_embedding = self.timestep_embedding(torch.zeros(batch * num_blocks, device=device))
        clean = self._block_embeddings(latents.flatten(0, 1), clean_time_embedding, with_eot=True)
        parts.append(clean.view(batch, num_blocks * width, -1))
        if num_noisy:
            noisy_time_embedding = self.timestep_embedding(noisy_timesteps.flatten())  # the input token and adaLN
            noisy = self._block_embeddings(noisy_latents.flatten(0, 1), noisy_time_embedding, with_eot=False)
            parts.append(noisy.view(batch, num_noisy * noisy_width, -1))
        if answer_length:
            parts.append(torch.cat([self._marker("soa", batch, 1), self._token_embeddings(answer_ids)], dim=1))
        inputs_embeds = torch.cat(parts, dim=1)

        # --- one descriptor per position: its segment kind, block index, segment, position id, whether it is real,
        # and whether it may read the prompt. Kinds: 0 prompt, 1 clean block, 2 noisy copy, 3 answer.
        prompt_lengths = prompt_mask.sum(-1, keepdim=True)
        block_index = torch.arange(num_blocks, device=device)
        kinds, blocks, segments, positions, real, reads_prompt = [], [], [], [], [], []

        kinds.append(torch.zeros(batch, prompt_length, dtype=torch.long, device=device))
        blocks.append(torch.full((batch, prompt_length), -1, device=device))
        segments.append(torch.full((batch, prompt_length), -1, device=device))
        positions.append((prompt_mask.cumsum(-1) - 1).clamp(min=0))
        real.append(prompt_mask.bool())
        reads_prompt.append(torch.ones(batch, prompt_length, dtype=torch.bool, device=device))

        clean_blocks = block_index.repeat_interleave(width).expand(batch, -1)
        kinds.append(torch.ones_like(clean_blocks))
        blocks.append(clean_blocks)
        segments.append(clean_blocks)
        positions.append(layout.position_ids(prompt_lengths, block_index.expand(batch, -1), width))
        real.append(block_mask.repeat_interleave(width, dim=1))
        reads_prompt.append(torch.ones_like(clean_blocks, dtype=torch.bool))

        if num_noisy:
            noisy_blocks = noisy_block_index.repeat_interleave(noisy_width, dim=1)
            kinds.append(torch.full_like(noisy_blocks, 2))
            blocks.append(noisy_blocks)
            copies = num_blocks + torch.arange(num_noisy, device=device)
            segments.append(copies.repeat_interleave(noisy_width).expand(batch, -1))
            positions.append(layout.position_ids(prompt_lengths, noisy_block_index, noisy_width))
            real.append(torch.ones_like(noisy_blocks, dtype=torch.bool))
            copy_reads_prompt = torch.ones_like(noisy_block_index, dtype=torch.bool)
            if drop_prompt is not None:
                copy_reads_prompt = ~drop_prompt.bool()
            reads_prompt.append(copy_reads_prompt.repeat_interleave(noisy_width, dim=1))

        if answer_length:
            answer_real = torch.cat([answer_mask.new_ones(batch, 1), answer_mask], dim=1).bool()
            blocks_used = block_mask.sum(-1, keepdim=True)
            kinds.append(torch.full((batch, answer_length + 1), 3, device=device))
            blocks.append(torch.full((batch, answer_length + 1), num_blocks, device=device))  # sees every block
            segments.append(torch.full((batch, answer_length + 1), -2, device=device))
            positions.append(layout.position_ids(prompt_lengths, blocks_used, answer_length + 1))
            real.append(answer_real)
            reads_prompt.append(torch.ones_like(answer_real))

        kind, block, segment = torch.cat(kinds, 1), torch.cat(blocks, 1), torch.cat(segments, 1)
        position_ids, is_real, reads_prompt = torch.cat(positions, 1), torch.cat(real, 1), torch.cat(reads_prompt, 1)
        sequence_index = torch.arange(kind.shape[1], device=device)

        # --- who may attend to whom (query rows, key columns)
        q_kind, k_kind = kind[:, :, None], kind[:, None, :]
        q_block, k_block = block[:, :, None], block[:, None, :]
        causal = sequence_index[None, :, None] >= sequence_index[None, None, :]
        same_segment = segment[:, :, None] == segment[:, None, :]
        # every non-prompt query reads the (real) prompt unless it is dropped for it; the prompt itself is causal
        allowed = (k_kind == 0) & reads_prompt[:, :, None] & ((q_kind != 0) | causal)
        # clean blocks before the query's block are context for blocks, noisy copies and the answer
        allowed |= (k_kind == 1) & (k_block < q_block)
        # inside a block: bidirectional among <bot>, t, z; the <eot> (last of its block) sees the block and itself; a
        # causal denoiser's noisy copies are causal inside, and a token posterior's blocks all are
        is_eot = (kind == 1) & (((position_ids - prompt_lengths) % width) == layout.eot)
        in_block = same_segment & ((q_kind == 1) | (q_kind == 2))
        if self.causal_clean_blocks:
            in_block &= causal
        elif self.causal_noisy_blocks:
            in_block &= (q_kind == 1) | causal
        allowed |= in_block & (~is_eot[:, None, :] | (is_eot[:, :, None] & causal))
        # the answer is causal among itself
        allowed |= (q_kind == 3) & (k_kind == 3) & causal
        allowed &= is_real[:, None, :]
        allowed |= torch.eye(kind.shape[1], dtype=torch.bool, device=device)  # no empty row (padding queries)
        # the denoiser adapter acts at the noisy copies only, which no other position reads
        with self._denoiser_adapter_at(kind == 2) if num_noisy else contextlib.nullcontext():
            hidden = self._decoder_hidden_states(inputs_embeds, self._additive_mask(allowed), position_ids)

        # --- heads
        outputs = {}
        clean_start = prompt_length
        eot_hidden = hidden[:, clean_start + layout.eot : clean_start + num_blocks * width : width]
        outputs["stop_logits"], eot_logits = self._stop_logits(eot_hidden)
        if eot_logits is not None:
            outputs["eot_logits"] = eot_logits  # what is written next: the reasoner loss trains it
        if clean_slot_logits:
            if not self.causal_clean_blocks:
                raise ValueError("clean_slot_logits needs causal clean blocks (velocity_parameterization='token_posterior').")
            clean_hidden = hidden[:, clean_start : clean_start + num_blocks * width].view(batch, num_blocks, width, -1)
            outputs["clean_slot_logits"] = _float32_or_wider(self._lm_logits(clean_hidden[..., layout.readout_tokens, :]))
        if num_noisy:
            start = clean_start + num_blocks * width
            noisy_hidden = hidden[:, start : start + num_noisy * noisy_width].view(batch, num_noisy, noisy_width, -1)
            outputs.update(
                self._velocity(
                    noisy_hidden,
                    noisy_latents,
                    noisy_timesteps,
                    noisy_time_embedding.view(batch, num_noisy, -1),
                    detach_features=detach_velocity_features,
                )
            )
        if answer_length:
            outputs["answer_logits"] = _float32_or_wider(self._lm_logits(hidden[:, -answer_length - 1 : -1]))
        return outputs

    # ------------------------------------------------------------------ the velocity

    def _velocity(
        self, block_hidden, noisy_latents, t, time_embedding, detach_features: bool = False, codebook=None
    ) -> dict:
        """The velocity of noisy blocks from their hidden states ``(..., L + 2, H)``, at latents ``(..., L, D)``, times
        ``t`` ``(...)`` and time embeddings ``(..., H)``. ``detach_features`` stops the gradient at the heads' input
        (the velocity head alone learns; see :meth:`denoising_log_probs`). ``codebook``: `latent_codebook()`, when the
        caller already has it."""
        layout = self.block_layout
        if self.config.velocity_parameterization == "direct":
            features = block_hidden[..., layout.latent_tokens, :]
            if detach_features:
                features, time_embedding = features.detach(), time_embedding.detach()
            return {"velocity": _float32_or_wider(self.velocity_head(features, time_embedding))}
        # token readout: each slot's token is predicted where a causal LM predicts the next token
        features = block_hidden[..., layout.readout_tokens, :]
        if detach_features:
            features, time_embedding = features.detach(), time_embedding.detach()
        slot_logits = _float32_or_wider(self._lm_logits(features))
        if self.config.velocity_parameterization == "token_posterior":
            # the slots' priors; the velocity needs the noisy latents of the steps (`posterior_velocity`)
            return {"slot_logits": slot_logits}
        # z_0 estimate: the expected latent of the predicted token, sum_v p(v) c_v, plus the adaLN head's correction
        # (zero at first; it can learn what the encoder adds from context, and is the policy RL trains by default)
        codebook = (self.latent_codebook() if codebook is None else codebook).to(slot_logits.dtype)
        correction = _float32_or_wider(self.velocity_head(features, time_embedding))
        probabilities = (slot_logits / self.config.token_readout_temperature).softmax(-1)
        clean_latents = probabilities @ codebook + correction
        # z_t = (1 - t) z_0 + t eps and v = eps - z_0 give v = (z_t - z_0) / t; the sampler never evaluates t = 0
        velocity = (noisy_latents.to(clean_latents.dtype) - clean_latents) / t.to(clean_latents.dtype)[..., None, None]
        return {"velocity": velocity, "clean_latents": clean_latents, "slot_logits": slot_logits}

    def posterior_velocity(self, slot_logits, noisy_latents, t, codebook=None, codebook_squared_norms=None):
        """The token-posterior velocity ``(..., L, D)`` at noisy latents ``z_t`` ``(..., L, D)``, times ``t`` ``(...)``,
        from the slots' prior logits ``(..., L, V)`` (read from the clean slots before each slot; a leading dimension
        of size 1 is shared by the latents' steps).

        ``v = (z_t - E[z_0 | z_t]) / t`` with the exact posterior mean of a codebook prior
        (`sampling.codebook_posterior_mean`; noise std `initial_noise_scale`, the sampler's). ``codebook`` and
        ``codebook_squared_norms``: `latent_codebook()` and its rows' squared norms, when the caller has them.
        """
        codebook = self.latent_codebook() if codebook is None else codebook
        dtype = torch.promote_types(slot_logits.dtype, noisy_latents.dtype)
        t = t.to(dtype)[..., None]  # one time per block, for each of its slots
        prior_logits = slot_logits.to(dtype) / self.config.token_readout_temperature
        clean_estimate = sampling.codebook_posterior_mean(
            prior_logits, noisy_latents.to(dtype), t, codebook, self.config.initial_noise_scale, codebook_squared_norms
        )
        return (noisy_latents.to(dtype) - clean_estimate) / t[..., None]

    @torch.no_grad()
    def latent_codebook(self) -> torch.Tensor:
        """``(V, D)``: the reasoner-space latent of each vocabulary token alone in a slot, ``s * token_projection(e_v)``;
        the eos row holds the empty slot's latent (the token-readout velocity predicts eos for a slot after the
        sentence). It reads only VAE parameters, so it is a constant of the reasoner and RL stages."""
        if not self.config.token_aligned_latents:
            raise ValueError("latent_codebook is for a model built with token_aligned_latents=True.")
        vocab_size = self.config.text_config.vocab_size
        embeddings = self._token_embeddings(torch.arange(vocab_size, device=self.device))
        is_eos = torch.zeros(vocab_size, 1, dtype=torch.bool, device=self.device)
        is_eos[self._eos_token_id()] = True
        embeddings = torch.where(is_eos, self.empty_slot_embedding.to(embeddings.dtype), embeddings)
        return self.config.latent_scaling_factor * self.token_projection(embeddings)

    def _eos_token_id(self) -> int:
        eos_token_id = self.config.text_config.eos_token_id
        if isinstance(eos_token_id, list):
            eos_token_id = eos_token_id[0]
        if eos_token_id is None:
            raise ValueError("The base model's config has no eos_token_id; set `text_config.eos_token_id`.")
        return eos_token_id

    # ------------------------------------------------------------------ losses

    def reasoner_loss(
        self,
        prompt_ids,
        prompt_mask,
        latents,
        block_mask,
        answer_ids,
        answer_mask,
        flow_weight: float = 5.0,
        answer_weight: float = 1.0,
        stop_weight: float = 2.0,
        prompt_dropout: float = 0.1,
        rollout_denoise_steps: int = 0,
        slot_token_ids=None,
        slot_token_weight: float = 3.0,
        timestep_shift: float = 1.0,
    ) -> dict:
        """LaDiR's reasoner loss, ``flow + answer + stop`` weighted, on the VAE's latents (reasoner space).

        Each real block gets one noisy copy at a random ``t`` (uniform, shifted towards 1 by ``timestep_shift > 1``)
        with the flow-matching target ``eps - z_0``.
        With ``rollout_denoise_steps > 0`` (LaDiR's stage 2) the answer is read from latents the model generates
        itself from noise in that many Euler steps, with the gradient kept through the velocities, so the answer
        loss teaches the denoiser to write latents the decoder can answer from; the flow and stop losses on the
        VAE's latents stay as an anchor against latent collapse.

        With the token-readout velocity (`LaDiRConfig.velocity_parameterization`) the flow loss is taken on the
        clean-latent estimate, ``|z_0_estimate - z_0|^2`` (the velocity error times ``t^2``, which stays finite as
        ``t -> 0``), and ``slot_token_ids`` ``(B, Bm, L)`` (each slot's token, eos for an empty slot) add a
        cross-entropy on the slot predictions, weighted by ``slot_token_weight``; other models ignore them.

        A token-posterior denoiser has nothing to learn but the slot priors, read off the (causal) clean blocks: slot
        ``j`` is predicted from the true slots before it, as text SFT predicts the next token. Its blocks are the slot
        tokens' codebook latents, which is what its sampler writes (``latents`` is not read: pass ``None``). No noise,
        no flow loss (and no ``flow_loss`` in the metrics); ``prompt_dropout`` does not apply (no guidance for it).
        """
        parameterization = self.config.velocity_parameterization
        token_readout = parameterization in ("token_readout", "token_posterior")
        if token_readout and slot_token_ids is None:
            raise ValueError(
                f"A model with velocity_parameterization='{parameterization}' trains on each slot's token: pass "
                "`slot_token_ids` (B, blocks, L) (LaDiRSFTTrainer builds them from the reasoning sentences)."
            )
        if parameterization == "token_posterior" and rollout_denoise_steps > 0:
            raise ValueError(
                "A 'token_posterior' denoiser is exact given its slot priors, which the reasoner stage trains from "
                "clean prefixes: there is no rollout stage for it. Use stage='reasoner'."
            )
        batch, num_blocks = block_mask.shape
        device = block_mask.device
        real_blocks = block_mask.float()
        if parameterization == "token_posterior":
            # the sampler's blocks are codebook rows, one token per slot: the reasoner reads those (not the encoder's
            # latents, which also carry context), and slot j's prior comes off the causal clean blocks
            latents = self.latent_codebook()[slot_token_ids]
            outputs = self._packed_forward(
                prompt_ids, prompt_mask, latents, block_mask, answer_ids=answer_ids, answer_mask=answer_mask,
                clean_slot_logits=True,
            )
            outputs["slot_logits"] = outputs.pop("clean_slot_logits")
            loss, metrics = 0.0, {}
        else:
            if latents is None:
                raise ValueError(
                    f"A '{parameterization}' reasoner trains on the VAE's latents: pass `latents` (B, blocks, L, D)."
                )
            outputs, flow_loss = self._flow_matching_outputs(
                prompt_ids, prompt_mask, latents, block_mask, answer_ids, answer_mask, prompt_dropout,
                rollout_denoise_steps, timestep_shift,
            )
            loss, metrics = flow_weight * flow_loss, {"flow_loss": flow_loss.detach()}
        # stop target: "answer" at the last real block, "continue" before it
        num_real = block_mask.sum(-1, keepdim=True)
        stop_target = (torch.arange(num_blocks, device=device)[None] == num_real - 1).long()
        stop_loss = F.cross_entropy(outputs["stop_logits"].transpose(1, 2), stop_target, reduction="none")
        stop_loss = (stop_loss * real_blocks).sum() / real_blocks.sum().clamp(min=1)
        stop_training_loss = stop_loss
        if "eot_logits" in outputs and slot_token_ids is not None:
            # the LM's token head at <eot> learns what is written next, as text SFT learns it at a line's end: the
            # next sentence's first token, or the answer's first token after the last block (the metric stays the
            # stop-or-not cross-entropy above)
            next_token = torch.cat([slot_token_ids[:, 1:, 0], slot_token_ids.new_zeros(batch, 1)], 1)
            next_token = torch.where(stop_target.bool(), self.config.stop_token_id, next_token)
            next_token_loss = F.cross_entropy(outputs["eot_logits"].transpose(1, 2), next_token, reduction="none")
            stop_training_loss = (next_token_loss * real_blocks).sum() / real_blocks.sum().clamp(min=1)
        answer_token_loss = F.cross_entropy(outputs["answer_logits"].transpose(1, 2), answer_ids, reduction="none")
        answer_weights = answer_mask.float()
        answer_loss = (answer_token_loss * answer_weights).sum() / answer_weights.sum().clamp(min=1)
        loss = loss + answer_weight * answer_loss + stop_weight * stop_training_loss
        metrics.update(answer_loss=answer_loss.detach(), stop_loss=stop_loss.detach())
        if token_readout:
            slot_loss = F.cross_entropy(outputs["slot_logits"].flatten(0, 2), slot_token_ids.flatten(), reduction="none")
            slot_loss = slot_loss.view(batch, num_blocks, -1).mean(-1)
            slot_token_loss = (slot_loss * real_blocks).sum() / real_blocks.sum().clamp(min=1)
            loss = loss + slot_token_weight * slot_token_loss
            metrics["slot_token_loss"] = slot_token_loss.detach()
        return {"loss": loss, **metrics}

    def _flow_matching_outputs(
        self, prompt_ids, prompt_mask, latents, block_mask, answer_ids, answer_mask, prompt_dropout,
        rollout_denoise_steps, timestep_shift,
    ) -> tuple[dict, torch.Tensor]:
        """The reasoner loss's forward for a learnt velocity: one noisy copy per real block, and its flow loss."""
        batch, num_blocks = block_mask.shape
        device = latents.device
        t = torch.rand(batch, num_blocks, device=device)
        # SD3's shift of the training times towards noise, s u / (1 + (s - 1) u): where a block is decided
        t = timestep_shift * t / (1 + (timestep_shift - 1) * t)
        noise = torch.randn_like(latents)
        noisy_latents, velocity_target = sampling.add_flow_noise(latents.flatten(0, 1), noise.flatten(0, 1), t.flatten())
        drop_prompt = None
        if prompt_dropout > 0:
            # classifier-free guidance: a trace's noisy copies lose the prompt (its clean blocks and answer keep it),
            # which is the context of the sampler's unconditional velocity
            drop_prompt = (torch.rand(batch, device=device) < prompt_dropout)[:, None].expand(-1, num_blocks)
        outputs = self._packed_forward(
            prompt_ids,
            prompt_mask,
            latents,
            block_mask,
            noisy_latents=noisy_latents.view_as(latents),
            noisy_timesteps=t,
            noisy_block_index=torch.arange(num_blocks, device=device).expand(batch, -1),
            answer_ids=answer_ids if rollout_denoise_steps == 0 else None,
            answer_mask=answer_mask,
            drop_prompt=drop_prompt,
        )
        if rollout_denoise_steps > 0:
            generated = self._rollout_latents(prompt_ids, prompt_mask, block_mask, rollout_denoise_steps)
            outputs["answer_logits"] = self._packed_forward(
                prompt_ids, prompt_mask, generated, block_mask, answer_ids=answer_ids, answer_mask=answer_mask
            )["answer_logits"]
        real_blocks = block_mask.float()
        if self.config.velocity_parameterization == "token_readout":
            flow_error = (outputs["clean_latents"] - latents).pow(2).mean(dim=(-1, -2))
        else:
            flow_error = (outputs["velocity"] - velocity_target.view_as(latents)).pow(2).mean(dim=(-1, -2))
        return outputs, (flow_error * real_blocks).sum() / real_blocks.sum().clamp(min=1)

    def _rollout_latents(self, prompt_ids, prompt_mask, block_mask, num_denoise_steps: int) -> torch.Tensor:
        """Blocks ``(B, Bm, L, D)`` denoised from noise one after another by Euler steps, differentiably."""
        batch, num_blocks = block_mask.shape
        device = prompt_ids.device
        shape = (batch, self.config.latent_tokens_per_block, self.config.latent_dim)
        timesteps = sampling.flow_matching_timesteps(num_denoise_steps, self.config.timestep_shift).to(device)
        blocks = []
        for block in range(num_blocks):
            # blocks from `block` on are invisible to the noisy copy of `block`: zeros stand in for them
            context = torch.stack(blocks + [torch.zeros(shape, device=device)] * (num_blocks - len(blocks)), dim=1)
            z = self.config.initial_noise_scale * torch.randn(shape, device=device)
            for step in range(num_denoise_steps):
                t, t_next = timesteps[step].expand(batch), timesteps[step + 1].expand(batch)
                velocity = self._packed_forward(
                    prompt_ids,
                    prompt_mask,
                    context,
                    block_mask,
                    noisy_latents=z[:, None],
                    noisy_timesteps=t[:, None],
                    noisy_block_index=torch.full((batch, 1), block, device=device),
                )["velocity"][:, 0]
                z = sampling.euler_step(z, velocity, t, t_next)
            blocks.append(z)
        return torch.stack(blocks, dim=1)

    def denoising_log_probs(
        self,
        prompt_ids,
        prompt_mask,
        step_latents,
        timesteps,
        mean_offsets,
        block_mask,
        step_indices,
        sde_noise_level: float,
        cfg_scale: float = 1.0,
        detach_velocity_features: bool = False,
    ) -> dict:
        """Log-probabilities of recorded denoising transitions under the current weights.

        ``step_latents`` ``(B, Bm, K + 1, L, D)`` and ``mean_offsets`` ``(B, Bm, K, L, D)`` come from the sampler's
        :class:`~trl_ladi.pipeline.LatentTrace`; ``step_indices`` ``(B, S)`` picks which of the ``K`` steps of every
        block to score (the same subset for every block of a row). The step is :func:`trl_ladi.sampling.policy_step`,
        as in the sampler; with ``cfg_scale != 1`` every scored step is fed twice, with and without the prompt, so the
        gradient reaches both velocities of the guided policy. ``detach_velocity_features=True`` stops the gradient at
        the velocity head's input, so that only the head learns from these log-probabilities and the parameters it
        shares with the answer decoder move only by the answer's own loss. Returns ``log_probs`` and ``means`` of shape
        ``(B, Bm, S)`` / ``(B, Bm, S, L, D)`` and ``stds`` ``(B, Bm, S)``.
        """
        batch, num_blocks = block_mask.shape
        num_steps = step_indices.shape[1]
        device = step_latents.device
        blocks = torch.arange(num_blocks, device=device)[None, :, None].expand(batch, -1, num_steps)
        steps = step_indices[:, None, :].expand(-1, num_blocks, -1)
        rows = torch.arange(batch, device=device)[:, None, None].expand_as(blocks)
        current = step_latents[rows, blocks, steps]  # z_t, (B, Bm, S, L, D)
        following = step_latents[rows, blocks, steps + 1]  # the sample z_{t-d}
        t, t_next = timesteps[steps], timesteps[steps + 1]
        noisy_latents, noisy_timesteps, noisy_block_index = current.flatten(1, 2), t.flatten(1), blocks.flatten(1)
        guided = cfg_scale != 1.0
        drop_prompt = None
        if guided:  # the same copies again, without the prompt: the unconditional velocities
            noisy_latents = torch.cat([noisy_latents, noisy_latents], 1)
            noisy_timesteps = torch.cat([noisy_timesteps, noisy_timesteps], 1)
            noisy_block_index = torch.cat([noisy_block_index, noisy_block_index], 1)
            copy_index = torch.arange(noisy_block_index.shape[1], device=device).expand(batch, -1)
            drop_prompt = copy_index >= num_blocks * num_steps
        if self.config.velocity_parameterization == "token_posterior":
            if guided:
                raise ValueError("A 'token_posterior' model has no unconditional prior: use cfg_scale=1.0.")
            velocity = self._posterior_step_velocities(
                prompt_ids, prompt_mask, step_latents[:, :, -1], block_mask, current, t, detach_velocity_features
            )
        else:
            velocity = self._packed_forward(
                prompt_ids,
                prompt_mask,
                step_latents[:, :, -1],
                block_mask,
                noisy_latents=noisy_latents,
                noisy_timesteps=noisy_timesteps,
                noisy_block_index=noisy_block_index,
                drop_prompt=drop_prompt,
                detach_velocity_features=detach_velocity_features,
            )["velocity"]
        # one denoising step per row, (B * Bm * S, L, D), as the sampler's steps
        velocity, velocity_uncond = velocity.chunk(2, dim=1) if guided else (velocity, None)
        mean, std = sampling.policy_step(
            current.flatten(0, 2),
            velocity.flatten(0, 1),
            t.flatten(),
            t_next.flatten(),
            sde_noise_level,
            self.config.sde_max_t,
            velocity_uncond=None if velocity_uncond is None else velocity_uncond.flatten(0, 1),
            cfg_scale=cfg_scale,
            mean_offset=mean_offsets[rows, blocks, steps].flatten(0, 2),
        )
        std = std.view(batch, num_blocks, num_steps)
        log_probs = sampling.gaussian_log_prob(following.flatten(0, 2), mean, std.flatten())
        return {"log_probs": log_probs.view_as(std), "means": mean.view_as(current), "stds": std}

    def _posterior_step_velocities(
        self, prompt_ids, prompt_mask, latents, block_mask, step_latents, t, detach_features: bool
    ) -> torch.Tensor:
        """Token-posterior velocities ``(B, Bm * S, L, D)`` of the recorded steps ``step_latents``
        ``(B, Bm, S, L, D)`` at times ``t`` ``(B, Bm, S)``.

        The sampler read slot ``j``'s prior once, from the finished slots before it, so the prior of every step is
        read here from the finished blocks ``latents`` ``(B, Bm, L, D)``: one causal copy per block at time 0 (where
        a denoiser adapter acts, as in the sampler), whatever the number of steps scored.
        """
        batch, num_blocks = block_mask.shape
        slot_logits = self._packed_forward(
            prompt_ids,
            prompt_mask,
            latents,
            block_mask,
            noisy_latents=latents,
            noisy_timesteps=torch.zeros(batch, num_blocks, device=latents.device),
            noisy_block_index=torch.arange(num_blocks, device=latents.device).expand(batch, -1),
            detach_velocity_features=detach_features,
        )["slot_logits"]  # (B, Bm, L, V)
        prior = slot_logits[:, :, None]  # (B, Bm, 1, L, V): every step of a block reads the same prior
        return self.posterior_velocity(prior, step_latents, t).flatten(1, 2)

    def answer_log_probs(self, prompt_ids, prompt_mask, latents, block_mask, answer_ids, answer_mask, temperature=1.0):
        """Per-token log-probabilities (and entropies) of answers given prompt and clean latents, ``(B, A)``."""
        logits = self._packed_forward(
            prompt_ids, prompt_mask, latents, block_mask, answer_ids=answer_ids, answer_mask=answer_mask
        )["answer_logits"] / temperature
        log_softmax = logits.log_softmax(-1)
        token_log_probs = log_softmax.gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        return {"log_probs": token_log_probs, "entropy": entropy}

    def forward(self, task: str = "reasoner", **inputs):
        """The single trainable entry point (so DDP and DeepSpeed hooks fire). ``task`` is one of
        ``"vae"`` (:meth:`vae_loss`), ``"reasoner"`` (:meth:`reasoner_loss`), ``"denoising_log_probs"``,
        ``"answer_log_probs"``, or ``"policy"`` (both of the last two in one call: ``denoising`` and ``answer``
        keyword dicts)."""
        if task == "vae":
            return self.vae_loss(**inputs)
        if task == "reasoner":
            return self.reasoner_loss(**inputs)
        if task == "denoising_log_probs":
            return self.denoising_log_probs(**inputs)
        if task == "answer_log_probs":
            return self.answer_log_probs(**inputs)
        if task == "policy":
            outputs = {"denoising": self.denoising_log_probs(**inputs["denoising"])}
            if inputs.get("answer") is not None:
                outputs["answer"] = self.answer_log_probs(**inputs["answer"])
            return outputs
        raise ValueError(
            f"Unknown task '{task}'; use one of 'vae', 'reasoner', 'denoising_log_probs', 'answer_log_probs', 'policy'."
        )

    # ------------------------------------------------------------------ cached steps (the loop is in pipeline.py)

    def prefill(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, static_cache_length: int | None = None
    ) -> ReasonerContext:
        """Read left-padded prompts ``(R, P)`` into a fresh key/value cache (causal, padding masked).

        ``static_cache_length``: a ``StaticCache`` of that many positions per row instead of a growing
        ``DynamicCache`` (see :class:`ReasonerContext`; :meth:`static_cache_length` says how many a pass needs).

        Consecutive identical rows (the ``N`` latents of a prompt) are read once and their cache repeated: the same
        keys and values, a ``N``-th of the prefill's work. A static cache reads every row (its shapes must not change).
        """
        if static_cache_length is None and prompt_ids.shape[0] > 1:
            starts_a_run = torch.ones(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
            same_prompt = (prompt_ids[1:] == prompt_ids[:-1]).all(-1) & (prompt_mask[1:] == prompt_mask[:-1]).all(-1)
            starts_a_run[1:] = ~same_prompt
            if not bool(starts_a_run.all()):
                shared = self._read_prompts(prompt_ids[starts_a_run], prompt_mask[starts_a_run], None)
                context = shared.select_rows(starts_a_run.cumsum(0) - 1)  # each row gets its run's cache
                context.num_lm_tokens = shared.num_lm_tokens
                return context
        return self._read_prompts(prompt_ids, prompt_mask, static_cache_length)

    def _read_prompts(self, prompt_ids, prompt_mask, static_cache_length: int | None) -> ReasonerContext:
        """:meth:`prefill`'s forward: every row read into a fresh cache."""
        rows, prompt_length = prompt_ids.shape
        device = prompt_ids.device
        if static_cache_length is None:
            cache = DynamicCache(config=self.config.text_config)
        elif static_cache_length < prompt_length:
            raise ValueError(f"static_cache_length={static_cache_length} is shorter than the prompts ({prompt_length}).")
        else:
            cache = self.reusable_static_cache(rows, static_cache_length, "latents")
        context = ReasonerContext(
            cache=cache,
            static_length=static_cache_length,
            key_is_real=prompt_mask.bool(),
            key_is_prompt=torch.ones_like(prompt_mask, dtype=torch.bool),
            prompt_lengths=prompt_mask.sum(-1, keepdim=True),
            num_real_blocks=torch.zeros(rows, dtype=torch.long, device=device),
        )
        causal = torch.tril(torch.ones(prompt_length, prompt_length, dtype=torch.bool, device=device))
        allowed = causal[None] & prompt_mask.bool()[:, None, :]
        allowed |= torch.eye(prompt_length, dtype=torch.bool, device=device)[None]  # no empty row (padding queries)
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        self._cached_forward(context, self._token_embeddings(prompt_ids), allowed, positions)
        return context

    def reusable_static_cache(self, rows: int, length: int, purpose: str) -> StaticCache:
        """An empty ``StaticCache`` of ``rows`` x ``length`` positions: the same object, in the same memory, as the last
        pass with these sizes got for ``purpose`` ("latents", "answers"). A compiled decoder's CUDA graphs point at
        the cache's buffers, so a new cache every pass would have them recorded again. One cache per purpose is kept;
        it holds ``rows x length x layers`` keys and values until the sizes change."""
        sizes = (rows, length, self.dtype, self.device)
        kept = self._static_caches.get(purpose)
        if kept is not None and kept[0] == sizes:
            cache = kept[1]
            for layer in cache.layers:  # positions not written yet are masked, but 0 x NaN is NaN: zeros, in place
                layer.keys.zero_()
                layer.values.zero_()
                layer.cumulative_length.zero_()
            return cache
        text_config = self.config.text_config
        cache = StaticCache(config=text_config, max_cache_len=length)
        if any(type(layer) is not StaticLayer for layer in cache.layers):  # e.g. StaticSlidingWindowLayer
            raise ValueError(
                "A static cache needs full attention in every layer; this base model has sliding-window layers. Use "
                "the default growing cache (static_cache=False, cache_implementation=None)."
            )
        # allocated now, not at the first write: a first write inside a compiled forward would compile it twice
        num_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        dtype = self.language_model.get_input_embeddings().weight.dtype
        cache.early_initialization(rows, num_heads, head_dim, dtype, self.device)
        self._static_caches[purpose] = (sizes, cache)
        return cache

    def compile_cached_steps(self, **compile_options):
        """Run the sampler's steps against a static cache (prompt, noisy block or slot, finished block, answer token)
        through ``torch.compile(decoder.forward, fullgraph=True, **compile_options)``, e.g. ``mode="reduce-overhead"``
        for CUDA graphs. Only static-cache contexts use it (each kind of step has one shape there; a growing cache
        would compile at every step), and the training forward stays as it is. The first pass compiles (minutes for a
        real model); docs/model.md, "A static cache, for a compiled decoder"."""
        forward = self.language_model.get_decoder().forward
        self._compiled_cached_step = torch.compile(forward, fullgraph=True, **compile_options)
        return self

    def static_cache_length(
        self, prompt_length: int, max_blocks: int, max_new_tokens: int, multiple_of: int = STATIC_SHAPE_MULTIPLE
    ):
        """Positions per row that a sampling pass can fill: the prompt, ``max_blocks`` finished blocks, then the
        larger of an open noisy block and the answer (``<soa>`` and ``max_new_tokens`` tokens). Rounded up to a
        multiple of ``multiple_of`` so that prompts of nearby lengths share one shape (one compiled graph)."""
        layout = self.block_layout
        needed = prompt_length + max_blocks * layout.width + max(layout.noisy_width, max_new_tokens + 1)
        return -(-needed // multiple_of) * multiple_of

    def denoising_velocity(
        self, context: ReasonerContext, latents: torch.Tensor, t: torch.Tensor, see_prompt: bool = True
    ) -> torch.Tensor:
        """The velocity ``(R, L, D)`` (float32 or wider) of the next block at noisy latents ``z_t`` ``(R, L, D)`` and
        times ``t`` ``(R,)``.

        Feeds only the ``L + 2`` tokens ``<bot>, t-embed, z_t`` against the cache, at the next block's positions, and
        cuts them off again: a noisy block is context for nothing. ``see_prompt=False`` hides the prompt's keys (the
        unconditional velocity of classifier-free guidance); the finished blocks in the cache did read the prompt.
        A token-posterior denoiser reads its slots one at a time instead: see :meth:`next_slot_prior`.
        """
        if self.config.velocity_parameterization == "token_posterior":
            raise ValueError(
                "A 'token_posterior' denoiser reads each slot's prior from the finished slots before it: use "
                "next_slot_prior and posterior_velocity (LaDiRPipeline does)."
            )
        time_embedding, inputs_embeds, allowed, positions = self.noisy_block_inputs(context, latents, t, see_prompt)
        with self._denoiser_adapter_at(None):  # every position fed is the noisy block's
            hidden = self._cached_forward(context, inputs_embeds, allowed, positions)
        context.cache.crop(-self.block_layout.noisy_width)
        if self.config.velocity_parameterization == "token_readout" and context.latent_codebook is None:
            context.latent_codebook = self.latent_codebook()  # a constant of the pass: not once per denoising step
        return self._velocity(hidden, latents, t, time_embedding, codebook=context.latent_codebook)["velocity"]

    def noisy_block_inputs(
        self, context: ReasonerContext, latents: torch.Tensor, t: torch.Tensor, see_prompt: bool = True
    ):
        """What a denoising step feeds the LM against the context's cache: the time embeddings ``(R, H)`` (also read by
        the adaLN head), the ``L + 2`` input embeddings ``<bot>, t-embed, z_t``, which cached keys and noisy positions
        each may see ``(R, L + 2, cached + L + 2)``, and their position ids (the next block's)."""
        layout = self.block_layout
        time_embedding = self.timestep_embedding(t)
        inputs_embeds = self._block_embeddings(latents, time_embedding, with_eot=False)
        keys = context.key_is_real if see_prompt else context.key_is_real & ~context.key_is_prompt
        block = torch.ones(layout.noisy_width, layout.noisy_width, dtype=torch.bool, device=keys.device)
        if self.causal_noisy_blocks:
            block = block.tril()  # else bidirectional
        allowed = torch.cat(
            [keys[:, None, :].expand(-1, layout.noisy_width, -1), block.expand(context.rows, -1, -1)], 2
        )
        positions = layout.position_ids(context.prompt_lengths, context.num_blocks, layout.noisy_width)
        return time_embedding, inputs_embeds, allowed, positions

    def next_slot_prior(self, context: ReasonerContext, finished_slot: torch.Tensor | None = None) -> torch.Tensor:
        """Token posterior, the sampler's step: the prior logits ``(R, V)`` of the next slot of the block being written.

        ``finished_slot=None`` opens the block: feeds ``<bot>, t=0`` and returns slot 0's prior. Each later call feeds
        the latent ``(R, D)`` that the last slot ended at and returns the next slot's prior. The block is fed as the
        noisy copy at time 0 that the RL loss reads (causal, the denoiser adapter on), one position per slot; these
        positions stay in the cache until :meth:`append_block` finishes the block: it keeps them where they are the
        finished block's own first positions, and cuts them off otherwise.
        """
        layout = self.block_layout
        rows, device = context.rows, context.key_is_real.device
        if finished_slot is None:
            if context.num_open_slot_positions:
                raise RuntimeError("A block is being written already: finish it with append_block first.")
            time_embedding = self.timestep_embedding(torch.zeros(rows, device=device))
            inputs_embeds = torch.cat([self._marker("bot", rows, 1), time_embedding[:, None]], dim=1)
        else:
            inputs_embeds = self.reasoner_latent_in(finished_slot.to(self.dtype))[:, None]
        num_new, num_open = inputs_embeds.shape[1], context.num_open_slot_positions
        if num_open + num_new > layout.noisy_width - 1:
            raise RuntimeError(f"All {layout.num_latent_tokens} slots of the block have their prior already.")
        causal = torch.ones(num_new, num_open + num_new, dtype=torch.bool, device=device).tril(num_open)
        allowed = torch.cat([context.key_is_real[:, None, :].expand(-1, num_new, -1), causal.expand(rows, -1, -1)], 2)
        positions = layout.position_ids(context.prompt_lengths, context.num_blocks, layout.noisy_width)
        with self._denoiser_adapter_at(None):  # every position fed is the noisy block's
            hidden = self._cached_forward(context, inputs_embeds, allowed, positions[:, num_open : num_open + num_new])
        context.num_open_slot_positions += num_new
        return _float32_or_wider(self._lm_logits(hidden[:, -1]))

    def append_block(self, context: ReasonerContext, latents: torch.Tensor, is_real: torch.Tensor) -> torch.Tensor:
        """Append a finished block ``<bot>, t=0, z_0, <eot>`` (``latents`` ``(R, L, D)``) to the context and return
        the stop logits ``(R, 2)`` read at its ``<eot>`` (``CONTINUE`` another block, or ``ANSWER``).

        ``is_real`` ``(R,)`` is false for rows that have already stopped: they get the block too, masked out, so that
        every row keeps the same cache length.
        """
        layout = self.block_layout
        rows, device = context.rows, latents.device
        inputs_embeds = self._block_embeddings(
            latents, self.timestep_embedding(torch.zeros(rows, device=device)), with_eot=True
        )
        inside = torch.ones(layout.width, layout.width, dtype=torch.bool, device=device)
        inside[: layout.eot, layout.eot] = False  # <bot>, t, z do not see <eot>; <eot> sees the whole block
        if self.causal_clean_blocks:
            inside = inside.tril()
        allowed = torch.cat(
            [context.key_is_real[:, None, :].expand(-1, layout.width, -1), inside.expand(rows, -1, -1)], 2
        )
        positions = layout.position_ids(context.prompt_lengths, context.num_blocks, layout.width)
        # A token posterior's noisy copy, fed slot by slot, is context for nothing. Without a denoiser adapter (and in
        # a growing cache) it was fed exactly as the finished block's first positions are: <bot>, t = 0, then the
        # slots where they ended, causal. Those stay; only the last slot and <eot> are fed. Otherwise it is cut off.
        num_kept = context.num_open_slot_positions if self._noisy_copy_is_the_clean_block(context) else 0
        if context.num_open_slot_positions > num_kept:
            context.cache.crop(-context.num_open_slot_positions)
        context.num_open_slot_positions = 0
        hidden = self._cached_forward(
            context, inputs_embeds[:, num_kept:], allowed[:, num_kept:], positions[:, num_kept:]
        )
        block_is_real = is_real[:, None].expand(-1, layout.width)
        context.key_is_real = torch.cat([context.key_is_real, block_is_real], 1)
        context.key_is_prompt = torch.cat([context.key_is_prompt, torch.zeros_like(block_is_real)], 1)
        context.num_blocks += 1
        context.num_real_blocks = context.num_real_blocks + is_real.long()
        return self._stop_logits(hidden[:, layout.eot - num_kept])[0]

    def _noisy_copy_is_the_clean_block(self, context: ReasonerContext) -> bool:
        """Whether the positions :meth:`next_slot_prior` fed for the block being finished hold what :meth:`append_block`
        would feed there: every slot but the last was fed (``L + 1`` positions), no denoiser adapter changes the noisy
        copy, both copies are causal (a token posterior, which the config never pairs with ``causal_denoiser``'s
        lookahead), and the cache grows (a static one keeps its shapes)."""
        return (
            context.num_open_slot_positions == self.block_layout.num_latent_tokens + 1
            and self.config.denoiser_lora_rank == 0
            and self.causal_clean_blocks
            and context.static_length is None
        )

    def answer_step(self, context: ReasonerContext, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed the next answer position and return the next-token logits ``(R, V)`` (float32 or wider).

        The first call (``token_ids=None``) feeds ``<soa>``; later calls feed the tokens ``(R,)`` sampled last. The
        answer starts where each row's next real block would, and sees the prompt and the row's real blocks.
        """
        if token_ids is None:
            inputs_embeds = self._marker("soa", context.rows, 1)
        else:
            inputs_embeds = self._token_embeddings(token_ids[:, None])
        keys = torch.cat([context.key_is_real, context.key_is_real.new_ones(context.rows, 1)], 1)
        answer_start = self.block_layout.position_ids(context.prompt_lengths, context.num_real_blocks[:, None], 1)
        positions = answer_start + context.num_answer_tokens
        hidden = self._cached_forward(context, inputs_embeds, keys[:, None, :], positions)
        context.key_is_real = keys
        context.num_answer_tokens += 1
        return _float32_or_wider(self._lm_logits(hidden[:, -1]))

    def _cached_forward(self, context: ReasonerContext, inputs_embeds, allowed, position_ids) -> torch.Tensor:
        """Feed new positions ``(R, N, H)`` against the context's cache; ``allowed`` ``(R, N, cached + N)`` says which
        keys each new position may see. Returns their hidden states and counts the positions fed."""
        context.num_lm_tokens += inputs_embeds.shape[0] * inputs_embeds.shape[1]
        # one layout per shape: a marker alone (`<soa>`) is an expanded view of a parameter (stride 0, and requires_grad
        # even under no_grad), which a compiled decoder would compile apart from the answer tokens of the same shape
        inputs_embeds = inputs_embeds.contiguous()
        if not torch.is_grad_enabled():
            inputs_embeds = inputs_embeds.detach()
        if context.static_length is not None:  # the static cache's positions not written yet are masked
            if allowed.shape[-1] > context.static_length:
                raise RuntimeError(
                    f"The static cache holds {context.static_length} positions per row and this step needs "
                    f"{allowed.shape[-1]}: pass a larger static_cache_length (LaDiRModel.static_cache_length)."
                )
            allowed = torch.nn.functional.pad(allowed, (0, context.static_length - allowed.shape[-1]), value=False)
        forward = self._compiled_cached_step if context.static_length is not None else None
        return self._decoder_hidden_states(
            inputs_embeds, self._additive_mask(allowed), position_ids, cache=context.cache, forward=forward
        )


def tokenize_prompts(
    tokenizer, prompts: list, device=None, pad_token_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of plain prompts (tokenized as they are, without added special tokens) or of
    conversations (chat template with a generation prompt).

    The one prompt format of the package: the LaDiR stages, the sampler, the RL trainer and the token-level pass@k
    baseline all read prompts through it. ``pad_token_id`` defaults to the tokenizer's, which must then exist.
    """
    if pad_token_id is None:
        check_tokenizer(tokenizer)
        pad_token_id = tokenizer.pad_token_id
    if getattr(tokenizer, "chat_template", None) is None and not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(
            "The prompts are chat messages, but the tokenizer has no chat template to format them. Use the tokenizer "
            "of an instruct model, set `tokenizer.chat_template`, or give the prompts as plain strings."
        )
    texts = [
        prompt
        if isinstance(prompt, str)
        else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    length = max(len(ids) for ids in encoded)
    prompt_ids = torch.full((len(encoded), length), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        if ids:
            prompt_ids[row, length - len(ids) :] = torch.tensor(ids)
            prompt_mask[row, length - len(ids) :] = 1
    return prompt_ids.to(device), prompt_mask.to(device)


def check_tokenizer(tokenizer):
    """The tokens LaDiR needs from a tokenizer: a pad token and an end-of-sequence token."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no eos token; answers need one to end. Set it, e.g. `tokenizer.eos_token = '</s>'` "
            "with a token the base model knows."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token. Set one before training, e.g. `tokenizer.pad_token = tokenizer.eos_token`."
        )


# `AutoConfig` / `AutoModel` (and `AutoTokenizer`, which reads config.json) know a saved LaDiR folder.
AutoConfig.register(LaDiRConfig.model_type, LaDiRConfig)
AutoModel.register(LaDiRConfig, LaDiRModel)
