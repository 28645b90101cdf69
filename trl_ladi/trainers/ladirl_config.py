from dataclasses import dataclass, field

from trl import GRPOConfig

SUPPORTED_LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo", "luspo")
LATENT_UTILITIES = ("mean", "max", "min")
LATENT_POLICY_PARAMETERS = ("velocity_head", "reasoner")


@dataclass
class LaDiRLConfig(GRPOConfig):
    r"""Configuration for [`LaDiRLTrainer`]: every field of [`~trl.GRPOConfig`], plus the latent policy's.

    `num_generations` is `N`, the number of latent reasoning traces sampled per prompt; each trace is decoded into
    `num_decodes_per_latent` (`M`) answers. The GRPO group is the `N` latents of a prompt, and a latent's reward is
    the `latent_utility` of its `M` answers' rewards.

    GRPO fields with the same meaning here: `epsilon`/`epsilon_high` (the clip of the per-step ratio),
    `scale_rewards`, `reward_weights`, `num_iterations`, `steps_per_generation`, `max_completion_length`,
    `temperature` (of the answer decoder), `importance_sampling_level` (`"token"`: one ratio per denoising step,
    `"sequence"`: one per trace). `beta` is read as `latent_kl_beta` when that is not set, so a GRPO script keeps
    its KL setting.
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
                  "(LaDiR: 2.0)."},
    )
    diversity_guidance_scale: float = field(
        default=0.0,
        metadata={"help": "Strength `gamma_max` of LaDiR's repulsive guidance among the `N` latents of a prompt "
                  "(decays with t; LaDiR found 0.3-0.5 best). The guidance is stored so log-probabilities stay exact."},
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
    text_policy_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the complementary token-level policy-gradient term on the answers, with the "
                  "advantage of an answer taken within its latent (`r_ij - U_i`). 0 trains the latent policy only."},
    )
    latent_kl_beta: float | None = field(
        default=None,
        metadata={"help": "Weight of the KL between the denoiser's Gaussian steps and a frozen reference denoiser, "
                  "`||mu_theta - mu_ref||^2 / (2 std^2)` per step. Defaults to `beta`."},
    )
    latent_policy_parameters: str = field(
        default="velocity_head",
        metadata={"help": "What the latent loss trains. 'velocity_head': the denoiser's adaLN output head only; "
                  "nothing the answer decoder reads changes, so a latent keeps decoding to the same text. "
                  "'reasoner': also the reasoner's LoRA adapter, latent input map, time embedding and markers, which "
                  "the answer decoder shares (one LM plays both roles), so decoding drifts as the policy moves: use "
                  "a small learning rate.",
                  "choices": list(LATENT_POLICY_PARAMETERS)},
    )
    denoiser_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the denoiser's velocity head. Defaults to `learning_rate`."},
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
