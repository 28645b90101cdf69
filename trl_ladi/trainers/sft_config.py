"""`LaDiRSFTConfig`: the settings of the two supervised LaDiR stages (VAE, then reasoner)."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

STAGES = ("vae", "reasoner", "rollout")


@dataclass
class LaDiRSFTConfig(TrainingArguments):
    r"""
    Configuration class for the [`LaDiRSFTTrainer`].

    Only the parameters specific to the LaDiR stages are listed here; see [`~transformers.TrainingArguments`] for the
    rest. Defaults suit small runs (LoRA adapters and fresh heads: a higher learning rate than full fine-tuning).

    Parameters:
        stage (`str`, defaults to `"vae"`):
            `"vae"`: train the β-VAE that turns a reasoning sentence into a block of latent tokens and back.
            `"reasoner"`: train the latent diffusion reasoner (flow matching on the VAE's latents, answer and stop
            heads). Run `"vae"` first.
            `"rollout"`: LaDiR's second reasoner stage: the answer loss is taken on latents the reasoner generates
            from noise (`rollout_denoise_steps` Euler steps, gradients through them); flow and stop losses on the
            VAE's latents stay as an anchor. Run `"reasoner"` first.

        max_sentence_length (`int`, defaults to `64`):
            Tokens kept of each reasoning sentence (one latent block).
        max_prompt_length (`int` or `None`, defaults to `512`):
            Tokens kept of each prompt, from the end (the question and the generation prompt). `None` keeps all.
        max_answer_length (`int`, defaults to `64`):
            Tokens kept of the formatted answer, end-of-sequence token included.
        answer_template (`str`, defaults to `"The answer is {answer}."`):
            How the `answer` column becomes the answer text the reasoner learns to write after its latent blocks
            (LaDiR separates the reasoning from the answer at "The answer is"). Must contain `{answer}`.

        kl_weight (`float`, defaults to `1e-5`):
            β of the β-VAE loss (LaDiR: 1e-5).
        latent_noise_std (`float`, defaults to `0.3`):
            Std of the Gaussian noise added to the sampled latents before decoding, so the decoder learns to read
            imprecise latents such as the reasoner's (the released LaDiR code: 0.3).
        token_substitution_prob (`float`, defaults to `0.3`):
            Fraction of encoder input tokens replaced by random vocabulary tokens; the decoder still reconstructs the
            clean sentence (LaDiR: 0.3).
        scaling_num_sentences (`int`, defaults to `1024`):
            Training sentences encoded after the VAE stage to measure `latent_scaling_factor = 1 / std(mu)`, which is
            written into the model config so the reasoner works on unit-variance latents (with token-aligned latents,
            also to fit `reasoner_latent_in`, which reads a latent slot as its token's embedding).

        flow_weight (`float`, defaults to `5.0`):
            Weight of the flow-matching loss (LaDiR: 5).
        answer_weight (`float`, defaults to `1.0`):
            Weight of the answer cross-entropy (LaDiR: 1).
        stop_weight (`float`, defaults to `2.0`):
            Weight of the stop-head cross-entropy (LaDiR: 2).
        prompt_dropout (`float`, defaults to `0.1`):
            Probability of hiding the prompt from the noisy block copies of a training trace, so the reasoner also
            learns the unconditional velocity that classifier-free guidance needs (LaDiR: 0.1). Only the noisy copies
            lose it; the clean blocks they read and the answer keep it, which is the context the sampler's
            unconditional velocity has.
        flow_timestep_shift (`float`, defaults to `1.0`):
            Shift of the reasoner's training times towards noise, ``t = s u / (1 + (s - 1) u)`` with ``u`` uniform (SD3;
            1.0: uniform). A block's tokens are decided at high noise; below ``t = 0.5`` a token-aligned block is read
            back almost exactly in one step (benchmarks/ladir_quality.py, (b2)).
        slot_token_weight (`float`, defaults to `3.0`):
            Weight of the cross-entropy of each latent slot's token, for a model whose velocity is read from token
            predictions (`LaDiRConfig.velocity_parameterization` `"token_readout"` or `"token_posterior"`); unused
            otherwise. It is a mean over a block's `L` slots, empty ones included, beside the answer (weight 1) and
            stop (weight 2) losses; after 45 steps at weight 1 a token posterior's reasoner got 13-17 points fewer
            held-out sentences exact than text SFT of the same model, at 3 0.6-5.6 points fewer (docs/sft.md, "the
            slot loss's weight").
        rollout_denoise_steps (`int`, defaults to `4`):
            Euler steps per block in the `"rollout"` stage (LaDiR: 10, fewer than at inference). Each is a forward
            pass with gradients, so the stage costs about `blocks * steps` times a reasoner step.
    """

    # Parameters whose defaults differ from TrainingArguments
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "The initial learning rate for AdamW (LoRA adapters and fresh heads learn at a higher rate)."},
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every X updates steps. Should be an integer or a float in range `[0,1)`. If smaller than 1, "
            "will be interpreted as ratio of total training steps."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep this False: the trainer builds its own columns and reads them in its collator."},
    )

    # Stage
    stage: str = field(
        default="vae",
        metadata={
            "help": "'vae': train the sentence <-> latent block VAE. 'reasoner': train the latent diffusion reasoner "
            "on the VAE's latents (run 'vae' first).",
            "choices": list(STAGES),
        },
    )

    # Data
    max_sentence_length: int = field(
        default=64, metadata={"help": "Tokens kept of each reasoning sentence (one latent block)."}
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Tokens kept of each prompt, from the end. None keeps all."}
    )
    max_answer_length: int = field(
        default=64, metadata={"help": "Tokens kept of the formatted answer, end-of-sequence token included."}
    )
    answer_template: str = field(
        default="The answer is {answer}.",
        metadata={"help": "Format of the answer text the reasoner writes after its latent blocks; has '{answer}'."},
    )

    # VAE stage
    kl_weight: float = field(
        default=1e-5,
        metadata={"help": "β of the β-VAE loss (LaDiR: 1e-5), on the KL averaged over the latent numbers of a "
                  "sentence, as in LaDiR's reference code."},
    )
    latent_noise_std: float = field(
        default=0.3, metadata={"help": "Std of the noise added to sampled latents before decoding (VAE stage)."}
    )
    token_substitution_prob: float = field(
        default=0.3,
        metadata={"help": "Fraction of encoder input tokens replaced by random tokens (VAE stage; LaDiR: 0.3)."},
    )
    scaling_num_sentences: int = field(
        default=1024,
        metadata={"help": "Training sentences encoded after the VAE stage to measure latent_scaling_factor (and, "
                  "with token-aligned latents, to fit reasoner_latent_in)."},
    )

    # Reasoner stage
    flow_weight: float = field(default=5.0, metadata={"help": "Weight of the flow-matching loss (LaDiR: 5)."})
    answer_weight: float = field(default=1.0, metadata={"help": "Weight of the answer cross-entropy (LaDiR: 1)."})
    stop_weight: float = field(default=2.0, metadata={"help": "Weight of the stop-head cross-entropy (LaDiR: 2)."})
    prompt_dropout: float = field(
        default=0.1,
        metadata={"help": "Probability of hiding the prompt from a trace's noisy block copies (its clean blocks and "
                  "answer keep it), for classifier-free guidance (LaDiR: 0.1)."},
    )
    flow_timestep_shift: float = field(
        default=1.0,
        metadata={"help": "Shift of the reasoner's training times towards noise, t = s u / (1 + (s - 1) u) (SD3); "
                  "1.0: uniform."},
    )
    slot_token_weight: float = field(
        default=3.0,
        metadata={"help": "Weight of the cross-entropy of each latent slot's token, a mean over a block's slots "
                  "(velocity_parameterization 'token_readout' or 'token_posterior' only), beside the answer (1) and "
                  "stop (2) losses."},
    )

    rollout_denoise_steps: int = field(
        default=4,
        metadata={"help": "Euler steps per block in the 'rollout' stage (LaDiR: 10); each is a forward pass with "
                  "gradients."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}.")
        if "{answer}" not in self.answer_template:
            raise ValueError(
                f"answer_template must contain '{{answer}}', got {self.answer_template!r}; e.g. 'The answer is {{answer}}.'"
            )
        for name in ("token_substitution_prob", "prompt_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        for name in ("max_sentence_length", "scaling_num_sentences", "rollout_denoise_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.flow_timestep_shift <= 0:
            raise ValueError(f"flow_timestep_shift must be > 0 (1.0: uniform times), got {self.flow_timestep_shift}.")
        if self.max_answer_length < 2:
            raise ValueError(
                f"max_answer_length must be at least 2 (an answer token and the end-of-sequence token), got "
                f"{self.max_answer_length}."
            )
