"""`LaDiRPipeline`: sample latent reasoning traces with a `LaDiRModel` and decode answers from them.

```python
from transformers import AutoTokenizer
from trl_ladi import LaDiRModel, LaDiRPipeline

pipeline = LaDiRPipeline(LaDiRModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))
samples = pipeline.sample_answers(["What is 12 + 7 - 5?"], num_latents=4, num_decodes_per_latent=2)
samples.texts  # 8 answers: 4 latent traces, each decoded twice
```

As in diffusers, the model gives the steps, `trl_ladi.sampling` the math of a step, and this file the loop:

    context = model.prefill(prompt_ids, prompt_mask)
    for block in range(max_blocks):
        z = initial_noise_scale * noise
        for step in range(K):
            velocity = model.denoising_velocity(context, z, t)          (and without the prompt, for CFG)
            z ~ sampling.policy_step(z, velocity, t, t_next, ...)         (recorded in a LatentTrace)
        stop_logits = model.append_block(context, z, is_real)
        stop once every row chose "answer" (until then, only the rows still writing are fed to the LM)
    then M answers per latent, token by token from the shared context (model.answer_step)

A token-posterior model (`LaDiRConfig.velocity_parameterization="token_posterior"`) writes a block slot by slot:

        for slot in range(L):
            prior = model.next_slot_prior(context, last_slot)             (feeds one position: the slot before)
            for step in range(K):
                velocity = model.posterior_velocity(prior, z_slot, t)     (exact, no forward)
                z_slot ~ sampling.policy_step(z_slot, velocity, t, t_next, ...)

        or, with `draw_slots_from_prior=True` (evaluation only: no steps to score), where those steps end as they get
        small: z_slot = codebook[v] with v ~ softmax(prior / T)

The RL trainer calls `sample` on token ids; `sample_answers` is text in, text out.
"""

import time
from dataclasses import dataclass

import torch

from trl_ladi import sampling
from trl_ladi.modeling import (
    ANSWER,
    STATIC_SHAPE_MULTIPLE,
    LaDiRModel,
    ReasonerContext,
    check_tokenizer,
    tokenize_prompts,
)


@dataclass
class LatentTrace:
    """What the sampler recorded for a batch of latent reasoning traces (``R`` rows, ``Bm`` blocks, ``K`` steps).

    ``step_latents[:, b, k]`` is ``z`` before step ``k`` of block ``b``; ``step_latents[:, b, K]`` is the clean
    block. ``mean_offsets[:, b, k]`` is the weight-independent term added to the mean of step ``k`` (the diversity
    guidance; zero without it), kept so that the loss recomputes the same policy. Classifier-free guidance is not in
    it: it enters the step through the velocities. ``num_blocks[r]`` blocks of row ``r`` are real; later blocks were
    computed for the batch but are masked out everywhere.
    """

    step_latents: torch.Tensor = None  # (R, Bm, K + 1, L, D)
    timesteps: torch.Tensor = None  # (K + 1,)
    step_means: torch.Tensor = None  # (R, Bm, K, L, D)
    step_stds: torch.Tensor = None  # (R, Bm, K)
    step_log_probs: torch.Tensor = None  # (R, Bm, K)
    mean_offsets: torch.Tensor = None  # (R, Bm, K, L, D)
    num_blocks: torch.Tensor = None  # (R,)
    block_mask: torch.Tensor = None  # (R, Bm)
    num_lm_tokens: int = 0  # positions fed to the LM while sampling, answers included (shows the cache at work)
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
    texts: list = None  # `sample_answers` only
    latents: torch.Tensor = None  # (R, Bm, L, D), zero on masked blocks
    token_entropy: torch.Tensor = None  # (R * M,) mean entropy of the sampling distribution over each answer
    decode_seconds: float = 0.0


class LaDiRPipeline:
    """Latent reasoning traces and answers from a [`LaDiRModel`].

    Args:
        model (`LaDiRModel`): the model; the pipeline only calls its step methods.
        tokenizer (*optional*): the base model's tokenizer, needed by `sample_answers` (text in, text out).
    """

    def __init__(self, model: LaDiRModel, tokenizer=None):
        if tokenizer is not None:
            check_tokenizer(tokenizer)
        self.model = model
        self.tokenizer = tokenizer

    @torch.no_grad()
    def sample_answers(
        self, prompts: list, num_latents: int = 1, num_decodes_per_latent: int = 1, **kwargs
    ) -> AnswerSamples:
        """Text in, text out: tokenize ``prompts`` (strings or chat messages), sample, and decode the answers.

        ``kwargs`` are those of :meth:`sample`. Returns :class:`AnswerSamples` with ``texts`` (``len(prompts) * N * M``
        strings, prompt-major, then latent, then decode) and ``latents`` ``(len(prompts) * N, Bm, L, D)``.
        """
        if self.tokenizer is None:
            raise ValueError("sample_answers needs the tokenizer: LaDiRPipeline(model, tokenizer).")
        prompt_ids, prompt_mask = tokenize_prompts(self.tokenizer, prompts, device=self.model.device)
        kwargs.setdefault("eos_token_ids", [self.tokenizer.eos_token_id])
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        samples = self.sample(
            prompt_ids, prompt_mask, num_latents=num_latents, num_decodes_per_latent=num_decodes_per_latent, **kwargs
        )
        samples.texts = self.tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
        return samples

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
        draw_slots_from_prior: bool = False,
        num_decodes_per_latent: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int = 0,
        static_cache: bool = False,
        generator: torch.Generator | None = None,
    ) -> AnswerSamples:
        """Sample latent reasoning traces for left-padded prompts ``(B, P)`` and decode answers from them.

        Each prompt gets ``num_latents`` traces (rows ``p * N .. p * N + N - 1``), and every trace
        ``num_decodes_per_latent`` answers decoded from one shared prefix. ``latent_group_size`` (default
        ``num_latents``) says how many consecutive rows are latents of one prompt, for the diversity guidance; the RL
        trainer passes rows already repeated, with ``num_latents=1``. The latent arguments are those of
        :meth:`sample_latents`, the answer arguments those of :meth:`decode_answers`.

        ``static_cache=True`` runs the pass against a key/value cache of fixed size (`LaDiRModel.static_cache_length`)
        that keeps the rows that stopped, masked: every denoising step, slot and answer token then feeds the LM the
        same shapes at the same addresses, so a decoder compiled with ``torch.compile(mode="reduce-overhead")``
        replays each as one CUDA graph (docs/benchmarks.md). The samples are those of the default growing cache, to
        floating-point rounding.
        """
        start_time = time.perf_counter()
        static_cache_length = None
        if static_cache:
            # more left padding (masked; positions count the real tokens, so the samples are the same): prompts of
            # nearby lengths then give the prefill one shape and the pass one cache size, so one set of graphs
            prompt_ids, prompt_mask = _left_pad_to_multiple(prompt_ids, prompt_mask, STATIC_SHAPE_MULTIPLE, pad_token_id)
            static_cache_length = self.model.static_cache_length(
                prompt_ids.shape[1], self.model.config.max_blocks if max_blocks is None else max_blocks, max_new_tokens
            )
        context = self.model.prefill(
            prompt_ids.repeat_interleave(num_latents, dim=0),
            prompt_mask.repeat_interleave(num_latents, dim=0),
            static_cache_length=static_cache_length,
        )
        trace = self.sample_latents(
            context,
            num_denoise_steps=num_denoise_steps,
            sde_noise_level=sde_noise_level,
            initial_noise_scale=initial_noise_scale,
            cfg_scale=cfg_scale,
            diversity_guidance_scale=diversity_guidance_scale,
            latent_group_size=latent_group_size or num_latents,
            max_blocks=max_blocks,
            draw_slots_from_prior=draw_slots_from_prior,
            generator=generator,
        )
        trace.denoise_seconds = time.perf_counter() - start_time

        start_time = time.perf_counter()
        completion_ids, token_entropy = self.decode_answers(
            context,
            num_decodes=num_decodes_per_latent,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            generator=generator,
        )
        trace.num_lm_tokens = context.num_lm_tokens
        return AnswerSamples(
            completion_ids=completion_ids,
            trace=trace,
            latents=trace.latents * trace.block_mask[:, :, None, None],
            token_entropy=token_entropy,
            decode_seconds=time.perf_counter() - start_time,
        )

    @torch.no_grad()
    def sample_latents(
        self,
        context: ReasonerContext,
        num_denoise_steps: int | None = None,
        sde_noise_level: float = 0.0,
        initial_noise_scale: float | None = None,
        cfg_scale: float = 1.0,
        diversity_guidance_scale: float = 0.0,
        latent_group_size: int = 1,
        max_blocks: int | None = None,
        draw_slots_from_prior: bool = False,
        generator: torch.Generator | None = None,
    ) -> LatentTrace:
        """Denoise blocks one after another after the prompt in ``context``, until every row's stop head says
        "answer" or ``max_blocks`` blocks are written; the finished blocks are left in ``context``.

        A block starts from ``N(0, initial_noise_scale^2)`` and takes ``num_denoise_steps`` steps of the policy
        (``sde_noise_level = 0``: deterministic Euler). ``cfg_scale != 1`` adds classifier-free guidance (a second
        velocity with the prompt hidden); ``diversity_guidance_scale > 0`` repels the latents of a prompt (groups of
        ``latent_group_size`` consecutive rows) from each other. Defaults come from the model config.

        ``draw_slots_from_prior=True`` (a token posterior only) draws each slot's codebook row from its prior instead:
        the exact end point of the slot's denoising chain, which the ``K`` SDE steps approximate (their last step
        leaves noise of std ~0.13 at ``K = 6``, noise level 0.7). Such a trace records no steps (``K = 0``): it is for
        evaluation and generation, and RL cannot score it.
        """
        model, config = self.model, self.model.config
        num_denoise_steps = config.num_denoise_steps if num_denoise_steps is None else num_denoise_steps
        max_blocks = config.max_blocks if max_blocks is None else max_blocks
        if num_denoise_steps < 1 or max_blocks < 1:
            raise ValueError(
                f"num_denoise_steps and max_blocks must be at least 1 (None: the model config's), got "
                f"{num_denoise_steps} and {max_blocks}."
            )
        initial_noise_scale = config.initial_noise_scale if initial_noise_scale is None else initial_noise_scale
        if config.velocity_parameterization == "token_posterior":
            if cfg_scale != 1.0:
                raise ValueError(
                    f"cfg_scale={cfg_scale}: a 'token_posterior' model has no unconditional prior (its reasoner stage "
                    "reads every slot with the prompt), so classifier-free guidance has nothing to guide with. Use "
                    "cfg_scale=1.0."
                )
            if draw_slots_from_prior and diversity_guidance_scale != 0:
                raise ValueError(
                    f"diversity_guidance_scale={diversity_guidance_scale} with draw_slots_from_prior=True: a slot drawn "
                    "from its prior takes no denoising step for the guidance to act on. Use one or the other."
                )
            if initial_noise_scale != config.initial_noise_scale:
                raise ValueError(
                    f"initial_noise_scale={initial_noise_scale}: a 'token_posterior' denoiser is the exact posterior "
                    f"for the noise of its config ({config.initial_noise_scale}); set LaDiRConfig.initial_noise_scale "
                    "instead, or pass None."
                )
        elif draw_slots_from_prior:
            raise ValueError(
                f"draw_slots_from_prior=True needs a 'token_posterior' model (its slots are codebook rows with a "
                f"prior); this one's velocity_parameterization is {config.velocity_parameterization!r}."
            )
        rows, device = context.rows, context.key_is_real.device
        block_shape = (rows, config.latent_tokens_per_block, config.latent_dim)
        dtype = torch.promote_types(model.dtype, torch.float32)  # the step's math: float32, or float64 for such a model
        timesteps = sampling.flow_matching_timesteps(num_denoise_steps, config.timestep_shift).to(device)
        if draw_slots_from_prior:
            timesteps = timesteps[-1:]  # no steps: each slot is drawn at t = 0

        record = {name: [] for name in ("step_latents", "step_means", "step_stds", "step_log_probs", "mean_offsets")}
        block_mask = []
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        for _ in range(max_blocks):
            block_mask.append(~stopped)
            # Only the rows still writing are fed to the LM. A row whose stop head chose the answer gets a masked block
            # in the cache without a forward, and velocity 0 in the step math (its records are masked everywhere).
            # A static cache keeps its shapes instead: every row is fed, and the stopped rows' outputs are zeroed.
            writing = (~stopped).nonzero().squeeze(-1)
            keep_rows = len(writing) == rows or context.static_length is not None
            block_context = context if keep_rows else context.select_rows(writing)
            if draw_slots_from_prior:  # no start noise: the slots are drawn, not denoised
                steps = self._draw_slots_from_prior(block_context, writing, block_shape, dtype, generator)
            else:
                z = initial_noise_scale * torch.randn(block_shape, device=device, dtype=dtype, generator=generator)
                policy = dict(
                    timesteps=timesteps, sde_noise_level=sde_noise_level, cfg_scale=cfg_scale,
                    diversity_guidance_scale=diversity_guidance_scale, latent_group_size=latent_group_size,
                    active=block_mask[-1], generator=generator,
                )
                if config.velocity_parameterization == "token_posterior":
                    steps = self._denoise_slot_by_slot(block_context, writing, z, policy)
                else:
                    steps = self._denoise_block(block_context, writing, z, policy)
            for name, values in steps.items():
                record[name].append(values)
            z = steps["step_latents"][:, -1]

            # the finished block becomes context; its <eot> decides: another block, or the answer
            if keep_rows:
                stopped |= model.append_block(context, z, is_real=block_mask[-1]).argmax(-1) == ANSWER
            else:
                is_real = torch.ones(len(writing), dtype=torch.bool, device=device)
                answers = model.append_block(block_context, z[writing], is_real=is_real).argmax(-1) == ANSWER
                context.append_from(block_context, writing)
                stopped[writing] |= answers
            if bool(stopped.all()):
                break

        block_mask = torch.stack(block_mask, 1)
        return LatentTrace(
            **{name: torch.stack(values, 1) for name, values in record.items()},
            timesteps=timesteps,
            num_blocks=block_mask.sum(1),
            block_mask=block_mask,
        )

    def _denoise_block(self, block_context, writing, z, policy: dict) -> dict:
        """All slots of a block at once, from noise ``z`` ``(R, L, D)`` in ``K`` policy steps; returns the block's
        records (:class:`LatentTrace`'s fields, without the block dimension)."""
        timesteps, rows = policy["timesteps"], z.shape[0]
        steps = {"step_latents": [z], "step_means": [], "step_stds": [], "step_log_probs": [], "mean_offsets": []}
        for step in range(len(timesteps) - 1):
            t, t_next = timesteps[step].expand(rows), timesteps[step + 1].expand(rows)
            velocity = self._velocity(block_context, writing, z, t)
            velocity_uncond = None
            if policy["cfg_scale"] != 1.0:
                velocity_uncond = self._velocity(block_context, writing, z, t, see_prompt=False)
            z = self._policy_step(steps, z, velocity, t, t_next, policy, velocity_uncond)
        return {name: torch.stack(values, 1) for name, values in steps.items()}

    def _denoise_slot_by_slot(self, block_context, writing, z, policy: dict) -> dict:
        """Token posterior: slot ``j`` reads its prior from the finished slots before it (one forward), then takes its
        ``K`` policy steps with the exact posterior velocity, which needs no forward. Recorded as :meth:`_denoise_block`
        records a block: step ``k`` of the block is step ``k`` of every slot, its log-probability the sum over slots
        (each slot's step is a Gaussian of its own numbers), which is what the loss recomputes from the finished block.
        No classifier-free guidance (`sample_latents` refuses it): the reasoner stage trains no unconditional prior.
        """
        model, timesteps, rows = self.model, policy["timesteps"], z.shape[0]
        codebook = self._latent_codebook(block_context)
        codebook_squared_norms = codebook.square().sum(-1)  # |c_v|^2: every posterior step of the block reads them
        slots = []
        for slot in range(z.shape[1]):
            previous = None if slot == 0 else slots[-1]["step_latents"][:, -1, 0]  # where the last slot ended
            prior = self._slot_prior(block_context, writing, previous, rows)
            x = z[:, slot : slot + 1]  # (R, 1, D): this slot's latent through its steps
            steps = {"step_latents": [x], "step_means": [], "step_stds": [], "step_log_probs": [], "mean_offsets": []}
            for step in range(len(timesteps) - 1):
                t, t_next = timesteps[step].expand(rows), timesteps[step + 1].expand(rows)
                velocity = model.posterior_velocity(prior, x, t, codebook, codebook_squared_norms)
                x = self._policy_step(steps, x, velocity, t, t_next, policy)
            slots.append({name: torch.stack(values, 1) for name, values in steps.items()})
        return {
            "step_latents": torch.cat([s["step_latents"] for s in slots], 2),  # (R, K + 1, L, D)
            "step_means": torch.cat([s["step_means"] for s in slots], 2),
            "step_stds": slots[0]["step_stds"],  # a function of the schedule: the same for every slot
            "step_log_probs": sum(s["step_log_probs"] for s in slots),
            "mean_offsets": torch.cat([s["mean_offsets"] for s in slots], 2),
        }

    def _draw_slots_from_prior(self, block_context, writing, block_shape, dtype, generator) -> dict:
        """Token posterior, exact: slot ``j``'s token ``v ~ softmax(prior_j / T)`` (``T`` the model's
        ``token_readout_temperature``, as in the posterior), its latent the codebook row ``c_v``. The denoising chain of
        :meth:`_denoise_slot_by_slot` ends on ``c_v`` with this probability as its steps go to 0 (at ``t = 1`` the
        posterior is the prior); drawn here in one step. Returns the records of a chain with no steps (``K = 0``)."""
        model, (rows, num_slots, latent_dim) = self.model, block_shape
        codebook = self._latent_codebook(block_context)
        slots = []
        for _ in range(num_slots):
            prior_logits = self._slot_prior(block_context, writing, slots[-1] if slots else None, rows)[:, 0]
            probabilities = (prior_logits.to(dtype) / model.config.token_readout_temperature).softmax(-1)
            tokens = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
            slots.append(codebook[tokens].to(dtype))
        block = torch.stack(slots, 1)
        no_steps = block.new_zeros(rows, 0)
        return {
            "step_latents": block[:, None],  # (R, 1, L, D): the clean block only
            "step_means": block.new_zeros(rows, 0, num_slots, latent_dim),
            "step_stds": no_steps,
            "step_log_probs": no_steps,
            "mean_offsets": block.new_zeros(rows, 0, num_slots, latent_dim),
        }

    def _latent_codebook(self, block_context) -> torch.Tensor:
        """The model's latent codebook, computed once per sampling pass: it is a constant of the pass."""
        if block_context.latent_codebook is None:
            block_context.latent_codebook = self.model.latent_codebook()
        return block_context.latent_codebook

    def _policy_step(self, steps: dict, z, velocity, t, t_next, policy: dict, velocity_uncond=None) -> torch.Tensor:
        """One step of the SDE policy from ``z``; appends what it recorded to ``steps`` and returns the sample."""
        # the repulsion among a prompt's latents depends on z alone, not on the weights: stored with the step
        offset = sampling.diversity_guidance(
            z, policy["latent_group_size"], t, t_next, policy["diversity_guidance_scale"], active=policy["active"]
        )
        step_output = sampling.sde_step(
            z,
            velocity,
            t,
            t_next,
            policy["sde_noise_level"],
            self.model.config.sde_max_t,
            velocity_uncond=velocity_uncond,
            cfg_scale=policy["cfg_scale"],
            mean_offset=offset,
            generator=policy["generator"],
        )
        steps["step_latents"].append(step_output.sample)
        steps["step_means"].append(step_output.mean)
        steps["step_stds"].append(step_output.std)
        steps["step_log_probs"].append(step_output.log_prob)
        steps["mean_offsets"].append(offset)
        return step_output.sample

    def _slot_prior(self, block_context, writing, previous_slot, rows: int):
        """Prior logits ``(R, 1, V)`` of the next slot for every row (``previous_slot`` ``(R, D)``: where the last slot
        ended; None for the first); rows that chose the answer get a uniform prior without a forward (their records
        are masked everywhere)."""
        if block_context.rows == rows:  # every row fed: all are writing, or a static cache kept the stopped ones
            return _only_rows(self.model.next_slot_prior(block_context, previous_slot)[:, None], writing)
        logits = self.model.next_slot_prior(block_context, None if previous_slot is None else previous_slot[writing])
        logits = logits[:, None]
        priors = logits.new_zeros(rows, 1, logits.shape[-1])
        priors[writing] = logits
        return priors

    def _velocity(self, block_context: ReasonerContext, writing: torch.Tensor, z, t, see_prompt: bool = True):
        """The velocity of every row of ``z``; ``block_context`` holds the rows ``writing`` (all rows, or a
        `select_rows` copy), and the other rows, which chose the answer, get 0 without a forward."""
        if block_context.rows == z.shape[0]:
            return _only_rows(self.model.denoising_velocity(block_context, z, t, see_prompt=see_prompt), writing)
        velocity = torch.zeros_like(z)
        velocity[writing] = self.model.denoising_velocity(block_context, z[writing], t[writing], see_prompt=see_prompt)
        return velocity

    @torch.no_grad()
    def decode_answers(
        self,
        context: ReasonerContext,
        num_decodes: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[list[list[int]], torch.Tensor]:
        """Sample ``num_decodes`` answers per row of ``context`` (prompt and finished blocks), ``<soa>`` first.

        The context is repeated, cache included, so a latent's prefix is computed once for its ``num_decodes``
        answers. ``temperature = 0`` is greedy. Returns the token ids of each answer (rows ``r * M .. r * M + M - 1``
        for latent ``r``), cut after the first of ``eos_token_ids``, and each answer's mean token entropy.
        """
        eos_token_ids = list(eos_token_ids or [])
        into = None
        if context.static_length is not None and num_decodes > 1:
            into = self.model.reusable_static_cache(context.rows * num_decodes, context.static_length, "answers")
        context.repeat_interleave(num_decodes, into=into)
        rows, device = context.rows, context.key_is_real.device
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        entropy_sum, entropy_count = torch.zeros(rows, device=device), torch.zeros(rows, device=device)
        tokens, next_tokens = [], None
        for _ in range(max_new_tokens):
            logits = self.model.answer_step(context, next_tokens)
            # a NaN / inf latent upstream makes its rows' logits NaN: those answers end here, empty (the trace keeps
            # the NaN, for the caller's numeric guard to see)
            non_finite = ~torch.isfinite(logits).all(-1)
            logits = logits.masked_fill(non_finite[:, None], 0.0)
            broken = non_finite & ~finished
            log_probabilities = torch.log_softmax(logits / max(temperature, 1e-6), dim=-1)
            entropy_sum += (-(log_probabilities.exp() * log_probabilities).sum(-1)).masked_fill(finished, 0)
            entropy_count += (~finished).float()
            if temperature > 0:
                probabilities = torch.softmax(logits / temperature, dim=-1)
                next_tokens = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
            else:
                next_tokens = logits.argmax(-1)
            next_tokens = next_tokens.masked_fill(finished, pad_token_id)
            next_tokens = next_tokens.masked_fill(broken, eos_token_ids[0] if eos_token_ids else pad_token_id)
            finished |= broken
            tokens.append(next_tokens)
            if eos_token_ids:
                finished |= torch.isin(next_tokens, torch.tensor(eos_token_ids, device=device))
            if bool(finished.all()):
                break
        completion_ids = []
        for row in torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(rows)]:
            cut = next((i + 1 for i, token in enumerate(row) if token in eos_token_ids), len(row))
            completion_ids.append(row[:cut])
        return completion_ids, entropy_sum / entropy_count.clamp(min=1)


def _left_pad_to_multiple(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, multiple: int, pad_token_id: int):
    """Left-padded prompts ``(R, P)`` padded further on the left to a width that is a multiple of ``multiple``."""
    extra = -prompt_ids.shape[1] % multiple
    if extra == 0:
        return prompt_ids, prompt_mask
    padded_ids = torch.nn.functional.pad(prompt_ids, (extra, 0), value=pad_token_id)
    return padded_ids, torch.nn.functional.pad(prompt_mask, (extra, 0), value=0)


def _only_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values`` with every row not in ``rows`` (indices) set to 0: what a row that stopped gets when a static cache
    fed it anyway (a uniform prior, velocity 0), as if it had not been fed."""
    if len(rows) == values.shape[0]:
        return values
    keep = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    keep[rows] = True
    return torch.where(keep.view(-1, *[1] * (values.dim() - 1)), values, torch.zeros_like(values))
