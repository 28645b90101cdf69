"""The latent sampler's math: flow-matching timesteps, Euler and SDE steps with exact log-probabilities, guidance.

Rectified flow (LaDiR): a clean latent ``z_0`` and noise ``eps`` are joined by ``z_t = (1 - t) z_0 + t eps`` and the
model predicts the velocity ``u = eps - z_0``. Sampling integrates from ``t = 1`` (noise) to ``t = 0`` (clean).

For RL each step is made stochastic with the Flow-GRPO SDE, which has the same marginals as the ODE, so that every
step is a Gaussian with an exact log-probability. ``sde_noise_level = 0`` gives back the deterministic Euler step.

Everything here works on tensors of shape ``(batch, ...)``; nothing here knows about language models.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
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


def sde_std(t: torch.Tensor, t_next: torch.Tensor, sde_noise_level: float, max_t: float) -> torch.Tensor:
    """Standard deviation of one SDE step, ``sigma_t sqrt(d)`` with ``sigma_t = a sqrt(t / (1 - t))``.

    ``t`` is capped at ``max_t`` inside ``sigma_t`` because ``sigma_t`` diverges at ``t = 1`` (the first step).
    """
    capped_t = t.clamp(max=max_t)
    sigma_t = sde_noise_level * torch.sqrt(capped_t / (1 - capped_t))
    return sigma_t * torch.sqrt(t - t_next)


def sde_step_mean(
    sample: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, sde_noise_level: float, max_t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Flow-GRPO SDE step from ``t`` to ``t_next`` (same marginals as the flow ODE).

    ``eps_hat = z_t + (1 - t) v`` is the noise the model implies; the drift adds ``sigma_t^2 / (2 t) eps_hat`` to the
    velocity so that the injected noise does not change the marginal distribution of ``z_{t_next}``.
    """
    std = sde_std(t, t_next, sde_noise_level, max_t)
    t_, step_size = _expand_like(t, sample), _expand_like(t - t_next, sample)
    sigma_t_squared = _expand_like(std, sample) ** 2 / step_size  # sigma_t^2 = std^2 / d
    implied_noise = sample + (1 - t_) * velocity  # eps_hat
    mean = sample - step_size * (velocity + sigma_t_squared / (2 * t_) * implied_noise)
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
    max_t: float = 0.95,
    guidance: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStepOutput:
    """Draw ``z_{t_next} ~ N(mean + guidance, std^2)`` and return it with its exact log-probability.

    With ``sde_noise_level = 0`` this is exactly :func:`euler_step` (and the log-probability is undefined: ``nan``).
    ``guidance`` is an offset added to the mean (CFG correction, repulsive diversity force); the caller keeps it so
    that the log-probability of this transition can be recomputed later with the same mean.
    """
    t = _as_batch(t, sample)
    t_next = _as_batch(t_next, sample)
    if sde_noise_level == 0:
        mean = euler_step(sample, velocity, t, t_next)
        if guidance is not None:
            mean = mean + guidance
        std = torch.zeros_like(t)
        return SDEStepOutput(sample=mean, mean=mean, std=std, log_prob=torch.full_like(t, float("nan")))
    mean, std = sde_step_mean(sample, velocity, t, t_next, sde_noise_level, max_t)
    if guidance is not None:
        mean = mean + guidance
    if noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    next_sample = mean + _expand_like(std, sample) * noise
    return SDEStepOutput(sample=next_sample, mean=mean, std=std, log_prob=gaussian_log_prob(next_sample, mean, std))


def classifier_free_guidance(velocity_cond: torch.Tensor, velocity_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """``v = v_uncond + s (v_cond - v_uncond)``; ``s = 1`` is the conditional model alone."""
    return velocity_uncond + cfg_scale * (velocity_cond - velocity_uncond)


def repulsive_force(latents: torch.Tensor, group_size: int) -> torch.Tensor:
    """LaDiR's repulsive diversity force among the ``group_size`` latents of each prompt.

    ``F(z_i) = sum_j 2 (1 - |z_i - z_j|^2 / h^2) exp(-|z_i - z_j|^2 / h^2) (z_i - z_j)`` with ``h`` the median
    pairwise distance in the group. Rows are grouped consecutively: ``latents`` is ``(num_prompts * group_size, ...)``.
    """
    if group_size < 2:
        return torch.zeros_like(latents)
    flat = latents.reshape(-1, group_size, latents[0].numel()).float()  # (prompts, G, dims)
    differences = flat[:, :, None, :] - flat[:, None, :, :]  # z_i - z_j, (prompts, G, G, dims)
    squared_distances = differences.pow(2).sum(-1)  # (prompts, G, G)
    upper = torch.triu_indices(group_size, group_size, offset=1)
    bandwidth_squared = squared_distances[:, upper[0], upper[1]].sqrt().median(dim=1).values.pow(2).clamp(min=1e-12)
    scaled = squared_distances / bandwidth_squared[:, None, None]
    weights = 2 * (1 - scaled) * torch.exp(-scaled)  # the diagonal has z_i - z_i = 0, so it adds nothing
    force = (weights[..., None] * differences).sum(2)
    return force.reshape(latents.shape).to(latents.dtype)


def diversity_guidance(
    latents: torch.Tensor, group_size: int, t: torch.Tensor, t_next: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """Offset to the step's mean from the repulsive force, with strength ``gamma_t = guidance_scale * t``.

    In velocity form LaDiR adds ``gamma_t F`` to the denoiser's prediction; a step of size ``d`` moves the sample by
    ``d gamma_t F`` away from its neighbours. Strong early (``t`` near 1), vanishing at the clean end.
    """
    if guidance_scale == 0:
        return torch.zeros_like(latents)
    t = _as_batch(t, latents)
    t_next = _as_batch(t_next, latents)
    strength = _expand_like(guidance_scale * t * (t - t_next), latents)
    return strength * repulsive_force(latents, group_size)


def _as_batch(t, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[0]) if t.dim() == 0 else t


def _expand_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-row values ``(batch,)`` so they broadcast over ``like``'s trailing dimensions."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if values.dim() == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))
