"""The latent sampler's math: flow-matching timesteps, Euler and SDE steps with exact log-probabilities, guidance.

Rectified flow (LaDiR): a clean latent ``z_0`` and noise ``eps`` are joined by ``z_t = (1 - t) z_0 + t eps`` and the
model predicts the velocity ``u = eps - z_0``. Sampling integrates from ``t = 1`` (noise) to ``t = 0`` (clean).

For RL each step is made stochastic with the Flow-GRPO SDE, which has the same marginals as the ODE, so that every
step is a Gaussian with an exact log-probability. ``sde_noise_level = 0`` gives back the deterministic Euler step.
:func:`policy_step` is that Gaussian, guidance included: the sampler draws from it (:func:`sde_step`) and the RL loss
scores recorded transitions with it.

Everything here works on tensors of shape ``(batch, ...)``; nothing here knows about language models.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
from diffusers import FlowMatchEulerDiscreteScheduler


def flow_matching_timesteps(num_denoise_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The ``num_denoise_steps + 1`` times ``1 = t_0 > t_1 > ... > t_K = 0`` of the sampler, in ``[0, 1]``.

    Taken from diffusers' ``FlowMatchEulerDiscreteScheduler`` so that a shifted schedule means what it means there.
    The unshifted times are ``1, 1 - 1/K, ..., 1/K`` then 0, as diffusers' flow pipelines (SD3, Flux) pass them: the
    scheduler's own default ends with a step from ``t = 0.001`` to 0, whose tiny noise would dominate every
    log-probability of the SDE policy.
    """
    if num_denoise_steps < 1:
        raise ValueError(f"num_denoise_steps must be at least 1, got {num_denoise_steps}.")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_denoise_steps, num_denoise_steps))
    return scheduler.sigmas.to(torch.float32)  # the scheduler's sigmas are flow-matching times, ending with 0


def add_flow_noise(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy latent ``z_t = (1 - t) z_0 + t eps`` and the velocity target ``u = eps - z_0`` for flow matching."""
    t = _expand_like(t, clean)
    return (1 - t) * clean + t * noise, noise - clean


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Deterministic ODE step ``z_{t-d} = z_t - d v`` with ``d = t - t_next``."""
    step_size = _expand_like(t - t_next, sample)
    return sample - step_size * velocity


@dataclass
class SDEStepOutput:
    """One stochastic denoising step: the sample drawn, the Gaussian it was drawn from, and its log-probability."""

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # one value per batch row, broadcast over the latent dimensions
    log_prob: torch.Tensor  # summed over the latent dimensions, shape (batch,)


# ``sigma_t = a sqrt(t / (1 - t))`` diverges at ``t = 1`` (the first step), so ``t`` is capped inside it. The model
# config's ``sde_max_t`` defaults to this value too.
SDE_MAX_T = 0.9


def sde_std(t: torch.Tensor, t_next: torch.Tensor, sde_noise_level: float, max_t: float = SDE_MAX_T) -> torch.Tensor:
    """Standard deviation of one SDE step, ``sigma_t sqrt(d)`` with ``sigma_t = a sqrt(t / (1 - t))``, ``t`` capped at
    ``max_t`` inside ``sigma_t``. It depends on the schedule only, never on the model's weights."""
    capped_t = t.clamp(max=max_t)
    sigma_t = sde_noise_level * torch.sqrt(capped_t / (1 - capped_t))
    return sigma_t * torch.sqrt(t - t_next)


def policy_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    sde_noise_level: float,
    max_t: float = SDE_MAX_T,
    *,
    velocity_uncond: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    mean_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the denoising policy's Gaussian step from ``t`` to ``t_next``: the one definition of the policy.

    The sampler draws from it (:func:`sde_step`) and the RL loss scores recorded transitions with it, so the PPO
    ratio's numerator and denominator are the same function of the weights.

    * ``velocity`` is the model's (conditional) velocity. With classifier-free guidance (``cfg_scale != 1``) the
      unconditional one comes in as ``velocity_uncond`` and the step uses ``v = v_uncond + s (v_cond - v_uncond)``,
      so a gradient through the mean reaches both velocities.
    * ``mean_offset`` is added to the mean. It must not depend on the weights (the diversity guidance among the
      latents of a prompt), so that the sampler can store it and the loss add it back unchanged.

    Returns ``mean`` (shaped like ``sample``) and ``std`` (one value per row, ``(batch,)``).
    """
    t, t_next = _as_batch(t, sample), _as_batch(t_next, sample)
    if velocity_uncond is not None and cfg_scale != 1.0:
        velocity = classifier_free_guidance(velocity, velocity_uncond, cfg_scale)
    std = sde_std(t, t_next, sde_noise_level, max_t)
    t_, step_size = _expand_like(t, sample), _expand_like(t - t_next, sample)
    sigma_t_squared = _expand_like(std, sample) ** 2 / step_size  # sigma_t^2 = std^2 / d
    implied_noise = sample + (1 - t_) * velocity  # eps_hat, the noise the velocity implies
    # Flow-GRPO: the drift sigma_t^2 / (2 t) eps_hat cancels the spreading of the injected noise (eps_hat / t is minus
    # the score of z_t), so the SDE keeps the ODE's marginals; a = 0 leaves the Euler step z_t - d v.
    mean = sample - step_size * (velocity + sigma_t_squared / (2 * t_) * implied_noise)
    if mean_offset is not None:
        mean = mean + mean_offset
    return mean, std


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(value; mean, std^2 I)`` summed over all but the batch dimension; ``std`` has shape (batch,).

    Computed in float64: it is a sum over hundreds of dimensions and PPO ratios are exponentials of differences.
    """
    std = _expand_like(std, value).double()
    per_dim = -((value.double() - mean.double()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per_dim.flatten(1).sum(-1).to(value.dtype)


def sde_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    sde_noise_level: float,
    max_t: float = SDE_MAX_T,
    *,
    velocity_uncond: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    mean_offset: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStepOutput:
    """Draw ``z_{t_next} ~ N(mean, std^2)`` of :func:`policy_step` (same arguments) and return it with its exact
    log-probability.

    With ``sde_noise_level = 0`` the step is deterministic (the Euler step ``z_t - d v``, plus the offset): no noise
    is drawn and the log-probability is undefined (``nan``).
    """
    mean, std = policy_step(
        sample, velocity, t, t_next, sde_noise_level, max_t,
        velocity_uncond=velocity_uncond, cfg_scale=cfg_scale, mean_offset=mean_offset,
    )
    if sde_noise_level == 0:
        return SDEStepOutput(sample=mean, mean=mean, std=std, log_prob=torch.full_like(std, float("nan")))
    if noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    next_sample = mean + _expand_like(std, sample) * noise
    return SDEStepOutput(sample=next_sample, mean=mean, std=std, log_prob=gaussian_log_prob(next_sample, mean, std))


# Bytes of one (positions, V) tensor of the codebook posterior per chunk. A (..., V) tensor over a whole batch is
# hundreds of MB (16 traces x 3 blocks x 3 steps x 16 slots x 49152 tokens x 4 B = 453 MB); chunks of this size are
# reused by the memory allocator instead of being mapped afresh for every tensor, and the loss keeps no (..., V)
# tensor for its backward (each chunk is recomputed there).
POSTERIOR_CHUNK_BYTES = 16 * 2**20


def codebook_posterior_mean(
    prior_logits: torch.Tensor,
    sample: torch.Tensor,
    t: torch.Tensor,
    codebook: torch.Tensor,
    noise_scale: float,
    codebook_squared_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact denoiser ``E[z_0 | z_t]`` when ``z_0`` is one row of ``codebook`` ``(V, D)`` with prior
    ``softmax(prior_logits)`` ``(..., V)``, and ``z_t = (1 - t) z_0 + t noise_scale eps`` (``sample``, ``(..., D)``).

    Bayes: ``p(v | z_t) ~ p(v) N(z_t; (1 - t) c_v, (t noise_scale)^2 I)``, so the posterior logits are the prior's minus
    ``|z_t - (1 - t) c_v|^2 / (2 t^2 noise_scale^2)``; the mean is ``sum_v p(v | z_t) c_v``. At ``t = 1`` the noise
    says nothing and the mean is the prior's; as ``t -> 0`` it picks the nearest codebook row. ``t`` ``(...)`` per row;
    the caller never evaluates ``t = 0``. ``prior_logits`` may have size 1 where ``sample`` has more (one prior for
    several steps); ``codebook_squared_norms`` ``(V,)``: ``|c_v|^2``, when the caller already has them (the sampler
    computes them once per block, for all of its slots' steps).

    Computed in chunks of the first dimension (`POSTERIOR_CHUNK_BYTES` per ``(..., V)`` tensor); with gradients on,
    each chunk is checkpointed, so the backward recomputes its posterior instead of keeping it.
    """
    t = torch.as_tensor(t, dtype=sample.dtype, device=sample.device)[..., None]
    codebook = codebook.to(sample.dtype)
    if codebook_squared_norms is None:
        codebook_squared_norms = codebook.square().sum(-1)
    codebook_squared_norms = codebook_squared_norms.to(sample.dtype)
    # one leading shape for the three inputs, so that they can be cut along its first dimension
    leading = torch.broadcast_shapes(prior_logits.shape[:-1], sample.shape[:-1], t.shape[:-1])
    bytes_per_row = math.prod(leading[1:]) * codebook.shape[0] * sample.element_size()
    rows_per_chunk = max(1, POSTERIOR_CHUNK_BYTES // bytes_per_row)
    if len(leading) == 0 or leading[0] <= rows_per_chunk:
        return _codebook_posterior_mean(prior_logits, sample, t, codebook, noise_scale, codebook_squared_norms)
    prior_logits, sample, t = (
        tensor.reshape((1,) * (len(leading) + 1 - tensor.dim()) + tensor.shape) for tensor in (prior_logits, sample, t)
    )
    checkpointed = torch.is_grad_enabled() and (prior_logits.requires_grad or sample.requires_grad or t.requires_grad)
    means = []
    for start in range(0, leading[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk = [tensor if tensor.shape[0] == 1 else tensor[rows] for tensor in (prior_logits, sample, t)]
        if checkpointed:
            mean = torch.utils.checkpoint.checkpoint(
                _codebook_posterior_mean, *chunk, codebook, noise_scale, codebook_squared_norms, use_reentrant=False
            )
        else:
            mean = _codebook_posterior_mean(*chunk, codebook, noise_scale, codebook_squared_norms)
        means.append(mean)
    return torch.cat(means)


def _codebook_posterior_mean(prior_logits, sample, t, codebook, noise_scale, codebook_squared_norms):
    # |z - (1 - t) c_v|^2 = |z|^2 - 2 (1 - t) z.c_v + (1 - t)^2 |c_v|^2. |z|^2 is the same for every v and cancels in
    # the softmax, so the logits are  prior + a z.c_v - (1 - t) a / 2 |c_v|^2  with  a = (1 - t) / (t noise_scale)^2
    # (two passes over the (..., V) scores, no (..., V, D) difference tensor).
    scale = (1 - t) / (t * noise_scale) ** 2
    scores = (sample.reshape(-1, sample.shape[-1]) @ codebook.T).view(*sample.shape[:-1], -1)  # z.c_v
    posterior_logits = torch.addcmul(prior_logits.to(sample.dtype), scale, scores)
    posterior_logits = torch.addcmul(posterior_logits, scale * (1 - t) / 2, codebook_squared_norms, value=-1)
    return posterior_logits.softmax(-1) @ codebook


def classifier_free_guidance(velocity_cond: torch.Tensor, velocity_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """``v = v_uncond + s (v_cond - v_uncond)``; ``s = 1`` is the conditional model alone."""
    return velocity_uncond + cfg_scale * (velocity_cond - velocity_uncond)


def repulsive_force(latents: torch.Tensor, group_size: int, active: torch.Tensor | None = None) -> torch.Tensor:
    """LaDiR's repulsive diversity force among the ``group_size`` latents of each prompt.

    ``F(z_i) = sum_j 2 (1 - |z_i - z_j|^2 / h^2) exp(-|z_i - z_j|^2 / h^2) (z_i - z_j)`` with ``h`` the median
    pairwise distance in the group. Rows are grouped consecutively: ``latents`` is ``(num_prompts * group_size, ...)``.
    Rows with ``active = False`` (traces that already stopped) neither feel nor exert a force, and do not count in
    ``h``.
    """
    if group_size < 2:
        return torch.zeros_like(latents)
    flat = latents.reshape(-1, group_size, latents[0].numel()).float()  # (prompts, G, dims)
    if active is None:
        active = torch.ones(latents.shape[0], dtype=torch.bool, device=latents.device)
    active = active.reshape(-1, group_size)
    pair_active = active[:, :, None] & active[:, None, :]  # (prompts, G, G)
    differences = flat[:, :, None, :] - flat[:, None, :, :]  # z_i - z_j, (prompts, G, G, dims)
    squared_distances = differences.pow(2).sum(-1)  # (prompts, G, G)
    upper = torch.triu_indices(group_size, group_size, offset=1)
    pair_distances = squared_distances[:, upper[0], upper[1]].sqrt()
    pair_distances = pair_distances.masked_fill(~pair_active[:, upper[0], upper[1]], float("nan"))
    bandwidth_squared = pair_distances.nanmedian(dim=1).values.nan_to_num(1.0).pow(2).clamp(min=1e-12)
    scaled = squared_distances / bandwidth_squared[:, None, None]
    weights = 2 * (1 - scaled) * torch.exp(-scaled) * pair_active  # the diagonal has z_i - z_i = 0: adds nothing
    force = (weights[..., None] * differences).sum(2)
    return force.reshape(latents.shape).to(latents.dtype)


def diversity_guidance(
    latents: torch.Tensor,
    group_size: int,
    t: torch.Tensor,
    t_next: torch.Tensor,
    guidance_scale: float,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Offset to the step's mean from the repulsive force, ``d * guidance_scale * t * F / rms(F)``.

    In velocity form LaDiR adds ``gamma_t F`` (``gamma_t = guidance_scale * t``) to the denoiser's prediction, so a
    step of size ``d`` moves the sample by ``d gamma_t F``: strong early, vanishing at the clean end. The force is
    divided by its root mean square over the group's active rows and numbers: in hundreds of dimensions every
    pairwise distance is close to the median ``h``, where the kernel's weight vanishes, so the raw force is tiny
    and its size depends on the dimension. Normalised, ``guidance_scale`` is the displacement per unit of
    ``d * t`` of a typical latent number, while the kernel still decides who is pushed where.
    """
    if guidance_scale == 0 or group_size < 2:
        return torch.zeros_like(latents)
    t = _as_batch(t, latents)
    t_next = _as_batch(t_next, latents)
    if active is None:
        active = torch.ones(latents.shape[0], dtype=torch.bool, device=latents.device)
    force = repulsive_force(latents, group_size, active).float()
    numbers_per_row = latents[0].numel()
    grouped = force.reshape(-1, group_size, numbers_per_row)
    active_rows = active.reshape(-1, group_size).sum(1)
    rms = (grouped.pow(2).sum((1, 2)) / (active_rows.clamp(min=1) * numbers_per_row)).sqrt().clamp(min=1e-12)
    # two latents sit at r = h, where the force is zero up to rounding: a group needs 3 active rows to be guided
    normalised = grouped / rms[:, None, None] * (active_rows >= 3)[:, None, None]
    normalised = normalised.reshape(force.shape).to(latents.dtype)
    strength = _expand_like(guidance_scale * t * (t - t_next), latents)
    return strength * normalised


def _as_batch(t, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[0]) if t.dim() == 0 else t


def _expand_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-row values ``(batch,)`` so they broadcast over ``like``'s trailing dimensions."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if values.dim() == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))
