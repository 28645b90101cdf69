"""The latent sampler's math (trl_ladi.sampling), each checked against an independent computation."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trl_ladi import sampling


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ schedule


@pytest.mark.parametrize("num_steps, shift", [(1, 1.0), (4, 1.0), (10, 1.0), (10, 3.0)])
def test_timesteps_run_from_one_to_zero_and_match_diffusers(num_steps, shift):
    timesteps = sampling.flow_matching_timesteps(num_steps, shift=shift)
    assert timesteps.shape == (num_steps + 1,)
    assert timesteps[0].item() == pytest.approx(1.0, abs=1e-6)
    assert timesteps[-1].item() == 0.0
    assert bool((timesteps[1:] < timesteps[:-1]).all()), timesteps
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps))
    torch.testing.assert_close(timesteps, scheduler.sigmas.float(), rtol=0, atol=1e-7)
    # unshifted, the steps are uniform: no tiny last step that would dominate the SDE log-probabilities
    if shift == 1.0:
        torch.testing.assert_close(timesteps, torch.linspace(1, 0, num_steps + 1), rtol=0, atol=1e-6)
    # diffusers' own timesteps are the same times on its 0..1000 scale
    torch.testing.assert_close(timesteps[:-1] * 1000, scheduler.timesteps.float(), rtol=1e-6, atol=1e-3)


def test_shift_moves_times_towards_the_noisy_end():
    plain, shifted = sampling.flow_matching_timesteps(10), sampling.flow_matching_timesteps(10, shift=3.0)
    # diffusers' shift maps t to s t / (1 + (s - 1) t), which is above t inside (0, 1)
    assert bool((shifted[1:-2] > plain[1:-2] + 0.05).all()), (plain, shifted)
    assert shifted[0].item() == pytest.approx(1.0) and shifted[-1].item() == 0.0


def test_timesteps_reject_zero_steps():
    with pytest.raises(ValueError, match="num_denoise_steps"):
        sampling.flow_matching_timesteps(0)


def test_add_flow_noise_is_the_rectified_flow_interpolation():
    clean, noise = torch.randn(3, 2, 5, generator=_generator(1)), torch.randn(3, 2, 5, generator=_generator(2))
    t = torch.tensor([0.0, 0.25, 1.0])
    noisy, target = sampling.add_flow_noise(clean, noise, t)
    torch.testing.assert_close(noisy[0], clean[0])
    torch.testing.assert_close(noisy[2], noise[2])
    torch.testing.assert_close(noisy[1], 0.75 * clean[1] + 0.25 * noise[1])
    torch.testing.assert_close(target, noise - clean)
    # one Euler step of size t with the exact target velocity goes back to the clean latent
    torch.testing.assert_close(sampling.euler_step(noisy, target, t, torch.zeros(3)), clean, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ SDE step


def _design_mean_std(z, v, t, t_next, a, max_t):
    """DESIGN section 3 written out with python floats (one t for the whole batch)."""
    d = t - t_next
    capped = min(t, max_t)
    sigma_t = a * math.sqrt(capped / (1 - capped))
    x0_hat = z - t * v
    eps_hat = z + (1 - t) * v
    mean = z - d * (v + sigma_t**2 / (2 * t) * eps_hat)
    std = sigma_t * math.sqrt(d)
    return mean, std, x0_hat, eps_hat


@pytest.mark.parametrize("t, t_next", [(1.0, 0.75), (0.95, 0.9), (0.6, 0.3), (0.1, 0.0)])
def test_sde_step_mean_and_std_follow_the_design_formula(t, t_next):
    a, max_t = 0.7, 0.9
    z = torch.randn(4, 3, 8, generator=_generator(3), dtype=torch.float64)
    v = torch.randn(4, 3, 8, generator=_generator(4), dtype=torch.float64)
    expected_mean, expected_std, x0_hat, eps_hat = _design_mean_std(z, v, t, t_next, a, max_t)
    # x0_hat and eps_hat are consistent with the interpolation z = (1 - t) x0 + t eps and v = eps - x0
    torch.testing.assert_close((1 - t) * x0_hat + t * eps_hat, z)
    torch.testing.assert_close(eps_hat - x0_hat, v)

    mean, std = sampling.policy_step(z, v, torch.full((4,), t, dtype=torch.float64),
                                     torch.full((4,), t_next, dtype=torch.float64), a, max_t)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, torch.full((4,), expected_std, dtype=torch.float64), rtol=1e-12, atol=1e-12)

    noise = torch.randn(4, 3, 8, generator=_generator(5), dtype=torch.float64)
    guidance = 0.1 * torch.randn(4, 3, 8, generator=_generator(6), dtype=torch.float64)
    out = sampling.sde_step(z, v, t, t_next, a, max_t, mean_offset=guidance, noise=noise)
    torch.testing.assert_close(out.mean, expected_mean + guidance, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.sample, expected_mean + guidance + expected_std * noise, rtol=1e-12, atol=1e-12)


def test_sde_cap_keeps_the_first_step_finite():
    z, v = torch.randn(2, 4, generator=_generator(7)), torch.randn(2, 4, generator=_generator(8))
    out = sampling.sde_step(z, v, 1.0, 0.9, 0.5, max_t=0.9, noise=torch.zeros(2, 4))
    expected_std = 0.5 * math.sqrt(0.9 / 0.1) * math.sqrt(0.1)
    torch.testing.assert_close(out.std, torch.full((2,), expected_std), rtol=1e-6, atol=0)
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_prob).all()


def test_sde_log_prob_equals_torch_normal():
    z = torch.randn(5, 3, 8, generator=_generator(9))
    v = torch.randn(5, 3, 8, generator=_generator(10))
    t = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.05])
    t_next = torch.tensor([0.8, 0.5, 0.3, 0.05, 0.0])
    out = sampling.sde_step(z, v, t, t_next, 0.8, max_t=0.9, generator=_generator(11))
    for row in range(5):
        normal = torch.distributions.Normal(out.mean[row].double(), out.std[row].double())
        expected = normal.log_prob(out.sample[row].double()).sum()
        assert out.log_prob[row].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-5)
    # a value away from the mean has a lower density, exactly by the Gaussian quadratic
    shifted = out.sample + out.std[:, None, None]
    delta = sampling.gaussian_log_prob(out.sample, out.mean, out.std) - sampling.gaussian_log_prob(shifted, out.mean, out.std)
    expected_delta = ((shifted - out.mean) ** 2 - (out.sample - out.mean) ** 2).flatten(1).sum(-1) / (2 * out.std**2)
    torch.testing.assert_close(delta, expected_delta, rtol=1e-4, atol=1e-3)


def test_zero_noise_level_is_exactly_euler():
    z = torch.randn(3, 2, 6, generator=_generator(12))
    v = torch.randn(3, 2, 6, generator=_generator(13))
    t, t_next = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.75, 0.25, 0.0])
    out = sampling.sde_step(z, v, t, t_next, 0.0, generator=_generator(14))
    euler = sampling.euler_step(z, v, t, t_next)
    assert torch.equal(out.sample, euler)
    assert torch.equal(out.mean, euler)
    assert torch.equal(out.std, torch.zeros(3))
    torch.testing.assert_close(euler, z - (t - t_next)[:, None, None] * v)
    # a deterministic step draws no noise: the generator is untouched
    generator = _generator(15)
    sampling.sde_step(z, v, t, t_next, 0.0, generator=generator)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=_generator(15)))


def _gaussian_velocity(z, t, m, s):
    """Exact rectified-flow velocity E[eps - z0 | z_t = z] for z0 ~ N(m, s^2), eps ~ N(0, 1)."""
    variance = (1 - t) ** 2 * s**2 + t**2
    centred = z - (1 - t) * m
    expected_noise = t / variance * centred
    expected_clean = m + (1 - t) * s**2 / variance * centred
    return expected_noise - expected_clean


@pytest.mark.statistical
@pytest.mark.parametrize("noise_level", [0.0, 0.5])
def test_sde_and_ode_reach_the_data_distribution(noise_level, statistical_seed, margin):
    """With the exact velocity of a 1-D Gaussian, the SDE (and the ODE) carry N(0, 1) at t = 1 to N(m, s^2)."""
    m, s, n = 1.5, 0.5, 40_000
    timesteps = sampling.flow_matching_timesteps(200).double()
    generator = _generator(16 + statistical_seed)
    z = torch.randn(n, 1, dtype=torch.float64, generator=generator)
    for k in range(200):
        t, t_next = timesteps[k], timesteps[k + 1]
        v = _gaussian_velocity(z, t, m, s)
        z = sampling.sde_step(z, v, t, t_next, noise_level, max_t=0.9, generator=generator).sample
    # sampling error of the mean is s / sqrt(n) = 0.0025, of the std about s / sqrt(2 n) = 0.0018: the bound 0.012 is
    # about 5 and 7 of them (the 200-step discretisation adds a bias well below that)
    # smallest margins over seeds 0-4 x 1-2 threads (AMD EPYC):
    #   0.0051 (2.0 sd) on the mean, 0.0077 (4.3 sd) on the std
    margin.check("|mean - m|", abs(z.mean().item() - m), 0.012, "<", scale=s / math.sqrt(n))
    margin.check("|std - s|", abs(z.std().item() - s), 0.012, "<", scale=s / math.sqrt(2 * n))


@pytest.mark.statistical
def test_sde_without_the_drift_correction_would_miss_the_marginals(statistical_seed, margin):
    """Control for the test above: the same noise without the sigma^2/(2t) eps_hat drift gives the wrong spread."""
    m, s, n, a = 1.5, 0.5, 20_000, 0.5
    timesteps = sampling.flow_matching_timesteps(200).double()
    generator = _generator(17 + statistical_seed)
    z = torch.randn(n, 1, dtype=torch.float64, generator=generator)
    for k in range(200):
        t, t_next = timesteps[k], timesteps[k + 1]
        v = _gaussian_velocity(z, t, m, s)
        std = sampling.sde_std(t[None], t_next[None], a, 0.9)
        z = sampling.euler_step(z, v, t, t_next) + std * torch.randn(z.shape, dtype=z.dtype, generator=generator)
    # the sampling error of the std is s / sqrt(2 n) = 0.0025, far below the bound
    # smallest margin over seeds 0-4 x 1-2 threads (AMD EPYC): 0.149 (60 sd)
    margin.check("|std - s| without the drift", abs(z.std().item() - s), 0.05, ">", scale=s / math.sqrt(2 * n))


@pytest.mark.statistical
def test_initial_noise_scale_widens_the_ode_but_the_sde_pulls_the_spread_back(statistical_seed, margin):
    """docs/ladirl.md's claim: exploration under the SDE policy is `sde_noise_level`'s. Starting from noise of std 2
    instead of 1 doubles the ODE's final spread (its flow is linear here) but barely changes the SDE's at the RL
    defaults (6 steps, a = 0.7), because the drift that keeps the marginals pulls the extra spread back."""
    m, s, n = 1.5, 0.5, 40_000
    timesteps = sampling.flow_matching_timesteps(6).double()

    def final_std(noise_level, initial_noise_scale, seed):
        generator = _generator(seed)
        z = initial_noise_scale * torch.randn(n, 1, dtype=torch.float64, generator=generator)
        for k in range(6):
            t, t_next = timesteps[k], timesteps[k + 1]
            z = sampling.sde_step(z, _gaussian_velocity(z, t, m, s), t, t_next, noise_level, 0.9, generator=generator).sample
        return z.std().item()

    seed = 21 + statistical_seed
    ode_ratio = final_std(0.0, 2.0, seed) / final_std(0.0, 1.0, seed)
    sde_ratio = final_std(0.7, 2.0, seed) / final_std(0.7, 1.0, seed)
    # measured (seed 0): ODE 0.782 / 0.391 = 2.0, SDE 0.487 / 0.468 = 1.04; a ratio's sampling error is ~0.01
    margin.check("ODE spread ratio (start std 2 vs 1)", ode_ratio, 1.9, ">", scale=0.01)
    margin.check("SDE spread ratio (start std 2 vs 1)", sde_ratio, 1.15, "<", scale=0.01)


# ------------------------------------------------------------------ guidance


def test_diversity_guidance_has_a_dimension_free_size_in_high_dimensions():
    """In 512 dimensions every pairwise distance is near the median h, where LaDiR's kernel weight vanishes, so the
    raw force is tiny; normalised, the offset's size per number is g * t * d whatever the dimension."""
    latents = torch.randn(8, 4, 128, generator=_generator(25))  # a group of 8 latents of L x D = 512 numbers
    raw = sampling.repulsive_force(latents, 8)
    guidance = sampling.diversity_guidance(latents, 8, 1.0, 5 / 6, guidance_scale=0.5)
    assert raw.pow(2).mean().sqrt() < 0.5  # the raw force against latents of size 1 per number
    assert guidance.pow(2).mean().sqrt().item() == pytest.approx(0.5 * 1.0 / 6, rel=1e-4)
    # the direction is still the kernel's: each row's offset is parallel to its raw force
    cosine = torch.nn.functional.cosine_similarity(guidance.flatten(1), raw.flatten(1), dim=1)
    torch.testing.assert_close(cosine, torch.ones(8), rtol=0, atol=1e-5)


def test_stopped_rows_neither_repel_nor_are_repelled():
    latents = torch.randn(5, 2, 3, generator=_generator(26))
    active = torch.tensor([True, True, False, True, True])
    force = sampling.repulsive_force(latents, 5, active)
    assert torch.equal(force[2], torch.zeros_like(force[2]))
    # the active rows feel exactly the force of the group without the stopped row
    torch.testing.assert_close(force[active], sampling.repulsive_force(latents[active], 4), rtol=1e-5, atol=1e-6)
    guidance = sampling.diversity_guidance(latents, 5, 0.9, 0.8, 1.0, active=active)
    assert torch.equal(guidance[2], torch.zeros_like(guidance[2]))
    torch.testing.assert_close(guidance[active], sampling.diversity_guidance(latents[active], 4, 0.9, 0.8, 1.0))
    # with fewer than three active rows there is no guidance (a pair sits at r = h, where the force is zero)
    two = torch.tensor([True, False, False, True, False])
    assert torch.equal(sampling.diversity_guidance(latents, 5, 0.9, 0.8, 1.0, active=two), torch.zeros_like(latents))


def test_classifier_free_guidance_formula():
    cond, uncond = torch.randn(4, 3, generator=_generator(18)), torch.randn(4, 3, generator=_generator(19))
    torch.testing.assert_close(sampling.classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(sampling.classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(sampling.classifier_free_guidance(cond, uncond, 3.0), 3 * cond - 2 * uncond)


def _repulsive_force_loop(latents):
    """LaDiR's force written as loops over pairs, with h the median pairwise distance (one group)."""
    flat = [row.flatten().double() for row in latents]
    n = len(flat)
    distances = sorted(torch.linalg.norm(flat[i] - flat[j]).item() for i in range(n) for j in range(i + 1, n))
    h = torch.tensor(distances).median().item()  # torch's median: the lower middle value
    forces = []
    for i in range(n):
        force = torch.zeros_like(flat[i])
        for j in range(n):
            if j != i:
                r2 = float(((flat[i] - flat[j]) ** 2).sum())
                force += 2 * (1 - r2 / h**2) * math.exp(-r2 / h**2) * (flat[i] - flat[j])
        forces.append(force.view_as(latents[i]))
    return torch.stack(forces)


def test_repulsive_force_is_zero_for_a_group_of_one():
    latents = torch.randn(3, 2, 4, generator=_generator(20))
    assert torch.equal(sampling.repulsive_force(latents, 1), torch.zeros_like(latents))
    assert torch.equal(sampling.diversity_guidance(latents, 1, 0.9, 0.8, 1.0), torch.zeros_like(latents))


def test_repulsive_force_matches_the_formula_per_group():
    latents = torch.randn(8, 2, 3, generator=_generator(21))  # two prompts, four latents each
    force = sampling.repulsive_force(latents, 4)
    torch.testing.assert_close(force[:4], _repulsive_force_loop(latents[:4]).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(force[4:], _repulsive_force_loop(latents[4:]).float(), rtol=1e-5, atol=1e-6)
    assert force.abs().max() > 1e-2
    # groups do not interact: moving the second prompt's latents does not change the first prompt's forces
    moved = latents.clone()
    moved[4:] += 5.0 * torch.randn(4, 2, 3, generator=_generator(22))
    torch.testing.assert_close(sampling.repulsive_force(moved, 4)[:4], force[:4])


def test_repulsive_force_is_antisymmetric():
    # a pair: F(z_1) = -F(z_2). With h the median distance, a pair sits at r = h, where the kernel's weight
    # 2 (1 - r^2/h^2) exp(-r^2/h^2) vanishes, so the pair force is zero (LaDiR's formula).
    pair = torch.randn(2, 3, 4, generator=_generator(23))
    pair_force = sampling.repulsive_force(pair, 2)
    torch.testing.assert_close(pair_force[0], -pair_force[1], rtol=0, atol=1e-6)
    assert pair_force.abs().max() < 1e-5
    # in larger groups the pair terms cancel: the forces sum to zero, and a permutation permutes them
    group = torch.randn(5, 3, 4, generator=_generator(24))
    force = sampling.repulsive_force(group, 5)
    assert force.abs().max() > 1e-2
    torch.testing.assert_close(force.sum(0), torch.zeros(3, 4), rtol=0, atol=1e-5)
    order = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(sampling.repulsive_force(group[order], 5), force[order], rtol=1e-5, atol=1e-6)


def test_diversity_guidance_pushes_close_latents_apart():
    # z_1 and z_2 are close (closer than the median distance h), z_3 is far: z_1, z_2 repel
    latents = torch.tensor([[0.0, 0.0], [0.1, 0.05], [1.0, -0.4], [-0.8, 0.6]])
    t, t_next = torch.full((4,), 0.9), torch.full((4,), 0.8)
    guidance = sampling.diversity_guidance(latents, 4, t, t_next, guidance_scale=2.0)
    force = sampling.repulsive_force(latents, 4)
    # the force normalised to a root mean square of 1 over the group's numbers, times d * g * t
    torch.testing.assert_close(guidance, 2.0 * 0.9 * 0.1 * force / force.pow(2).mean().sqrt(), rtol=1e-5, atol=1e-7)
    assert guidance.pow(2).mean().sqrt().item() == pytest.approx(2.0 * 0.9 * 0.1, rel=1e-5)
    # a guided step with no velocity moves only by the guidance
    stepped = sampling.sde_step(latents, torch.zeros_like(latents), t, t_next, 0.0, mean_offset=guidance).sample
    before, after = torch.linalg.norm(latents[0] - latents[1]), torch.linalg.norm(stepped[0] - stepped[1])
    assert after > before * 1.02, (before, after)
    # the strength decays with t: the same latents near the clean end get a far smaller push
    late = sampling.diversity_guidance(latents, 4, torch.full((4,), 0.1), torch.zeros(4), guidance_scale=2.0)
    assert late.norm() < 0.2 * guidance.norm()
    assert torch.equal(sampling.diversity_guidance(latents, 4, t, t_next, 0.0), torch.zeros_like(latents))


def test_stored_guidance_gives_back_the_exact_log_prob():
    z = torch.randn(4, 3, 8, generator=_generator(25))
    v = torch.randn(4, 3, 8, generator=_generator(26))
    t, t_next = torch.full((4,), 0.7), torch.full((4,), 0.5)
    offset = sampling.diversity_guidance(z, 4, t, t_next, 0.8) + 0.05 * torch.randn(4, 3, 8, generator=_generator(27))
    out = sampling.sde_step(z, v, t, t_next, 0.6, max_t=0.9, mean_offset=offset, generator=_generator(28))
    # later, with the same velocity and the stored offset, the transition's log-prob is recomputed exactly
    mean, std = sampling.policy_step(z, v, t, t_next, 0.6, 0.9)
    recomputed = sampling.gaussian_log_prob(out.sample, mean + offset, std)
    torch.testing.assert_close(recomputed, out.log_prob, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean + offset, out.mean, rtol=0, atol=1e-6)
    # without the offset the log-prob is different (by far more than the tolerance above)
    assert (sampling.gaussian_log_prob(out.sample, mean, std) - out.log_prob).abs().min() > 1e-2


# ------------------------------------------------------------------ the exact posterior of a codebook prior


def test_codebook_posterior_mean_is_bayes_rule_over_the_codebook():
    """Against an independent computation: log prior + a Gaussian log-density per codebook row (torch.distributions),
    normalised, then the mean of the rows."""
    generator = _generator(3)
    codebook = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    prior_logits = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    sample = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.95, 0.6, 0.3, 0.1], dtype=torch.float64)
    noise_scale = 1.5
    mean = sampling.codebook_posterior_mean(prior_logits, sample, t, codebook, noise_scale)
    for row in range(4):
        likelihood = torch.distributions.Normal((1 - t[row]) * codebook, t[row] * noise_scale)
        log_posterior = prior_logits[row] + likelihood.log_prob(sample[row]).sum(-1)
        expected = log_posterior.softmax(-1) @ codebook
        torch.testing.assert_close(mean[row], expected, rtol=1e-10, atol=1e-10)
    # the sampler's shortcuts: the rows' squared norms passed in, and one prior shared by several steps (size 1)
    with_norms = sampling.codebook_posterior_mean(prior_logits, sample, t, codebook, noise_scale, codebook.square().sum(-1))
    torch.testing.assert_close(with_norms, mean, rtol=0, atol=0)
    steps = torch.stack([sample, sample.flip(0), 2 * sample], 1)  # (4, 3, 5): three steps per row
    step_times = torch.stack([t, t.flip(0), t / 2], 1)
    shared = sampling.codebook_posterior_mean(prior_logits[:, None], steps, step_times, codebook, noise_scale)
    for step in range(3):
        alone = sampling.codebook_posterior_mean(prior_logits, steps[:, step], step_times[:, step], codebook, noise_scale)
        torch.testing.assert_close(shared[:, step], alone, rtol=1e-12, atol=1e-12)
    # at t = 1 the noise says nothing: the prior's mean; near t = 0 the nearest row wins
    at_one = sampling.codebook_posterior_mean(prior_logits, sample, torch.ones(4, dtype=torch.float64), codebook, 1.0)
    torch.testing.assert_close(at_one, prior_logits.softmax(-1) @ codebook)
    row = codebook[2] + 1e-3
    near_zero = sampling.codebook_posterior_mean(prior_logits[:1], row[None], torch.tensor([1e-3]), codebook, 1.0)
    torch.testing.assert_close(near_zero[0], codebook[2], rtol=0, atol=1e-6)


def test_the_codebook_posterior_in_chunks_has_the_values_and_gradients_of_one_pass(monkeypatch):
    """Cut into chunks of its first dimension (a prior shared by the steps of a row, as the loss feeds it), the
    posterior mean and the gradient it sends to the prior logits equal one pass over the whole batch (float64), and
    the backward keeps no (..., V) tensor: the checkpointed chunks save only their inputs."""
    generator = _generator(4)
    codebook = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    prior_logits = torch.randn(5, 2, 1, 3, 50, generator=generator, dtype=torch.float64)  # rows, blocks, 1, slots, V
    sample = torch.randn(5, 2, 4, 3, 6, generator=generator, dtype=torch.float64)  # 4 steps share a block's prior
    t = torch.rand(5, 2, 4, 1, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    weights = torch.randn(5, 2, 4, 3, 6, generator=generator, dtype=torch.float64)

    def mean_and_gradient(chunk_bytes):
        monkeypatch.setattr(sampling, "POSTERIOR_CHUNK_BYTES", chunk_bytes)
        logits = prior_logits.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            mean = sampling.codebook_posterior_mean(logits, sample, t, codebook, 1.3)
        (mean * weights).sum().backward()
        return mean.detach(), logits.grad, max(saved)

    whole, whole_gradient, whole_largest_saved = mean_and_gradient(2**30)
    chunked, chunked_gradient, chunked_largest_saved = mean_and_gradient(2 * 2 * 4 * 3 * 50 * 8)  # 2 rows a chunk
    assert whole.shape == chunked.shape == (5, 2, 4, 3, 6)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked_gradient, whole_gradient, rtol=1e-12, atol=1e-12)
    assert whole_gradient.abs().sum() > 0
    assert whole_largest_saved == 5 * 2 * 4 * 3 * 50  # one pass keeps its (rows, blocks, steps, slots, V) posterior
    assert chunked_largest_saved < 2 * 4 * 3 * 50  # the chunks keep less than one row's posterior
    # without gradients (the sampler) the chunks give the same values
    monkeypatch.setattr(sampling, "POSTERIOR_CHUNK_BYTES", 2 * 2 * 4 * 3 * 50 * 8)
    with torch.no_grad():
        torch.testing.assert_close(sampling.codebook_posterior_mean(prior_logits, sample, t, codebook, 1.3), whole,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.statistical
@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_the_exact_posterior_flow_samples_the_prior(noise_level, statistical_seed, margin):
    """ODE and SDE (Flow-GRPO) steps on the exact posterior velocity take unit noise to codebook rows, each as often
    as its prior says: the token-posterior sampler's claim, with nothing learnt."""
    generator = _generator(statistical_seed)
    codebook = 3 * torch.randn(5, 16, generator=generator)
    prior = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    num_samples, num_steps = 4000, 64
    z = torch.randn(num_samples, 16, generator=generator)
    timesteps = sampling.flow_matching_timesteps(num_steps)
    for step in range(num_steps):
        t, t_next = timesteps[step].expand(num_samples), timesteps[step + 1].expand(num_samples)
        estimate = sampling.codebook_posterior_mean(prior.log().expand(num_samples, -1), z, t, codebook, 1.0)
        z = sampling.sde_step(z, (z - estimate) / t[:, None], t, t_next, noise_level, generator=generator).sample
    distances = torch.cdist(z, codebook)
    assert distances.min(-1).values.max() < 0.05 * distances.median()  # every sample lands on a row
    frequencies = torch.bincount(distances.argmin(-1), minlength=5) / num_samples
    # the binomial std of a frequency here is <= 0.008; seeds 0-4 x 1-2 threads (AMD EPYC): largest gap <= 0.015
    # (with 16 steps instead of 64 the ODE's gap reached 0.044: discretisation favours the likelier rows)
    margin.check("largest |frequency - prior|", (frequencies - prior).abs().max().item(), 0.04, "<",
                 context=(frequencies.tolist(), prior.tolist()))
