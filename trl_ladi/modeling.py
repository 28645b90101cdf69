"""`LaDiRConfig` and `LaDiRModel`: one causal LM that encodes, denoises and decodes latent reasoning blocks.

One base LM is shared by every role, so a large model is held in memory once:

* VAE encoder: the LM with the ``"encoder"`` LoRA adapter reads a reasoning sentence followed by ``L`` learned query
  tokens; linear heads on the query positions give ``mu, logvar`` of ``L`` latent tokens of size ``D``.
* VAE decoder: the LM with adapters off reads ``latent_in(z), <ae>`` and reconstructs the sentence.
* Reasoner (the diffusion policy) and answer decoder: the LM with the ``"reasoner"`` adapter reads

      prompt, [<bot>, t-embed, z_1..z_L, <eot>] x blocks, <soa>, answer tokens

  Attention is causal across blocks and bidirectional inside a block (``<eot>`` sees its whole block). The block
  being denoised is ``<bot>, t-embed, z_t,1..z_t,L``; an adaLN head maps its hidden states to the velocity. A stop
  head at each ``<eot>`` says "another block" (0) or "start the answer" (1).

Two ways to run the reasoner give the same numbers (tested):
* ``_packed_forward``: one forward over a whole trace, used for training. Noisy copies of a block sit at the
  block's positions and see only what that block saw, so many denoising steps are scored in one pass.
* the cached sampler (``sample``): the prompt and finished blocks live in a key/value cache; a denoising step feeds
  only the ``L + 2`` tokens of the block being denoised and the cache is cut back afterwards; the ``M`` answers of
  a latent are decoded from one shared prefill.
"""

import contextlib
import math
import time
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
)

from trl_ladi import sampling

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENCODER_ADAPTER, REASONER_ADAPTER = "encoder", "reasoner"
CONTINUE, ANSWER = 0, 1  # stop-head classes
REASONER_MARKERS = {"bot": 0, "eot": 1, "soa": 2}  # rows of `marker_embeddings`


class LaDiRConfig(PretrainedConfig):
    r"""Configuration of a [`LaDiRModel`].

    Args:
        text_config (`dict` or `PretrainedConfig`): config of the base causal LM (Llama, Qwen2, Qwen3, Mistral).
        latent_tokens_per_block (`int`, defaults to 4): latent tokens ``L`` per reasoning block (one sentence).
        latent_dim (`int`, defaults to 128): size ``D`` of one latent token.
        max_blocks (`int`, defaults to 6): most latent blocks the reasoner writes before it must answer.
        encoder_lora_rank / reasoner_lora_rank (`int`): LoRA ranks of the VAE encoder and of the reasoner adapters.
        lora_alpha_ratio (`float`, defaults to 2.0): LoRA alpha as a multiple of the rank.
        lora_target_modules (`list[str]`): linear layers of the base LM that get adapters.
        timestep_embedding_dim (`int`, defaults to 256): sinusoidal features of the diffusion time.
        latent_scaling_factor (`float`, defaults to 1.0): reasoner latents are ``scaling_factor * mu``, so that they
            have about unit variance (set after the VAE stage from the data, as Stable Diffusion's VAE factor).
        num_denoise_steps (`int`, defaults to 10): default sampler steps per block.
        timestep_shift (`float`, defaults to 1.0): shift of the flow-matching schedule (diffusers' meaning).
        initial_noise_scale (`float`, defaults to 2.0): std of the noise a block starts from (LaDiR: 2.0).
        sde_max_t (`float`, defaults to 0.9): cap on ``t`` inside the SDE noise level ``sqrt(t / (1 - t))``.
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
        lora_alpha_ratio: float = 2.0,
        lora_target_modules: list[str] | None = None,
        timestep_embedding_dim: int = 256,
        latent_scaling_factor: float = 1.0,
        num_denoise_steps: int = 10,
        timestep_shift: float = 1.0,
        initial_noise_scale: float = 2.0,
        sde_max_t: float = 0.9,
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
        self.lora_alpha_ratio = lora_alpha_ratio
        self.lora_target_modules = list(lora_target_modules or DEFAULT_LORA_TARGETS)
        self.timestep_embedding_dim = timestep_embedding_dim
        self.latent_scaling_factor = latent_scaling_factor
        self.num_denoise_steps = num_denoise_steps
        self.timestep_shift = timestep_shift
        self.initial_noise_scale = initial_noise_scale
        self.sde_max_t = sde_max_t
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


@dataclass
class LatentTrace:
    """What the sampler recorded for a batch of latent reasoning traces (``R`` rows, ``Bm`` blocks, ``K`` steps).

    ``step_latents[:, b, k]`` is ``z`` before step ``k`` of block ``b``; ``step_latents[:, b, K]`` is the clean
    block. ``guidance[:, b, k]`` is the offset that was added to the mean of step ``k``; it is kept so that the
    log-probability of the same transition can be recomputed exactly. ``num_blocks[r]`` blocks of row ``r`` are
    real; later blocks were computed for the batch but are masked out everywhere.
    """

    step_latents: torch.Tensor = None  # (R, Bm, K + 1, L, D)
    timesteps: torch.Tensor = None  # (K + 1,)
    step_means: torch.Tensor = None  # (R, Bm, K, L, D)
    step_stds: torch.Tensor = None  # (R, Bm, K)
    step_log_probs: torch.Tensor = None  # (R, Bm, K)
    guidance: torch.Tensor = None  # (R, Bm, K, L, D)
    num_blocks: torch.Tensor = None  # (R,)
    block_mask: torch.Tensor = None  # (R, Bm)
    num_lm_tokens: int = 0  # positions fed to the LM while sampling (shows the cache at work)
    denoise_seconds: float = 0.0

    @property
    def latents(self) -> torch.Tensor:
        """The clean latent blocks, ``(R, Bm, L, D)``."""
        return self.step_latents[:, :, -1]


@dataclass
class AnswerSamples:
    """Sampled answers: ``R * M`` rows, the ``M`` decodes of latent row ``r`` at ``r * M .. r * M + M - 1``."""

    completion_ids: list = None  # list of lists of token ids, cut after the first end-of-sequence token
    trace: LatentTrace = None
    texts: list = None
    latents: torch.Tensor = None  # (R, Bm, L, D), zero on masked blocks
    token_entropy: torch.Tensor = None  # (R * M,) mean entropy of the sampling distribution over each answer
    decode_seconds: float = 0.0


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
        hidden_size, latent_dim, num_latent_tokens = (
            config.text_config.hidden_size,
            config.latent_dim,
            config.latent_tokens_per_block,
        )
        embedding_std = getattr(config.text_config, "initializer_range", 0.02)

        # Learned input vectors: the VAE encoder's query tokens, the decoder's <ae> marker, and the reasoner's
        # <bot>, <eot>, <soa> markers. They are parameters of this module itself (not of a container module) so
        # that DeepSpeed ZeRO-3 gathers them with this module's forward.
        self.query_embeddings = nn.Parameter(torch.randn(num_latent_tokens, hidden_size) * embedding_std)
        self.vae_marker_embedding = nn.Parameter(torch.randn(hidden_size) * embedding_std)
        self.marker_embeddings = nn.Parameter(torch.randn(len(REASONER_MARKERS), hidden_size) * embedding_std)
        # VAE heads (encoder side) and the decoder's input projection.
        self.latent_mean_head = nn.Linear(hidden_size, latent_dim)
        self.latent_logvar_head = nn.Linear(hidden_size, latent_dim)
        self.vae_latent_in = nn.Linear(latent_dim, hidden_size)
        # Reasoner: input projection, time embedding, velocity head, stop head.
        self.reasoner_latent_in = nn.Linear(latent_dim, hidden_size)
        self.timestep_embedding = TimestepEmbedding(config.timestep_embedding_dim, hidden_size)
        self.velocity_head = AdaLNVelocityHead(hidden_size, latent_dim)
        self.stop_head = nn.Linear(hidden_size, 2)

        for adapter_name, rank in ((ENCODER_ADAPTER, config.encoder_lora_rank), (REASONER_ADAPTER, config.reasoner_lora_rank)):
            lora_config = LoraConfig(
                r=rank, lora_alpha=config.lora_alpha_ratio * rank, target_modules=config.lora_target_modules, lora_dropout=0.0
            )
            inject_adapter_in_model(lora_config, self.language_model, adapter_name=adapter_name)
        self._active_adapter = None
        self._set_adapter(REASONER_ADAPTER)
        self.post_init()
        self.generation_config = GenerationConfig()  # GRPOTrainer writes pad/eos ids into it

    def _init_weights(self, module):
        # Only our own heads are initialised here; the base LM keeps its weights.
        if module is self.velocity_head:
            # DiT: zero modulation and output, so training starts from a zero velocity.
            nn.init.zeros_(module.modulation[-1].weight)
            nn.init.zeros_(module.modulation[-1].bias)
            nn.init.zeros_(module.linear.weight)
            nn.init.zeros_(module.linear.bias)

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
            base_model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype or torch.float32)
        config = LaDiRConfig(
            text_config=base_model.config,
            latent_tokens_per_block=latent_tokens_per_block,
            latent_dim=latent_dim,
            **config_kwargs,
        )
        model = cls(config, language_model=base_model)
        model.config.base_model_name_or_path = getattr(base_model.config, "_name_or_path", None)
        return model

    # ------------------------------------------------------------------ adapters

    def _set_adapter(self, adapter_name: str | None):
        """Activate one LoRA adapter (or none: the plain base LM) without changing any ``requires_grad`` flag.

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
                    module.set_adapter(adapter_name)
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
        """What the VAE stage trains: encoder adapter, query tokens, mu/logvar heads, the decoder's input map."""
        heads = [self.query_embeddings, self.vae_marker_embedding]
        for module in (self.latent_mean_head, self.latent_logvar_head, self.vae_latent_in):
            heads.extend(module.parameters())
        return self.adapter_parameters(ENCODER_ADAPTER) + heads

    def reasoner_parameters(self) -> list[nn.Parameter]:
        """What the reasoner stage and RL train: reasoner adapter, markers, latent input, time embedding, heads."""
        heads = [self.marker_embeddings]
        for module in (self.reasoner_latent_in, self.timestep_embedding, self.velocity_head, self.stop_head):
            heads.extend(module.parameters())
        return self.adapter_parameters(REASONER_ADAPTER) + heads

    def train_only(self, parameters: list[nn.Parameter]):
        """Freeze everything, then unfreeze ``parameters``."""
        self.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)

    # ------------------------------------------------------------------ small helpers

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    def _token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(token_ids)

    def _marker(self, name: str, *leading: int) -> torch.Tensor:
        marker = self.vae_marker_embedding if name == "ae" else self.marker_embeddings[REASONER_MARKERS[name]]
        return marker.to(self.dtype).expand(*leading, self.hidden_size)

    def _decoder_hidden_states(self, inputs_embeds, attention_mask, position_ids, cache=None):
        """Run the base decoder (without the LM head) and return its last hidden states."""
        outputs = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return outputs.last_hidden_state

    def _lm_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_output_embeddings()(hidden_states)

    def _additive_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean ``(B, Q, K)`` allow-matrix -> the 4D additive float mask transformers expects."""
        dtype = self.language_model.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def _block_embeddings(self, latents: torch.Tensor, t: torch.Tensor, with_eot: bool) -> torch.Tensor:
        """``<bot>, t-embed, latent_in(z_1..z_L)[, <eot>]`` for latents ``(R, L, D)`` at times ``t`` ``(R,)``."""
        rows = latents.shape[0]
        parts = [
            self._marker("bot", rows, 1),
            self.timestep_embedding(t)[:, None],
            self.reasoner_latent_in(latents.to(self.dtype)),
        ]
        if with_eot:
            parts.append(self._marker("eot", rows, 1))
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ VAE

    def encode(self, sentence_ids: torch.Tensor, sentence_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE encoder: left-padded sentences ``(B, S)`` -> ``mu, logvar`` of shape ``(B, L, D)``."""
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

    def _vae_decoder_inputs(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae_latent_in(z), <ae>``: the prefix the frozen LM reconstructs a sentence from."""
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
        with adapters off, so only the encoder adapter, the heads and ``vae_latent_in`` learn.
        """
        mu, logvar = self.encode(sentence_ids, sentence_mask)
        latents = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # reparameterisation
        if latent_noise_std > 0:
            latents = latents + latent_noise_std * torch.randn_like(latents)  # LaDiR's latent noise augmentation
        prefix = self._vae_decoder_inputs(latents)
        inputs_embeds = torch.cat([prefix, self._token_embeddings(target_ids)], dim=1)
        attention_mask = torch.cat([target_mask.new_ones(prefix.shape[:2]), target_mask], dim=1)
        with self.using_adapter(None):
            hidden = self.language_model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        # position of <ae> predicts the first target token, and so on
        logits = self._lm_logits(hidden[:, prefix.shape[1] - 1 : -1]).float()
        token_loss = F.cross_entropy(logits.transpose(1, 2), target_ids, reduction="none")
        mask = target_mask.float()
        reconstruction_loss = (token_loss * mask).sum() / mask.sum().clamp(min=1)
        # KL(q(z|x) || N(0, I)), summed over the latent numbers and averaged over sentences
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(-1).mean()
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
        with self.using_adapter(None):
            token_ids = self.language_model.generate(
                inputs_embeds=prefix,
                attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        return tokenizer.batch_decode(token_ids, skip_special_tokens=True)

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
    ) -> dict:
        """One reasoner forward over whole traces: prompt, clean blocks, noisy block copies, answer.

        Shapes: prompt ``(B, P)`` left-padded; ``latents`` ``(B, Bm, L, D)`` clean blocks with ``block_mask``
        ``(B, Bm)``; ``noisy_latents`` ``(B, Q, L, D)`` at ``noisy_timesteps`` ``(B, Q)``, copy ``q`` standing in for
        block ``noisy_block_index[:, q]``; ``answer_ids`` ``(B, A)`` right-padded. ``drop_prompt`` ``(B,)`` hides
        the prompt from everything after it (classifier-free guidance training).

        Returns ``velocity`` ``(B, Q, L, D)``, ``stop_logits`` ``(B, Bm, 2)`` and ``answer_logits`` ``(B, A, V)``
        (the logits that predict ``answer_ids``).
        """
        device = prompt_ids.device
        batch, prompt_length = prompt_ids.shape
        num_blocks, num_latent_tokens = latents.shape[1], latents.shape[2]
        block_width = num_latent_tokens + 3  # <bot>, t, z_1..z_L, <eot>
        num_noisy = 0 if noisy_latents is None else noisy_latents.shape[1]
        answer_length = 0 if answer_ids is None else answer_ids.shape[1]
        block_mask = block_mask.bool()

        # --- inputs
        parts = [self._token_embeddings(prompt_ids)]
        clean_t = torch.zeros(batch * num_blocks, device=device)
        clean = self._block_embeddings(latents.flatten(0, 1), clean_t, with_eot=True)
        parts.append(clean.view(batch, num_blocks * block_width, -1))
        if num_noisy:
            noisy = self._block_embeddings(noisy_latents.flatten(0, 1), noisy_timesteps.flatten(), with_eot=False)
            parts.append(noisy.view(batch, num_noisy * (block_width - 1), -1))
        if answer_length:
            parts.append(torch.cat([self._marker("soa", batch, 1), self._token_embeddings(answer_ids)], dim=1))
        inputs_embeds = torch.cat(parts, dim=1)

        # --- one descriptor per position: its segment kind, block index, position id, and whether it is real
        # kinds: 0 prompt, 1 clean block, 2 noisy copy, 3 answer
        prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        prompt_lengths = prompt_mask.sum(-1, keepdim=True)
        within_block = torch.arange(block_width, device=device)
        block_index = torch.arange(num_blocks, device=device)
        kinds, blocks, segments, positions, real = [], [], [], [], []

        kinds.append(torch.zeros(batch, prompt_length, dtype=torch.long, device=device))
        blocks.append(torch.full((batch, prompt_length), -1, device=device))
        segments.append(torch.full((batch, prompt_length), -1, device=device))
        positions.append(prompt_positions)
        real.append(prompt_mask.bool())

        clean_blocks = block_index.repeat_interleave(block_width).expand(batch, -1)
        kinds.append(torch.ones_like(clean_blocks))
        blocks.append(clean_blocks)
        segments.append(clean_blocks)
        positions.append(prompt_lengths + clean_blocks * block_width + within_block.repeat(num_blocks))
        real.append(block_mask.repeat_interleave(block_width, dim=1))

        if num_noisy:
            width = block_width - 1
            noisy_blocks = noisy_block_index.repeat_interleave(width, dim=1)
            kinds.append(torch.full_like(noisy_blocks, 2))
            blocks.append(noisy_blocks)
            segments.append(num_blocks + torch.arange(num_noisy, device=device).repeat_interleave(width).expand(batch, -1))
            positions.append(prompt_lengths + noisy_blocks * block_width + within_block[:width].repeat(num_noisy))
            real.append(torch.ones_like(noisy_blocks, dtype=torch.bool))

        if answer_length:
            answer_real = torch.cat([answer_mask.new_ones(batch, 1), answer_mask], dim=1).bool()
            blocks_used = block_mask.sum(-1, keepdim=True)
            kinds.append(torch.full((batch, answer_length + 1), 3, device=device))
            blocks.append(torch.full((batch, answer_length + 1), num_blocks, device=device))  # sees every block
            segments.append(torch.full((batch, answer_length + 1), -2, device=device))
            positions.append(prompt_lengths + blocks_used * block_width + torch.arange(answer_length + 1, device=device))
            real.append(answer_real)

        kind, block, segment = torch.cat(kinds, 1), torch.cat(blocks, 1), torch.cat(segments, 1)
        position_ids, is_real = torch.cat(positions, 1), torch.cat(real, 1)
        sequence_index = torch.arange(kind.shape[1], device=device)

        # --- who may attend to whom (query rows, key columns)
        q_kind, k_kind = kind[:, :, None], kind[:, None, :]
        q_block, k_block = block[:, :, None], block[:, None, :]
        k_real = is_real[:, None, :]
        causal = sequence_index[None, :, None] >= sequence_index[None, None, :]
        same_segment = segment[:, :, None] == segment[:, None, :]
        key_is_prompt = k_kind == 0
        if drop_prompt is not None:
            key_is_prompt = key_is_prompt & ~((q_kind != 0) & drop_prompt.bool()[:, None, None])
        # every non-prompt query sees the (real) prompt; the prompt itself is causal
        allowed = key_is_prompt & ((q_kind != 0) | causal)
        # clean blocks before the query's block are context for blocks, noisy copies and the answer
        allowed |= (k_kind == 1) & (k_block < q_block)
        # inside a block: bidirectional among <bot>, t, z; the <eot> (last of its block) sees the block and itself
        is_eot = (kind == 1) & (((position_ids - prompt_lengths) % block_width) == block_width - 1)
        in_block = same_segment & ((q_kind == 1) | (q_kind == 2))
        allowed |= in_block & (~is_eot[:, None, :] | (is_eot[:, :, None] & causal))
        # the answer is causal among itself
        allowed |= (q_kind == 3) & (k_kind == 3) & causal
        allowed &= k_real
        allowed |= torch.eye(kind.shape[1], dtype=torch.bool, device=device)  # no empty row (padding queries)
        hidden = self._decoder_hidden_states(inputs_embeds, self._additive_mask(allowed), position_ids)

        # --- heads
        outputs = {}
        clean_start = prompt_length
        eot_hidden = hidden[:, clean_start + block_width - 1 : clean_start + num_blocks * block_width : block_width]
        outputs["stop_logits"] = self.stop_head(eot_hidden).float()
        if num_noisy:
            start = clean_start + num_blocks * block_width
            noisy_hidden = hidden[:, start : start + num_noisy * (block_width - 1)].view(batch, num_noisy, block_width - 1, -1)
            time_embedding = self.timestep_embedding(noisy_timesteps.flatten()).view(batch, num_noisy, -1)
            outputs["velocity"] = self.velocity_head(noisy_hidden[:, :, 2:], time_embedding).float()
        if answer_length:
            outputs["answer_logits"] = self._lm_logits(hidden[:, -answer_length - 1 : -1]).float()
        return outputs

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
    ) -> dict:
        """LaDiR's reasoner loss, ``flow + answer + stop`` weighted, on the VAE's latents (reasoner space).

        Each real block gets one noisy copy at a uniform random ``t`` with the flow-matching target ``eps - z_0``.
        With ``rollout_denoise_steps > 0`` (LaDiR's stage 2) the answer is read from latents the model generates
        itself from noise in that many Euler steps, with the gradient kept through the velocities, so the answer
        loss teaches the denoiser to write latents the decoder can answer from; the flow and stop losses on the
        VAE's latents stay as an anchor against latent collapse.
        """
        batch, num_blocks = block_mask.shape
        device = latents.device
        t = torch.rand(batch, num_blocks, device=device)
        noise = torch.randn_like(latents)
        noisy_latents, velocity_target = sampling.add_flow_noise(latents.flatten(0, 1), noise.flatten(0, 1), t.flatten())
        drop_prompt = torch.rand(batch, device=device) < prompt_dropout if prompt_dropout > 0 else None
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
        flow_error = (outputs["velocity"] - velocity_target.view_as(latents)).pow(2).mean(dim=(-1, -2))
        flow_loss = (flow_error * real_blocks).sum() / real_blocks.sum().clamp(min=1)
        # stop target: "answer" at the last real block, "continue" before it
        num_real = block_mask.sum(-1, keepdim=True)
        stop_target = (torch.arange(num_blocks, device=device)[None] == num_real - 1).long()
        stop_loss = F.cross_entropy(outputs["stop_logits"].transpose(1, 2), stop_target, reduction="none")
        stop_loss = (stop_loss * real_blocks).sum() / real_blocks.sum().clamp(min=1)
        answer_token_loss = F.cross_entropy(outputs["answer_logits"].transpose(1, 2), answer_ids, reduction="none")
        answer_weights = answer_mask.float()
        answer_loss = (answer_token_loss * answer_weights).sum() / answer_weights.sum().clamp(min=1)
        return {
            "loss": flow_weight * flow_loss + answer_weight * answer_loss + stop_weight * stop_loss,
            "flow_loss": flow_loss.detach(),
            "answer_loss": answer_loss.detach(),
            "stop_loss": stop_loss.detach(),
        }

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
        guidance,
        block_mask,
        step_indices,
        sde_noise_level: float,
    ) -> dict:
        """Log-probabilities of recorded denoising transitions under the current weights.

        ``step_latents`` ``(B, Bm, K + 1, L, D)`` and ``guidance`` ``(B, Bm, K, L, D)`` come from ``sample``;
        ``step_indices`` ``(B, S)`` picks which of the ``K`` steps of every block to score (the same subset for every
        block of a row). Returns ``log_probs`` and ``means`` of shape ``(B, Bm, S)`` / ``(B, Bm, S, L, D)`` and
        ``stds`` ``(B, Bm, S)``.
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
        velocity = self._packed_forward(
            prompt_ids,
            prompt_mask,
            step_latents[:, :, -1],
            block_mask,
            noisy_latents=current.flatten(1, 2),
            noisy_timesteps=t.flatten(1),
            noisy_block_index=blocks.flatten(1),
        )["velocity"].view_as(current)
        mean, std = sampling.sde_step_mean(
            current.flatten(0, 2), velocity.flatten(0, 2), t.flatten(), t_next.flatten(), sde_noise_level, self.config.sde_max_t
        )
        mean = mean.view_as(current) + guidance[rows, blocks, steps]
        std = std.view(batch, num_blocks, num_steps)
        log_probs = sampling.gaussian_log_prob(following.flatten(0, 2), mean.flatten(0, 2), std.flatten())
        return {"log_probs": log_probs.view_as(std), "means": mean, "stds": std}

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

    # ------------------------------------------------------------------ cached sampling (rollouts, inference)

    def _cached_step(self, cache, inputs_embeds, key_allowed, position_ids):
        """Feed new positions against the cache. ``key_allowed`` ``(R, cache_len + new)`` says which keys the new
        positions may see (the new positions see each other bidirectionally unless the caller restricts it)."""
        new = inputs_embeds.shape[1]
        allowed = key_allowed[:, None, :].expand(-1, new, -1)
        return self._decoder_hidden_states(inputs_embeds, self._additive_mask(allowed), position_ids, cache=cache)

    @torch.no_grad()
    def sample(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_latents: int = 1,
        latent_group_size: int | None = None,
        num_denoise_steps: int | None = None,
        sde_noise_level: float = 0.0,
        initial_noise_scale: float | None = None,
        cfg_scale: float = 1.0,
        diversity_guidance_scale: float = 0.0,
        max_blocks: int | None = None,
        num_decodes_per_latent: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
    ) -> AnswerSamples:
        """Sample latent reasoning traces and decode answers from them.

        Each prompt gets ``num_latents`` latent traces (rows ``p * N .. p * N + N - 1``), and every trace gets
        ``num_decodes_per_latent`` answers decoded from one shared prefill of prompt + latents.

        Blocks are denoised one after another from ``N(0, initial_noise_scale^2)`` with ``num_denoise_steps`` SDE
        steps (``sde_noise_level = 0``: deterministic Euler). Each step feeds only the ``L + 2`` tokens of the block
        being denoised against a key/value cache of the prompt and the finished blocks, and the cache is cut back
        afterwards. After each block the stop head decides between another block and the answer.

        ``latent_group_size`` (default ``num_latents``) says how many consecutive rows are latents of one prompt, for
        the repulsive diversity guidance; the RL trainer passes rows already repeated, with ``num_latents=1``.

        ``cfg_scale != 1`` adds classifier-free guidance; the unconditional velocity hides the prompt from the block
        being denoised (the finished blocks in the cache did see it). The CFG and diversity terms are recorded as
        ``guidance`` offsets of the step means.
        """
        config = self.config
        start_time = time.perf_counter()
        latent_group_size = latent_group_size or num_latents
        num_denoise_steps = num_denoise_steps or config.num_denoise_steps
        max_blocks = max_blocks or config.max_blocks
        initial_noise_scale = config.initial_noise_scale if initial_noise_scale is None else initial_noise_scale
        eos_token_ids = list(eos_token_ids or [])
        device, dtype = prompt_ids.device, self.dtype
        num_latent_tokens, latent_dim = config.latent_tokens_per_block, config.latent_dim
        block_width = num_latent_tokens + 3

        prompt_ids = prompt_ids.repeat_interleave(num_latents, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_latents, dim=0)
        rows, prompt_length = prompt_ids.shape
        prompt_lengths = prompt_mask.sum(-1, keepdim=True)
        timesteps = sampling.flow_matching_timesteps(num_denoise_steps, config.timestep_shift).to(device)

        # prefill the prompt (causal, left padding masked)
        cache = DynamicCache(config=self.config.text_config)
        causal = torch.tril(torch.ones(prompt_length, prompt_length, dtype=torch.bool, device=device))
        prompt_allowed = causal[None] & prompt_mask.bool()[:, None, :]
        prompt_allowed |= torch.eye(prompt_length, dtype=torch.bool, device=device)[None]
        self._decoder_hidden_states(
            self._token_embeddings(prompt_ids),
            self._additive_mask(prompt_allowed),
            (prompt_mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache,
        )
        num_lm_tokens = rows * prompt_length
        key_real = prompt_mask.bool()  # which cached keys are real, grows with the blocks
        key_is_prompt = torch.ones_like(key_real)

        record = {name: [] for name in ("step_latents", "step_means", "step_stds", "step_log_probs", "guidance")}
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        num_blocks = torch.zeros(rows, dtype=torch.long, device=device)
        block_mask = []
        for block in range(max_blocks):
            block_mask.append(~stopped)
            num_blocks += (~stopped).long()
            base_position = prompt_lengths + block * block_width
            noisy_positions = base_position + torch.arange(block_width - 1, device=device)
            z = initial_noise_scale * torch.randn(rows, num_latent_tokens, latent_dim, device=device, generator=generator)
            latents_per_step, means, stds, log_probs, offsets = [z], [], [], [], []
            for step in range(num_denoise_steps):
                t, t_next = timesteps[step].expand(rows), timesteps[step + 1].expand(rows)
                block_inputs = self._block_embeddings(z, t, with_eot=False)
                own = torch.ones(rows, block_width - 1, dtype=torch.bool, device=device)
                hidden = self._cached_step(cache, block_inputs, torch.cat([key_real, own], 1), noisy_positions)
                cache.crop(-(block_width - 1))  # the noisy block is not context for anything
                time_embedding = self.timestep_embedding(t)
                velocity = self.velocity_head(hidden[:, 2:], time_embedding).float()
                num_lm_tokens += rows * (block_width - 1)
                guidance = torch.zeros_like(z)
                if cfg_scale != 1.0:
                    unconditional_keys = torch.cat([key_real & ~key_is_prompt, own], 1)
                    hidden = self._cached_step(cache, block_inputs, unconditional_keys, noisy_positions)
                    cache.crop(-(block_width - 1))
                    velocity_uncond = self.velocity_head(hidden[:, 2:], time_embedding).float()
                    num_lm_tokens += rows * (block_width - 1)
                    guided = sampling.classifier_free_guidance(velocity, velocity_uncond, cfg_scale)
                    # the CFG change of the velocity, as an offset of the step's mean: the SDE mean with the guided
                    # velocity (in the drift and in eps_hat, as Flow-GRPO) minus the mean with the plain one
                    # (a = 0: exactly -d * (guided - velocity))
                    guided_mean = sampling.sde_step_mean(z, guided, t, t_next, sde_noise_level, config.sde_max_t)[0]
                    plain_mean = sampling.sde_step_mean(z, velocity, t, t_next, sde_noise_level, config.sde_max_t)[0]
                    guidance = guidance + (guided_mean - plain_mean)
                guidance = guidance + sampling.diversity_guidance(z, latent_group_size, t, t_next, diversity_guidance_scale)
                step_output = sampling.sde_step(  # sde_noise_level = 0 is the deterministic Euler step
                    z, velocity, t, t_next, sde_noise_level, config.sde_max_t, guidance=guidance, generator=generator
                )
                z = step_output.sample
                latents_per_step.append(z)
                means.append(step_output.mean)
                stds.append(step_output.std)
                log_probs.append(step_output.log_prob)
                offsets.append(guidance)
            record["step_latents"].append(torch.stack(latents_per_step, 1))
            record["step_means"].append(torch.stack(means, 1))
            record["step_stds"].append(torch.stack(stds, 1))
            record["step_log_probs"].append(torch.stack(log_probs, 1))
            record["guidance"].append(torch.stack(offsets, 1))

            # append the clean block to the context; its <eot> decides: another block, or the answer
            clean_inputs = self._block_embeddings(z, torch.zeros(rows, device=device), with_eot=True)
            inside = torch.ones(block_width, block_width, dtype=torch.bool, device=device)
            inside[:-1, -1] = False  # <bot>, t, z do not see <eot>
            allowed = torch.cat([key_real[:, None, :].expand(-1, block_width, -1), inside.expand(rows, -1, -1)], 2)
            positions = base_position + torch.arange(block_width, device=device)
            hidden = self._decoder_hidden_states(clean_inputs, self._additive_mask(allowed), positions, cache=cache)
            num_lm_tokens += rows * block_width
            block_is_real = block_mask[-1][:, None].expand(-1, block_width)
            key_real = torch.cat([key_real, block_is_real], 1)
            key_is_prompt = torch.cat([key_is_prompt, torch.zeros_like(block_is_real)], 1)
            wants_answer = self.stop_head(hidden[:, -1]).argmax(-1) == ANSWER
            stopped |= wants_answer
            if bool(stopped.all()):
                break

        trace = LatentTrace(
            step_latents=torch.stack(record["step_latents"], 1),
            timesteps=timesteps,
            step_means=torch.stack(record["step_means"], 1),
            step_stds=torch.stack(record["step_stds"], 1),
            step_log_probs=torch.stack(record["step_log_probs"], 1),
            guidance=torch.stack(record["guidance"], 1),
            num_blocks=num_blocks,
            block_mask=torch.stack(block_mask, 1),
            num_lm_tokens=num_lm_tokens,
            denoise_seconds=time.perf_counter() - start_time,
        )
        start_time = time.perf_counter()
        completion_ids, token_entropy, decode_tokens = self._decode_answers(
            cache, key_real, prompt_lengths + num_blocks[:, None] * block_width, num_decodes_per_latent,
            max_new_tokens, temperature, eos_token_ids, pad_token_id, generator,
        )
        trace.num_lm_tokens += decode_tokens
        latents = trace.latents * trace.block_mask[:, :, None, None]
        return AnswerSamples(
            completion_ids=completion_ids,
            trace=trace,
            latents=latents,
            token_entropy=token_entropy,
            decode_seconds=time.perf_counter() - start_time,
        )

    def _decode_answers(
        self, cache, key_real, answer_start, num_decodes, max_new_tokens, temperature, eos_token_ids, pad_token_id, generator
    ):
        """Sample ``num_decodes`` answers per row from the shared cache of prompt + latents (``<soa>`` first)."""
        device = key_real.device
        cache.batch_repeat_interleave(num_decodes)  # the prefix was computed once per latent
        key_real = key_real.repeat_interleave(num_decodes, dim=0)
        position = answer_start.repeat_interleave(num_decodes, dim=0)
        rows = key_real.shape[0]
        inputs_embeds = self._marker("soa", rows, 1)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens, fed = [], 0
        entropy_sum, entropy_count = torch.zeros(rows, device=device), torch.zeros(rows, device=device)
        for _ in range(max_new_tokens):
            key_real = torch.cat([key_real, torch.ones(rows, 1, dtype=torch.bool, device=device)], 1)
            hidden = self._cached_step(cache, inputs_embeds, key_real, position)
            fed += rows
            logits = self._lm_logits(hidden[:, -1]).float()
            log_probabilities = torch.log_softmax(logits / max(temperature, 1e-6), dim=-1)
            entropy_sum += (-(log_probabilities.exp() * log_probabilities).sum(-1)).masked_fill(finished, 0)
            entropy_count += (~finished).float()
            if temperature > 0:
                probabilities = torch.softmax(logits / temperature, dim=-1)
                next_tokens = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
            else:
                next_tokens = logits.argmax(-1)
            next_tokens = next_tokens.masked_fill(finished, pad_token_id)
            tokens.append(next_tokens)
            if eos_token_ids:
                finished |= torch.isin(next_tokens, torch.tensor(eos_token_ids, device=device))
            if bool(finished.all()):
                break
            inputs_embeds = self._token_embeddings(next_tokens[:, None])
            position = position + 1
        completion_ids = []
        for row in torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(rows)]:
            cut = next((i + 1 for i, token in enumerate(row) if token in eos_token_ids), len(row))
            completion_ids.append(row[:cut])
        return completion_ids, entropy_sum / entropy_count.clamp(min=1), fed

    @torch.no_grad()
    def sample_answers(self, tokenizer, prompts: list, num_latents: int = 1, num_decodes_per_latent: int = 1, **kwargs):
        """Text in, text out: tokenize ``prompts`` (strings or chat messages), sample, and decode the answers.

        Returns :class:`AnswerSamples` with ``texts`` (``len(prompts) * N * M`` strings, prompt-major, then latent,
        then decode) and ``latents`` ``(len(prompts) * N, Bm, L, D)``.
        """
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device=self.device)
        eos_token_ids = kwargs.pop("eos_token_ids", None) or [tokenizer.eos_token_id]
        samples = self.sample(
            prompt_ids,
            prompt_mask,
            num_latents=num_latents,
            num_decodes_per_latent=num_decodes_per_latent,
            eos_token_ids=eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        samples.texts = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
        return samples


def tokenize_prompts(tokenizer, prompts: list, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask for plain prompts or conversations (chat template with a generation prompt)."""
    check_tokenizer(tokenizer)
    if prompts and not isinstance(prompts[0], str):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    length = max(len(ids) for ids in encoded)
    prompt_ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
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
