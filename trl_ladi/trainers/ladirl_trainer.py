"""LaDi-RL: GRPO over latent diffusion reasoning traces, as a subclass of TRL's `GRPOTrainer`.

One step, for each prompt ``q`` (the whole algorithm is in the two methods below):

1. sample ``N`` latent traces ``Z_i`` with the SDE policy, recording every step (``_generate_and_score_completions``);
2. decode each ``Z_i`` into ``M`` answers ``y_ij`` from one shared prefill;
3. score every ``y_ij`` with the TRL reward functions;
4. latent utility ``U_i = mean_j r_ij`` (decoder-marginalised);
5. advantage ``A_i = (U_i - mean(U)) / (std(U) + eps)`` over the ``N`` latents of ``q``;
6. loss over the denoising steps ``k`` (``_compute_loss``):
   ``-min(rho_k A_i, clip(rho_k, 1 - eps_low, 1 + eps_high) A_i) + beta ||mu_theta - mu_ref||^2 / (2 std^2)``,
   ``rho_k = pi_theta(z_{k+1} | z_k, q) / pi_old(z_{k+1} | z_k, q)``;
7. optionally a token-level term on the answers with ``A_ij = r_ij - U_i`` (normalised within the latent).

Everything else (sampler, buffering, ``training_step``, logging, checkpoints, accelerate / DeepSpeed) is TRL's.
"""

import copy
import functools
import logging
import numbers
import time
from collections import Counter, defaultdict, deque

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.models import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import is_async_callable, nanstd, pad

from trl_ladi.cpu_memory import keep_freed_memory
from trl_ladi.cpu_threads import use_available_cores
from trl_ladi.hub import write_model_card
from trl_ladi.modeling import LaDiRModel, tokenize_prompts
from trl_ladi.pipeline import LaDiRPipeline
from trl_ladi.trainers.checkpoints import resolve_resume_from_checkpoint
from trl_ladi.trainers.ladirl_config import LaDiRLConfig

ADVANTAGE_EPS = 1e-4  # as GRPO

logger = logging.getLogger(__name__)


class _DropNonFiniteUpdate(TrainerCallback):
    """`on_non_finite="skip"`: the optimizer step of a window whose loss was non-finite moves no parameter."""

    def __init__(self):
        self.pending = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.pending:
            for parameter in model.parameters():
                parameter.grad = None  # torch optimizers leave a parameter without a gradient untouched
            self.pending = False


def _checked_reward_func(reward_func, name: str):
    """`reward_func` with its failures named: an exception, or a value that is not a list of numbers / None."""

    @functools.wraps(reward_func)
    def checked(*args, **kwargs):
        completions = kwargs.get("completions") or []
        first = repr(completions[0])[:200] if completions else "none"
        try:
            rewards = reward_func(*args, **kwargs)
        except Exception as error:
            raise RuntimeError(
                f"The reward function '{name}' raised {type(error).__name__}: {error} while scoring {len(completions)} "
                f"answers (the first: {first}). No update was made from this rollout. Fix the function, or have it "
                "return None for an answer it cannot score (that answer is then left out)."
            ) from error
        if isinstance(rewards, (str, bytes, dict, set)) or not hasattr(rewards, "__len__"):
            raise TypeError(
                f"The reward function '{name}' returned {type(rewards).__name__} ({repr(rewards)[:100]}); it must return "
                f"a list of {len(completions)} floats (or None for an answer it cannot score)."
            )
        for index, reward in enumerate(rewards):
            is_number = isinstance(reward, numbers.Real) or (isinstance(reward, torch.Tensor) and reward.numel() == 1)
            if reward is not None and not is_number:
                raise TypeError(
                    f"The reward function '{name}' returned {type(reward).__name__} {repr(reward)[:100]} for answer "
                    f"{index} ({repr(completions[index])[:100] if index < len(completions) else '?'}); each reward must "
                    "be a float, or None for an answer it cannot score."
                )
        return rewards

    return checked


class LaDiRLTrainer(GRPOTrainer):
    """GRPO in a latent reasoning space: the policy is a LaDiR model's denoiser.

    Use it as a `GRPOTrainer`: the same reward functions (plain or conversational prompts, `reward_weights`,
    extra dataset columns as keyword arguments, `None` for "not applicable"), datasets, logging and checkpoints.

    Args:
        model (`LaDiRModel` or `str`): a LaDiR model (see `LaDiRSFTTrainer` to make one from any causal LM), or the
            directory of a saved one.
        reward_funcs: as for `GRPOTrainer`.
        args (`LaDiRLConfig`): the configuration.
        processing_class: the tokenizer of the base model (required unless `model` is a directory holding one).
    """

    _tag_names = ["trl", "ladi-rl", "trl-ladi"]
    _name = "LaDi-RL"
    _paper = {
        "title": "Latent Diffusion Reasoning Prevents Entropy Collapse in Reinforcement Learning",
        "id": "2602.01705",
        "citation": "@article{ladirl2026, title={Latent Diffusion Reasoning Prevents Entropy Collapse in "
        "Reinforcement Learning}, journal={arXiv preprint arXiv:2602.01705}, year={2026}}",
    }

    def __init__(
        self,
        model,
        reward_funcs,
        args: LaDiRLConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if isinstance(model, str):
            if processing_class is None:
                from transformers import AutoTokenizer

                processing_class = AutoTokenizer.from_pretrained(model, padding_side="left")
            model = LaDiRModel.from_pretrained(model)
        if not isinstance(model, LaDiRModel):
            raise TypeError(
                f"LaDiRLTrainer trains a LaDiRModel, got {type(model).__name__}. Make one from your causal LM with "
                "`LaDiRModel.from_base(...)` and the LaDiR stages (`LaDiRSFTTrainer`, stage='vae' then 'reasoner')."
            )
        if processing_class is None:
            raise ValueError("Pass the base model's tokenizer as `processing_class` (it cannot be fetched offline).")
        if peft_config is not None:
            raise ValueError("LaDiRModel has its own LoRA adapters; pass peft_config=None (set ranks in LaDiRConfig).")
        if args is None:
            args = LaDiRLConfig(output_dir="LaDiRL")
        elif not isinstance(args, LaDiRLConfig):
            raise TypeError(f"`args` must be a LaDiRLConfig, got {type(args).__name__}.")
        if train_dataset is not None and "prompt" not in train_dataset.column_names:
            raise ValueError(
                f"The training dataset has no 'prompt' column (columns: {train_dataset.column_names}). "
                "Rename your prompt column, e.g. `dataset.rename_column('question', 'prompt')`."
            )
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("The training dataset has no rows: there is nothing to train on. Check how it was "
                             "loaded or filtered.")
        max_latent_blocks = args.max_latent_blocks or model.config.max_blocks
        if train_dataset is not None and hasattr(train_dataset, "__len__"):
            self._check_prompt_lengths(model, processing_class, train_dataset["prompt"], args, max_latent_blocks)
        use_available_cores()  # under accelerate launch on a CPU: the cores, not the one thread it sets
        keep_freed_memory()  # on a CPU: reuse the memory a step frees instead of mapping it afresh
        half_dtypes = {p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
        if half_dtypes:
            # A step's log-probability sums L x D Gaussian terms (~300 nats at 4 x 128): bf16 rounding of the velocity
            # moves it by nats between the sampler's cached pass and the loss's packed one (H200, SmolLM2-135M's
            # shape: up to 1.06 nats, a first PPO ratio up to 2.9), far outside the clip range.
            logger.warning(
                "The model has weights in %s. LaDi-RL's step log-probabilities are sums over each latent block, and in "
                "half precision the sampler's and the loss's computations of them differ by up to nats, which sends "
                "the PPO ratio far outside the clip range (watch `sampler_log_prob_gap`). Load the model in float32 "
                "and set `bf16=True` in LaDiRLConfig for mixed precision instead.",
                " and ".join(sorted(str(dtype).replace("torch.", "") for dtype in half_dtypes)),
            )
        if args.latent_policy_parameters == "velocity_head" and model.config.velocity_parameterization == "token_posterior":
            raise ValueError(
                "A 'token_posterior' model has no velocity head to train: its denoiser is the exact posterior of the "
                "LM's slot priors. Set latent_policy_parameters='denoiser_adapter' (the priors move, the answer "
                "decoder does not) or 'reasoner'."
            )
        if args.latent_policy_parameters == "denoiser_adapter" and model.config.denoiser_lora_rank == 0:
            model.add_denoiser_adapter(args.denoiser_lora_rank)  # starts as a no-op: the policy is unchanged
        denoiser, shared = self._trained_parameters(model, args)
        model.train_only(denoiser + shared)
        # The reference denoiser is copied now: GRPOTrainer patches `model.forward` (fused LM head) with a closure
        # over this model, and a copy taken after that would run the policy's weights.
        latent_kl_beta = args.latent_kl_beta
        reference = copy.deepcopy(model).eval().requires_grad_(False) if latent_kl_beta > 0 else None

        # Keep GRPO from building its own reference model: the reference here is a frozen copy of the denoiser.
        beta, args.beta = args.beta, 0.0
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        args.beta = beta
        self.latent_kl_beta = latent_kl_beta
        self.reward_funcs = [
            func if isinstance(func, torch.nn.Module) or is_async_callable(func) else _checked_reward_func(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names)
        ]
        self.num_decodes_per_latent = args.num_decodes_per_latent
        self._drop_non_finite_update = _DropNonFiniteUpdate()
        self.add_callback(self._drop_non_finite_update)
        self._max_latent_blocks = max_latent_blocks  # dr_grpo's constant normaliser
        self.ref_denoiser = None
        if reference is not None:
            if self.is_deepspeed_enabled:
                self.ref_denoiser = prepare_deepspeed(reference, self.accelerator)
            else:
                self.ref_denoiser = self.accelerator.prepare_model(reference, evaluation_mode=True)
        # The completions table holds one row per answer: N * M per prompt.
        rows = args.generation_batch_size * args.num_decodes_per_latent
        self._logs = {
            "images": deque(maxlen=rows),
            "prompt": deque(maxlen=rows),
            "completion": deque(maxlen=rows),
            "rewards": defaultdict(lambda: deque(maxlen=rows)),
            "advantages": deque(maxlen=rows),
            "extra": defaultdict(lambda: deque(maxlen=rows)),
        }

    @staticmethod
    def _check_prompt_lengths(model: LaDiRModel, tokenizer, prompts: list, args: LaDiRLConfig, max_blocks: int):
        """Prompt + latent blocks + answer must fit the base model's positions: beyond them a RoPE model trains on
        positions it never saw, silently."""
        context = getattr(model.config.text_config, "max_position_embeddings", None)
        if context is None:
            return
        lengths = []
        for start in range(0, len(prompts), 256):  # in chunks: one padded tensor of a large dataset would be big
            lengths += tokenize_prompts(tokenizer, list(prompts[start : start + 256]), pad_token_id=0)[1].sum(1).tolist()
        longest = max(lengths)
        needed = longest + max_blocks * model.block_layout.width + 1 + args.max_completion_length
        if needed > context:
            raise ValueError(
                f"The longest prompt (row {lengths.index(longest)}) has {longest} tokens; with {max_blocks} latent "
                f"blocks of {model.block_layout.width} positions and an answer of up to {args.max_completion_length} "
                f"tokens a trace needs {needed} positions, but the base model has {context}. Shorten or filter the "
                "long prompts, or lower max_latent_blocks / max_completion_length."
            )

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`GRPOTrainer.train`; `resume_from_checkpoint=True` resumes from the newest checkpoint that was written
        completely (see `trl_ladi.trainers.checkpoints`)."""
        resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    @staticmethod
    def _trained_parameters(model: LaDiRModel, args: LaDiRLConfig) -> tuple[list, list]:
        """The two parameter groups RL trains: the denoiser's own (the velocity head, plus the denoiser adapter with
        ``latent_policy_parameters="denoiser_adapter"``), and the parameters it shares with the answer decoder when
        ``latent_policy_parameters="reasoner"`` or ``text_policy_coef > 0``.

        The stop head is never trained here: stopping is not part of the policy gradient (and an unused trainable
        parameter breaks DDP).
        """
        denoiser = model.velocity_head_parameters()
        if args.latent_policy_parameters == "denoiser_adapter":
            denoiser = model.denoiser_parameters()
        trains_shared = args.latent_policy_parameters == "reasoner" or args.text_policy_coef > 0
        return denoiser, model.shared_reasoner_parameters() if trains_shared else []

    def create_optimizer(self, model=None):
        """The Trainer's optimizer with two learning rates: the denoiser's own parameters, and the shared ones."""
        if self.optimizer is not None:
            return self.optimizer
        ladir = self.accelerator.unwrap_model(self.model)
        denoiser, shared = self._trained_parameters(ladir, self.args)
        optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, ladir)
        optimizer_kwargs.pop("lr", None)
        # the Trainer passes weight_decay through its parameter groups, not these kwargs: without it here the
        # optimizer's own default (AdamW: 0.01) would replace the config's
        optimizer_kwargs["weight_decay"] = self.args.weight_decay
        groups = [
            {"params": denoiser, "lr": self.args.denoiser_learning_rate or self.args.learning_rate},
            {"params": shared, "lr": self.args.text_policy_learning_rate or self.args.learning_rate},
        ]
        self.optimizer = optimizer_class([group for group in groups if group["params"]], **optimizer_kwargs)
        return self.optimizer

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """The LaDi-RL model card (`trl_ladi.hub.write_model_card`) instead of TRL's generic one."""
        if not self.is_world_process_zero():
            return
        write_model_card(
            self.args.output_dir,
            self.accelerator.unwrap_model(self.model),
            dataset_name=dataset_name,
            training_args=self.args,
            hub_model_id=self.hub_model_id,
        )

    # ------------------------------------------------------------------ rollout

    @torch.no_grad()
    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        args = self.args
        num_latents = self.num_generations if mode == "train" else self.num_generations_eval  # N
        num_decodes = self.num_decodes_per_latent  # M
        prompts = [row["prompt"] for row in inputs]  # each prompt appears N times in a row (GRPO's sampler)
        batch = len(prompts)
        prompt_ids, prompt_mask = tokenize_prompts(self.processing_class, prompts, device=device)
        output = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}

        # 1-2. latent traces from the SDE policy, and M answers per latent from one shared prefill.
        # Every direct call of the model stays inside this context, where ZeRO-3 parameters are gathered.
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation
        ) as unwrapped_model:
            samples = LaDiRPipeline(unwrapped_model).sample(
                prompt_ids,
                prompt_mask,
                num_latents=1,  # rows are already repeated
                latent_group_size=num_latents,
                num_denoise_steps=args.num_denoise_steps,
                sde_noise_level=args.sde_noise_level,
                initial_noise_scale=args.initial_noise_scale,
                cfg_scale=args.cfg_scale,
                diversity_guidance_scale=args.diversity_guidance_scale,
                max_blocks=args.max_latent_blocks,
                num_decodes_per_latent=num_decodes,
                max_new_tokens=self.max_completion_length,
                temperature=self.temperature,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.processing_class.pad_token_id,
                static_cache=args.cache_implementation == "static",
            )
            trace = samples.trace
            # numeric guard: a NaN / inf velocity makes the trace's latents non-finite; its log-probs may be too
            finite_rows = self._finite_trace_rows(trace)
            output.update(
                step_latents=trace.step_latents.nan_to_num(0.0, 0.0, 0.0),  # a skipped trace must not poison the loss
                timesteps=trace.timesteps.expand(batch, -1),
                mean_offsets=trace.mean_offsets.nan_to_num(0.0, 0.0, 0.0),
                block_mask=trace.block_mask,
                step_indices=self._sample_step_indices(batch, trace.step_log_probs.shape[2]),
            )
            num_blocks = trace.block_mask.shape[1]
            output["sampler_log_probs"] = trace.step_log_probs.nan_to_num(0.0, 0.0, 0.0).gather(
                2, output["step_indices"][:, None, :].expand(-1, num_blocks, -1)
            )
            completion_tensors = [torch.tensor(ids, device=device) for ids in samples.completion_ids]
            completion_ids = pad(completion_tensors, padding_value=self.processing_class.pad_token_id, padding_side="right")
            completion_mask = pad([torch.ones_like(ids) for ids in completion_tensors], padding_value=0, padding_side="right")
            if args.text_policy_coef > 0:
                output["completion_ids"] = completion_ids.view(batch, num_decodes, -1)
                output["completion_mask"] = completion_mask.view(batch, num_decodes, -1)
            # The ratio's denominator. When every micro-batch of this rollout is used before the next optimizer
            # step, the current log-probabilities are the old ones (the loss detaches them); otherwise record them
            # now with the computation the loss uses. (The sampler's own values agree to float precision; tested.)
            if args.gradient_accumulation_steps % (args.steps_per_generation * self.num_iterations) != 0:
                denoising = unwrapped_model.denoising_log_probs(**self._denoising_inputs(output))
                output["old_log_probs"] = denoising["log_probs"]
                if args.text_policy_coef > 0:
                    answer = unwrapped_model.answer_log_probs(**self._answer_inputs(output))
                    output["old_text_log_probs"] = answer["log_probs"].view(batch, num_decodes, -1)
            latent_texts = None
            if self.log_completions:
                latent_texts = unwrapped_model.decode_latents_to_text(
                    trace.latents[:, 0], self.processing_class, max_new_tokens=32
                )
        if self.ref_denoiser is not None:
            output["ref_means"] = self.ref_denoiser(task="denoising_log_probs", **self._denoising_inputs(output))["means"]
        completion_texts = self.processing_class.batch_decode(samples.completion_ids, skip_special_tokens=True)
        if is_conversational(inputs[0]):
            completions = [[{"role": "assistant", "content": text}] for text in completion_texts]
        else:
            completions = completion_texts

        # 3. rewards of all N * M answers, exactly as GRPO computes them (gathered across processes)
        start_time = time.perf_counter()
        repeated_inputs = [row for row in inputs for _ in range(num_decodes)]
        repeated_prompts = [prompt for prompt in prompts for _ in range(num_decodes)]
        rewards_per_func = self._calculate_rewards(
            repeated_inputs, repeated_prompts, completions, samples.completion_ids
        )  # (world * B * M, F)
        scoring_seconds = time.perf_counter() - start_time
        unscorable = rewards_per_func.isnan().all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        rewards_per_latent = rewards.view(-1, num_decodes)  # (world * B, M)

        # 4. latent utility U_i: the decoder-marginalised reward of latent i
        if args.latent_utility == "mean":
            utility = torch.nanmean(rewards_per_latent, dim=1)
        elif args.latent_utility == "max":
            utility = rewards_per_latent.nan_to_num(float("-inf")).max(dim=1).values
        else:
            utility = rewards_per_latent.nan_to_num(float("inf")).min(dim=1).values
        if utility.isinf().any():
            logger.warning(
                "%d of %d latents have an answer with an infinite reward: those latents are left out of this update "
                "(advantage 0), their other answers included.", int(utility.isinf().sum()), utility.numel()
            )
        utility = utility.masked_fill(utility.isinf(), float("nan"))
        # traces the numeric guard skipped: no utility, so no advantage, and they do not shift their group's statistics
        utility = utility.masked_fill(~self.accelerator.gather(finite_rows), float("nan"))

        # 5. advantages over the N latents of each prompt, with GRPO's `scale_rewards` semantics
        grouped_utility = utility.view(-1, num_latents)
        group_mean = torch.nanmean(grouped_utility, dim=1).repeat_interleave(num_latents)
        group_std = nanstd(grouped_utility, dim=1).repeat_interleave(num_latents)
        advantages = utility - group_mean
        if self.scale_rewards == "group":
            advantages = advantages / (group_std + ADVANTAGE_EPS)
        elif self.scale_rewards == "batch":
            advantages = advantages / (nanstd(utility) + ADVANTAGE_EPS)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        process_slice = slice(self.accelerator.process_index * batch, (self.accelerator.process_index + 1) * batch)
        all_advantages, output["advantages"] = advantages, advantages[process_slice]

        if args.text_policy_coef > 0:
            # 7. text advantage: an answer against the other answers of the same latent
            local_rewards = rewards_per_latent[process_slice]
            text_advantages = local_rewards - torch.nanmean(local_rewards, dim=1, keepdim=True)
            if self.scale_rewards == "group":  # the group of an answer is the M answers of its latent
                text_advantages = text_advantages / (nanstd(local_rewards, dim=1).unsqueeze(1) + ADVANTAGE_EPS)
            elif self.scale_rewards == "batch":
                text_advantages = text_advantages / (nanstd(rewards_per_latent) + ADVANTAGE_EPS)
            output["text_advantages"] = torch.nan_to_num(text_advantages, nan=0.0) * finite_rows[:, None]

        self._log_rollout(
            mode, inputs, prompts, completions, completion_texts, completion_mask, rewards_per_func, rewards, utility,
            group_std, all_advantages, samples, latent_texts, num_latents, scoring_seconds,
        )
        # the units the "dapo" loss divides by, over the whole generation batch: trained (block, step) pairs of the
        # traces, and answer tokens
        num_trained_steps = output["step_indices"].shape[1]
        output["num_items_in_batch"] = self.accelerator.gather(trace.block_mask.sum() * num_trained_steps).sum().float()
        if args.text_policy_coef > 0:
            output["num_text_items_in_batch"] = self.accelerator.gather(completion_mask.sum()).sum().float()
        return output

    def _finite_trace_rows(self, trace) -> torch.Tensor:
        """Which sampled traces are finite (latents and the log-probs of their real blocks); the others are reported
        and skipped, or stop training, as `on_non_finite` says."""
        finite_latents = trace.step_latents.flatten(1).isfinite().all(1)
        real_steps = trace.block_mask[:, :, None].expand_as(trace.step_log_probs)
        finite_log_probs = (trace.step_log_probs.isfinite() | ~real_steps).flatten(1).all(1)
        finite_rows = finite_latents & finite_log_probs
        if not finite_rows.all():
            what = []
            if not finite_latents.all():
                what.append(f"latents of {int((~finite_latents).sum())} (a non-finite velocity or latent input)")
            if not finite_log_probs.all():
                what.append(f"denoising log-probabilities of {int((~finite_log_probs).sum())}")
            message = (
                f"Step {self.state.global_step + 1}: NaN/inf in the sampled {' and '.join(what)} of {finite_rows.numel()} "
                "latent traces"
            )
            if self.args.on_non_finite == "stop":
                raise FloatingPointError(
                    f"{message}. Training stopped (on_non_finite='stop'); the last saved checkpoint is intact. Check the "
                    "model's weights for NaN, lower the learning rate, or set on_non_finite='skip' to leave such traces "
                    "out of the update."
                )
            logger.warning("%s: they are left out of this update (advantage 0).", message)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["non_finite/skipped_traces"].append(
            self.accelerator.gather((~finite_rows).sum()[None]).sum().item()
        )
        return finite_rows

    def _sample_step_indices(self, batch: int, num_steps: int) -> torch.Tensor:
        """Which denoising steps of each trace enter the loss: a random subset, the same for every block."""
        num_trained_steps = max(1, round(self.args.train_timestep_fraction * num_steps))
        order = torch.rand(batch, num_steps, device=self.accelerator.device).argsort(dim=1)
        return order[:, :num_trained_steps].sort(dim=1).values

    # ------------------------------------------------------------------ loss

    # the denoising inputs with one entry per row (the others are shared by all rows)
    _PER_ROW_DENOISING_INPUTS = ("prompt_ids", "prompt_mask", "step_latents", "mean_offsets", "block_mask", "step_indices")

    def _denoising_inputs(self, inputs: dict) -> dict:
        return {
            "prompt_ids": inputs["prompt_ids"],
            "prompt_mask": inputs["prompt_mask"],
            "step_latents": inputs["step_latents"],
            "timesteps": inputs["timesteps"][0],
            "mean_offsets": inputs["mean_offsets"],
            "block_mask": inputs["block_mask"],
            "step_indices": inputs["step_indices"],
            "sde_noise_level": self.args.sde_noise_level,
            "cfg_scale": self.args.cfg_scale,
            # velocity-head policy: the latent loss moves the head only, even when the text term trains the shared
            # parameters (they are trainable then, and the velocity is computed from them). The denoiser adapter
            # learns through the LM's features, so they are not detached: with the text term on, the latent loss
            # then also reaches the shared parameters the noisy blocks read (their inputs and clean context).
            "detach_velocity_features": self.args.latent_policy_parameters == "velocity_head",
        }

    def _answer_inputs(self, inputs: dict) -> dict:
        """The ``B * M`` answers as rows, each with its latent's prompt and clean blocks."""
        num_decodes = inputs["completion_ids"].shape[1]
        return {
            "prompt_ids": inputs["prompt_ids"].repeat_interleave(num_decodes, dim=0),
            "prompt_mask": inputs["prompt_mask"].repeat_interleave(num_decodes, dim=0),
            "latents": inputs["step_latents"][:, :, -1].repeat_interleave(num_decodes, dim=0),
            "block_mask": inputs["block_mask"].repeat_interleave(num_decodes, dim=0),
            "answer_ids": inputs["completion_ids"].flatten(0, 1),
            "answer_mask": inputs["completion_mask"].flatten(0, 1),
            "temperature": self.temperature,
        }

    def _clipped_objective(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PPO's ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)``, with GRPO's `delta` (``rho`` capped at delta
        in the unclipped term, the two-sided clip), and where the clip binds: low (``rho < 1 - eps_low``, ``A < 0``)
        and high (``rho > 1 + eps_high``, ``A > 0``)."""
        ratio = torch.exp(log_ratio)
        clipped_ratio = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        capped_ratio = ratio if self.args.delta is None else torch.clamp(ratio, max=self.args.delta)
        loss = -torch.min(capped_ratio * advantages, clipped_ratio * advantages)
        is_low_clipped = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        is_high_clipped = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        return loss, is_low_clipped, is_high_clipped

    def _aggregate(self, unit_loss: torch.Tensor, mask: torch.Tensor, num_items_in_batch, units_per_row: int):
        """GRPO's `loss_type` normalisations, with a unit being a (block, denoising step) of a trace for the latent
        loss and a token of an answer for the text loss. ``unit_loss`` and ``mask`` are ``(rows, units)``.

        grpo: mean over a row's units, then over rows. bnpo: mean over the micro-batch's units. dr_grpo: sum over
        units / (rows * units_per_row), a constant. dapo: sum / units of the whole generation batch (all processes).
        luspo: sum over a row's units, mean over rows. Scaled for gradient accumulation as GRPOTrainer does.
        """
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        masked = unit_loss * mask
        if self.loss_type == "grpo":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked.sum() / (unit_loss.shape[0] * units_per_row) / accumulation
        if self.loss_type == "dapo":
            # `num_items_in_batch` spans the generation batch, so rescale it to one accumulation window
            normalizer = num_items_in_batch.clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return masked.sum() / normalizer
        return masked.sum(-1).mean() / accumulation  # luspo

    def _compute_loss(self, model, inputs):
        loss = self._policy_loss(model, inputs)
        # numeric guard: every process must agree, since the gradients of a non-finite loss reach all of them
        non_finite = self.accelerator.gather((~torch.isfinite(loss.detach()))[None].float()).sum().item() > 0
        if non_finite:
            message = f"Step {self.state.global_step + 1}: the loss is non-finite ({loss.item()})"
            if self.args.on_non_finite == "stop" or self.is_deepspeed_enabled:
                why = "on_non_finite='stop'" if not self.is_deepspeed_enabled else "DeepSpeed owns the optimizer step"
                raise FloatingPointError(
                    f"{message}. Training stopped ({why}); the last saved checkpoint is intact. Check the model's "
                    "weights and the rollout for NaN, or lower the learning rate."
                )
        mode = "train" if self.model.training else "eval"
        if non_finite and mode == "train":
            logger.warning("%s: this optimizer step is dropped, no parameter moves.", message)
            self._drop_non_finite_update.pending = True
        elif non_finite:
            logger.warning("%s in evaluation.", message)
        self._metrics[mode]["non_finite/skipped_updates"].append(float(non_finite))
        return loss

    def _rows_with_latent_gradient(self, inputs) -> torch.Tensor:
        """The rows whose denoising steps the loss has to score. Without the KL term a trace with advantage 0 adds
        exactly 0 to the latent loss and to its gradient (``-min(rho 0, clip(rho) 0)``), whatever its ratio, so only
        the others are fed to the model; a prompt whose latents all scored alike (`frac_reward_zero_std`) then costs
        no forward or backward. At least one row is kept, so that every process runs the same forward and backward
        (DDP / ZeRO collectives); its loss is 0 when its advantage is."""
        advantages = inputs["advantages"]
        if self.latent_kl_beta > 0:
            return torch.arange(advantages.shape[0], device=advantages.device)
        rows = advantages.nonzero().flatten()
        return rows if rows.numel() > 0 else rows.new_zeros(1)

    def _policy_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        use_text_policy = self.args.text_policy_coef > 0
        rows = self._rows_with_latent_gradient(inputs)
        denoising_inputs = {
            name: value[rows] if name in self._PER_ROW_DENOISING_INPUTS else value
            for name, value in self._denoising_inputs(inputs).items()
        }
        # one call of the wrapped model, so DDP / DeepSpeed hooks see every parameter that gets a gradient
        outputs = model(
            task="policy",
            denoising=denoising_inputs,
            answer=self._answer_inputs(inputs) if use_text_policy else None,
        )

        # 6. latent policy: a clipped ratio per denoising step, masked to real blocks. The units of the loss are the
        # (block, step) pairs of a trace, flattened: they play the role of GRPO's completion tokens. Only the scored
        # `rows` are computed; the others' units (advantage 0) are 0 in the loss and count in its normaliser.
        log_probs = outputs["denoising"]["log_probs"]  # (rows, blocks, steps)
        num_rows, num_blocks, num_steps = log_probs.shape
        batch = inputs["advantages"].shape[0]
        old_log_probs = inputs["old_log_probs"][rows] if "old_log_probs" in inputs else log_probs.detach()
        step_mask = inputs["block_mask"][rows, :, None].expand_as(log_probs).float().reshape(num_rows, -1)
        log_ratio = (log_probs - old_log_probs).reshape(num_rows, -1)
        if self.importance_sampling_level == "sequence":  # GSPO: one ratio per trace
            log_ratio = ((log_ratio * step_mask).sum(-1, keepdim=True) / step_mask.sum(-1, keepdim=True).clamp(min=1))
            log_ratio = log_ratio.expand_as(step_mask)
        advantages = inputs["advantages"][rows, None]
        step_loss, is_low_clipped, is_high_clipped = self._clipped_objective(log_ratio, advantages)
        if self.args.off_policy_mask_threshold is not None:
            # DeepSeek-V3.2's off-policy mask: drop a trace with A < 0 whose mean log(pi_old / pi_theta) is too large
            step_loss = step_loss * self.get_off_policy_mask(
                advantages, log_probs.reshape(num_rows, -1), old_log_probs.reshape(num_rows, -1), step_mask,
                self.args.off_policy_mask_threshold,
            )
        if self.latent_kl_beta > 0:
            # KL between Gaussians with the same std: ||mu_theta - mu_ref||^2 / (2 std^2), summed over the latent
            means, stds = outputs["denoising"]["means"], outputs["denoising"]["stds"]
            kl = ((means - inputs["ref_means"][rows]).pow(2).flatten(3).sum(-1) / (2 * stds.pow(2))).reshape(num_rows, -1)
            if self.args.use_bias_correction_kl:  # the KL of samples drawn by the old policy, reweighted
                kl = kl * torch.exp(log_ratio)
            step_loss = step_loss + self.latent_kl_beta * kl
            self._metrics[mode]["latent_kl"].append(self._masked_global_mean(kl, step_mask))
        # back to every row of the micro-batch (0 in the rows not scored), so that each loss_type normalises as if all
        # had been scored
        all_step_mask = inputs["block_mask"][:, :, None].expand(-1, -1, num_steps).float().reshape(batch, -1)

        def every_row(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(all_step_mask.shape).index_copy(0, rows, values)

        units_per_row = self._max_latent_blocks * num_steps
        loss = self._aggregate(every_row(step_loss), all_step_mask, inputs["num_items_in_batch"], units_per_row)
        # the clip ratios count every unit (a trace with advantage 0 is never clipped); approx_kl and the sampler's
        # gap are over the scored rows, the only ones whose log-probs were computed
        is_low_clipped, is_high_clipped = every_row(is_low_clipped.float()), every_row(is_high_clipped.float())
        self._metrics[mode]["clip_ratio/low_mean"].append(self._masked_global_mean(is_low_clipped, all_step_mask))
        self._metrics[mode]["clip_ratio/high_mean"].append(self._masked_global_mean(is_high_clipped, all_step_mask))
        self._metrics[mode]["clip_ratio/region_mean"].append(
            self._masked_global_mean(torch.maximum(is_low_clipped, is_high_clipped), all_step_mask)
        )
        self._metrics[mode]["approx_kl"].append(
            self._masked_global_mean((old_log_probs - log_probs.detach()).reshape(num_rows, -1), step_mask)
        )
        if "sampler_log_probs" in inputs:
            # the sampler's recorded log-probs against the loss's recomputation: ~0 at the weights that sampled
            gap = (inputs["sampler_log_probs"][rows] - log_probs.detach()).abs().reshape(num_rows, -1)
            self._metrics[mode]["sampler_log_prob_gap"].append(self._masked_global_mean(gap, step_mask))

        # 7. text policy: token-level clipped ratio, advantage within the latent
        if use_text_policy:
            token_log_probs = outputs["answer"]["log_probs"]  # (B * M, C)
            token_mask = inputs["completion_mask"].flatten(0, 1).float()
            old_token_log_probs = inputs.get("old_text_log_probs")
            old_token_log_probs = token_log_probs.detach() if old_token_log_probs is None else old_token_log_probs.flatten(0, 1)
            text_advantages = inputs["text_advantages"].flatten()[:, None]
            token_loss, text_low, text_high = self._clipped_objective(token_log_probs - old_token_log_probs, text_advantages)
            if self.args.off_policy_mask_threshold is not None:
                token_loss = token_loss * self.get_off_policy_mask(
                    text_advantages, token_log_probs, old_token_log_probs, token_mask, self.args.off_policy_mask_threshold
                )
            text_loss = self._aggregate(
                token_loss, token_mask, inputs["num_text_items_in_batch"], self.max_completion_length
            )
            loss = loss + self.args.text_policy_coef * text_loss
            self._metrics[mode]["text_clip_ratio"].append(self._masked_global_mean((text_low | text_high).float(), token_mask))
            self._metrics[mode]["text_entropy_trained"].append(
                self._masked_global_mean(outputs["answer"]["entropy"].detach(), token_mask)
            )
        return loss

    def _masked_global_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        totals = torch.stack([(values.detach().float() * mask).sum(), mask.sum()])
        total, count = self.accelerator.gather(totals[None]).sum(0).tolist()
        return total / max(count, 1.0)

    # ------------------------------------------------------------------ metrics and the completions table

    def _log_rollout(
        self, mode, inputs, prompts, completions, completion_texts, completion_mask, rewards_per_func, rewards,
        utility, group_std, all_advantages, samples, latent_texts, num_latents, scoring_seconds,
    ):
        metrics = self._metrics[mode]
        num_decodes = self.num_decodes_per_latent
        device = self.accelerator.device
        for index, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, index]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, index]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        metrics["latent_utility/mean"].append(torch.nanmean(utility).item())
        metrics["latent_utility/std"].append(nanstd(utility).item())
        # a prompt whose N latents all have the same utility gives no latent gradient
        metrics["frac_reward_zero_std"].append(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item())

        # text and latent diversity, from everything the processes sampled
        all_texts = gather_object(completion_texts)
        per_latent = [all_texts[i : i + num_decodes] for i in range(0, len(all_texts), num_decodes)]
        agreement = [Counter(answers).most_common(1)[0][1] / len(answers) for answers in per_latent]
        metrics["decode_agreement"].append(sum(agreement) / len(agreement))
        per_prompt = num_latents * num_decodes
        distinct = [len(set(all_texts[i : i + per_prompt])) for i in range(0, len(all_texts) - per_prompt + 1, per_prompt)]
        if distinct:
            metrics["distinct_answers_per_prompt"].append(sum(distinct) / len(distinct))
        latents = samples.latents.flatten(1)
        local_groups = latents.shape[0] // num_latents
        if local_groups and num_latents > 1:
            grouped = latents[: local_groups * num_latents].view(local_groups, num_latents, -1).float()
            distances = torch.cdist(grouped, grouped)
            pairs = num_latents * (num_latents - 1)
            diversity = torch.tensor([distances.sum().item() / (pairs * local_groups)], device=device)
            metrics["latent_diversity"].append(self.accelerator.gather(diversity).mean().item())
        trace = samples.trace
        local = torch.tensor(
            [
                completion_mask.sum(1).float().mean().item(),
                samples.token_entropy.mean().item(),
                trace.num_blocks.float().mean().item(),
                trace.denoise_seconds,
                samples.decode_seconds,
                scoring_seconds,
            ],
            device=device,
        )
        (mean_length, entropy, blocks, denoise_seconds, decode_seconds, scoring_seconds) = (
            self.accelerator.gather(local[None]).mean(0).tolist()
        )
        metrics["completions/mean_length"].append(mean_length)
        metrics["entropy"].append(entropy)
        metrics["latent_blocks/mean"].append(blocks)
        metrics["time/denoising"].append(denoise_seconds)
        metrics["time/decoding"].append(decode_seconds)
        metrics["time/scoring"].append(scoring_seconds)

        # completions table: one row per answer, with the latent shown as text by the VAE decoder
        if latent_texts is not None:
            self._logs["extra"]["latent (first block)"].extend(
                gather_object([text for text in latent_texts for _ in range(num_decodes)])
            )
        self._logs["prompt"].extend(gather_object([prompt for prompt in prompts for _ in range(num_decodes)]))
        self._logs["completion"].extend(gather_object(completions))
        for index, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, index].tolist())
        self._logs["advantages"].extend(all_advantages.repeat_interleave(num_decodes).tolist())
        # columns and metrics that reward functions logged (log_extra / log_metric), as GRPO flushes them
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [None] * len(completions))
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            totals = torch.tensor([[sum(values), len(values)]], dtype=torch.float32, device=device)
            total, count = self.accelerator.gather(totals).sum(0).tolist()
            metrics[name].append(total / max(count, 1.0))
        self._pending_metrics.clear()
