from dataclasses import dataclass, field

from trl import GRPOConfig

SUPPORTED_LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo", "luspo")
LATENT_UTILITIES = ("mean", "max", "min")
LATENT_POLICY_PARAMETERS = ("velocity_head", "denoiser_adapter", "reasoner")


@dataclass
class LaDiRLConfig(GRPOConfig):
    r"""Configuration for [`LaDiRLTrainer`]: every field of [`~trl.GRPOConfig`], plus the latent policy's.

    `num_generations` is `N`, the number of latent reasoning traces sampled per prompt; each trace is decoded into
    `num_decodes_per_latent` (`M`) answers. The GRPO group is the `N` latents of a prompt, and a latent's reward is
    the `latent_utility` of its `M` answers' rewards.

    GRPO fields with the same meaning here: `epsilon`/`epsilon_high` (the clip of the per-step ratio; a step's
    log-probability is that of a whole L x D latent block, so the ratio is ~L x D times more sensitive than a
    per-number one), `delta`, `loss_type` (with a (block, denoising step) of a trace in the role of a token),
    `off_policy_mask_threshold`, `use_bias_correction_kl`, `scale_rewards`, `reward_weights`, `num_iterations`,
    `steps_per_generation`, `max_completion_length`, `temperature` (of the answer decoder), `importance_sampling_level`
    (`"token"`: one ratio per denoising step, `"sequence"`: one per trace). `beta` is read as `latent_kl_beta` when that
    is not set, so a GRPO script keeps its KL setting. Options LaDi-RL does not implement are rejected with the reason
    (docs/ladirl.md lists every field).
    """

    num_decodes_per_latent: int = field(
        default=4,
        metadata={"help": "Answers `M` decoded from every latent trace; their mean reward is the latent's utility. "
                  "1 gives naive rollouts (one answer per latent)."},
    )
    num_denoise_steps: int | None = field(
        default=None,
        metadata={"help": "Denoising steps per latent block while sampling. Defaults to the model config's value."},
    )
    cache_implementation: str | None = field(
        default=None,
        metadata={"help": "Key/value cache of the rollout sampler. None: a cache that grows with every step and leaves "
                  "out the rows whose stop head chose the answer. 'static': a fixed-size cache that keeps every row "
                  "(masked), so each kind of step feeds the LM the same shapes every time, which a decoder compiled "
                  "with torch.compile(mode='reduce-overhead') needs to replay CUDA graphs. Both sample the same."},
    )
    sde_noise_level: float = field(
        default=0.7,
        metadata={"help": "Noise level `a` of the SDE sampler, `sigma_t = a sqrt(t / (1 - t))`. Must be > 0: the "
                  "policy gradient needs stochastic steps with log-probabilities (0 would be the deterministic ODE)."},
    )
    train_timestep_fraction: float = field(
        default=1.0,
        metadata={"help": "Fraction of the denoising steps of every block used in the loss (a random subset per "
                  "trace, at least one step). Lower is cheaper; 1.0 uses every step."},
    )
    latent_utility: str = field(
        default="mean",
        metadata={"help": "How the rewards of a latent's `M` answers become its utility: 'mean' (the "
                  "decoder-marginalised expected reward, as in LaDi-RL), 'max' or 'min'.",
                  "choices": list(LATENT_UTILITIES)},
    )
    initial_noise_scale: float | None = field(
        default=None,
        metadata={"help": "Std of the noise each latent block starts from. Defaults to the model config's value "
                  "(LaDiR: 2.0). Under the SDE the drift pulls extra starting noise back in, so exploration in RL is "
                  "`sde_noise_level`'s (docs/ladirl.md)."},
    )
    diversity_guidance_scale: float = field(
        default=0.0,
        metadata={"help": "Strength `g` of LaDiR's repulsive guidance among the `N` latents of a prompt: each step's "
                  "mean moves by `d g t F / rms(F)` (the force normalised over the group, so `g` is a displacement per "
                  "latent number per unit of `d t`; decays with t). Needs N >= 3. The guidance is stored so "
                  "log-probabilities stay exact."},
    )
    cfg_scale: float = field(
        default=1.0,
        metadata={"help": "Classifier-free guidance scale of the denoiser: the policy's velocity is "
                  "`v_uncond + s (v_cond - v_uncond)` in the rollouts and in the loss, so its gradient reaches both. "
                  "1.0 is the conditional model alone and costs no extra forward."},
    )
    max_latent_blocks: int | None = field(
        default=None,
        metadata={"help": "Most latent blocks per trace before the answer is forced. Defaults to the model config."},
    )
    on_non_finite: str = field(
        default="skip",
        metadata={"help": "What a NaN or inf in a rollout (a trace's latents, hence its velocities, or its "
                  "log-probabilities) or in the loss does. `'skip'`: a warning names the step and what went non-finite; "
                  "the traces are left out of the update (advantage 0), and a non-finite loss drops the whole optimizer "
                  "step (no parameter moves). `'stop'`: training stops with an error naming the same. Non-finite "
                  "rewards are handled per answer (see the reward docs) in both modes.", "choices": ["skip", "stop"]},
    )
    text_policy_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the complementary token-level policy-gradient term on the answers, with the "
                  "advantage of an answer taken within its latent (`r_ij - U_i`). 0 trains the latent policy only."},
    )
    latent_kl_beta: float | None = field(
        default=None,
        metadata={"help": "Weight of the KL between the denoiser's Gaussian steps and a frozen reference denoiser, "
                  "`||mu_theta - mu_ref||^2 / (2 std^2)` per step, summed over the block's L x D latent numbers (so "
                  "~L x D times stronger than a per-number beta). Defaults to `beta`."},
    )
    latent_policy_parameters: str = field(
        default="velocity_head",
        metadata={"help": "What the latent loss trains. 'velocity_head': the denoiser's adaLN output head only; "
                  "nothing the answer decoder reads changes, so a latent keeps decoding to the same text. "
                  "'denoiser_adapter': the head and a LoRA adapter of the LM that acts only at the positions of the "
                  "block being denoised (added with rank `denoiser_lora_rank` if the model has none), so the "
                  "denoiser's features can change while the answer decoder and stop head stay bit for bit the same. "
                  "'reasoner': also the reasoner's LoRA adapter, latent input map, time embedding and markers, which "
                  "the answer decoder shares (one LM plays both roles), so decoding drifts as the policy moves: use "
                  "a small learning rate.",
                  "choices": list(LATENT_POLICY_PARAMETERS)},
    )
    denoiser_lora_rank: int = field(
        default=16,
        metadata={"help": "Rank of the denoiser adapter that `latent_policy_parameters='denoiser_adapter'` adds to a "
                  "model without one (a model that has one keeps its own)."},
    )
    denoiser_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the denoiser's own parameters: the velocity head, and the denoiser adapter "
                  "with `latent_policy_parameters='denoiser_adapter'`. Defaults to `learning_rate`."},
    )
    text_policy_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the parameters the answer decoder shares with the denoiser (reasoner "
                  "LoRA, latent input map, time embedding, markers), trained when `text_policy_coef > 0` or "
                  "`latent_policy_parameters='reasoner'`. Defaults to `learning_rate`."},
    )

    # Defaults that differ from GRPOConfig's.
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Initial learning rate (AdamW). By default LaDi-RL trains the denoiser's small output head, "
                  "so it defaults higher than GRPO's 1e-6 (1e-4 kept SmolLM2-135M's answers well-formed in the default "
                  "example; 1e-2 pushed its latents off the decoder's manifold within 3 steps)."},
    )
    # TRL's configs turn this deprecated alias of `activation_checkpointing` on (and transformers then warns that it
    # is deprecated); None leaves activation checkpointing off, as in TrainingArguments, without the warning.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (off by default here): recompute activations "
                  "in the backward pass to save memory, at the cost of speed."},
    )

    def __post_init__(self):
        if self.latent_kl_beta is None:
            self.latent_kl_beta = self.beta
        super().__post_init__()
        if self.use_vllm:
            raise ValueError(
                "use_vllm=True is not supported by LaDiRLTrainer: answers are decoded from latent prefixes "
                "(input embeddings), which vLLM generation here does not take. Set use_vllm=False."
            )
        for name in ("num_denoise_steps", "max_latent_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for the model config's value), got {value}.")
        if self.initial_noise_scale is not None and self.initial_noise_scale <= 0:
            raise ValueError(f"initial_noise_scale must be > 0 (or None for the model config's value), got "
                             f"{self.initial_noise_scale}.")
        if self.diversity_guidance_scale < 0:
            raise ValueError(f"diversity_guidance_scale must be >= 0, got {self.diversity_guidance_scale}.")
        if self.on_non_finite not in ("skip", "stop"):
            raise ValueError(f"on_non_finite must be 'skip' or 'stop', got {self.on_non_finite!r}.")
        if self.num_decodes_per_latent < 1:
            raise ValueError(f"num_decodes_per_latent must be at least 1, got {self.num_decodes_per_latent}.")
        if self.sde_noise_level <= 0:
            raise ValueError(
                f"sde_noise_level={self.sde_noise_level}: LaDi-RL needs a stochastic sampler (> 0, e.g. 0.7) so that "
                "every denoising step has a log-probability. Use `LaDiRPipeline(model).sample(sde_noise_level=0)` "
                "for deterministic inference instead."
            )
        if not 0 < self.train_timestep_fraction <= 1:
            raise ValueError(f"train_timestep_fraction must be in (0, 1], got {self.train_timestep_fraction}.")
        if self.latent_policy_parameters not in LATENT_POLICY_PARAMETERS:
            raise ValueError(
                f"latent_policy_parameters must be one of {LATENT_POLICY_PARAMETERS}, got '{self.latent_policy_parameters}'."
            )
        if self.denoiser_lora_rank < 1:
            raise ValueError(f"denoiser_lora_rank must be at least 1, got {self.denoiser_lora_rank}.")
        if self.latent_policy_parameters == "denoiser_adapter" and (
            self.activation_checkpointing or self.gradient_checkpointing
        ):
            raise ValueError(
                "latent_policy_parameters='denoiser_adapter' cannot be combined with activation checkpointing: the "
                "adapter is switched on for the noisy blocks during the forward pass only, and a backward pass that "
                "recomputes activations would not see it. Turn activation checkpointing off, or use "
                "latent_policy_parameters='velocity_head'."
            )
        if self.latent_utility not in LATENT_UTILITIES:
            raise ValueError(f"latent_utility must be one of {LATENT_UTILITIES}, got '{self.latent_utility}'.")
        if self.text_policy_coef < 0:
            raise ValueError(f"text_policy_coef must be >= 0, got {self.text_policy_coef}.")
        if self.text_policy_coef > 0 and self.num_decodes_per_latent < 2:
            raise ValueError(
                "text_policy_coef > 0 needs num_decodes_per_latent >= 2: the text advantage compares the answers "
                "decoded from the same latent, so one answer per latent gives it nothing to compare."
            )
        if self.latent_kl_beta < 0:
            raise ValueError(f"latent_kl_beta must be >= 0, got {self.latent_kl_beta}.")
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"loss_type='{self.loss_type}' is not supported by LaDiRLTrainer; the denoising steps use the clipped "
                f"ratio objective of {SUPPORTED_LOSS_TYPES}."
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "LaDiRLTrainer supports multi_objective_aggregation='sum_then_normalize' only: the weighted sum of the "
                "reward functions is averaged into the latent utility before the group normalisation."
            )
        entropy_reason = (
            "the Gaussian latent policy's entropy is set by the SDE noise schedule, not by the weights, so an entropy "
            "term has nothing to act on (latent diversity is logged instead)"
        )
        decoder_reason = (
            "the answer decoder samples with `temperature` alone (LaDiRPipeline.decode_answers), from a latent prefix, "
            "not through `generate`"
        )
        if self.cache_implementation not in (None, "static"):
            raise ValueError(
                f"cache_implementation={self.cache_implementation!r}: LaDiRLTrainer's rollout sampler has two caches, "
                "None (grows with every step) or 'static' (fixed size, for a compiled decoder). Use one of them."
            )
        unsupported = {  # option -> (is set, why LaDi-RL does not implement it)
            "top_entropy_quantile": (self.top_entropy_quantile != 1.0, entropy_reason),
            "entropy_coef": (self.entropy_coef != 0.0, entropy_reason),
            "use_adaptive_entropy": (self.use_adaptive_entropy, entropy_reason),
            "mask_truncated_completions": (
                self.mask_truncated_completions,
                "a truncated answer still scores its latent; give truncated answers the reward you want in the reward "
                "function, or raise max_completion_length",
            ),
            "sync_ref_model": (
                self.sync_ref_model,
                "the reference denoiser is a frozen copy of the velocity head taken at the start, never synced",
            ),
            "top_p": (self.top_p != 1.0, decoder_reason),
            "top_k": (self.top_k not in (0, None), decoder_reason),
            "min_p": (self.min_p is not None, decoder_reason),
            "repetition_penalty": (self.repetition_penalty != 1.0, decoder_reason),
            "generation_kwargs": (bool(self.generation_kwargs), decoder_reason),
            "use_transformers_paged": (self.use_transformers_paged, decoder_reason),
            "use_transformers_continuous_batching": (self.use_transformers_continuous_batching, decoder_reason),
            "pad_to_multiple_of": (
                self.pad_to_multiple_of is not None,
                "prompts are left-padded to the longest prompt of the batch (trl_ladi.modeling.tokenize_prompts)",
            ),
            "chat_template_kwargs": (
                bool(self.chat_template_kwargs),
                "conversational prompts are rendered with the tokenizer's chat template as it is; edit the template",
            ),
            "model_init_kwargs": (
                bool(self.model_init_kwargs),
                "a model given as a path is loaded with `LaDiRModel.from_pretrained(path)`; load it yourself with the "
                "options you need and pass the model",
            ),
            "trust_remote_code": (
                self.trust_remote_code,
                "LaDiRModel never runs code from a model folder (its classes are this package's)",
            ),
            "cast_lm_head_to_fp32": (
                self.cast_lm_head_to_fp32,
                "LaDiRModel computes answer logits in float32 and denoising log-probabilities in float64 already",
            ),
            "router_aux_loss_coef": (
                self.router_aux_loss_coef is not None,
                "LaDiRModel supports dense bases (Llama, Qwen2, Qwen3, Mistral), which have no router loss",
            ),
            "max_tool_calling_iterations": (
                self.max_tool_calling_iterations is not None,
                "answers are decoded from latents in one pass, without tool calls",
            ),
        }
        for name, (is_set, reason) in unsupported.items():
            if is_set:
                raise ValueError(f"`{name}` is not supported by LaDiRLTrainer: {reason}. Leave it at its default.")
        local_generation_batch = self.generation_batch_size // max(self.world_size, 1)
        if self.diversity_guidance_scale > 0 and local_generation_batch % self.num_generations:
            raise ValueError(
                f"diversity_guidance_scale > 0 repels the {self.num_generations} latents of a prompt from each other, "
                f"so each process must hold whole groups, but its generation batch is {local_generation_batch} rows. "
                "Make per_device_train_batch_size * steps_per_generation a multiple of num_generations."
            )
