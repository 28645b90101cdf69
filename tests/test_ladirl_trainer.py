"""LaDiRLTrainer on tiny offline models: rollout bookkeeping, advantages, the update's direction, learning, config."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from trl_ladi import LaDiRLConfig, LaDiRLTrainer, LaDiRModel, LaDiRPipeline
from trl_ladi.modeling import tokenize_prompts
from trl_ladi.testing import make_tokenizer, spread_latent_codebook, tiny_causal_lm, tiny_ladir_model

from accelerate_launch import accelerate_launch_command  # tests/accelerate_launch.py

PROMPTS = ["what is 3 plus 4 ?", "2 + 2 =", "the cat sat on", "a b c"]


def make_model(seed=0, initializer_range=0.02, **config):
    tokenizer = make_tokenizer()
    settings = dict(latent_tokens_per_block=3, latent_dim=8, encoder_lora_rank=4, reasoner_lora_rank=4, max_blocks=2,
                    num_denoise_steps=4)
    settings.update(config)
    model = tiny_ladir_model(tokenizer, seed=seed, config_options=dict(initializer_range=initializer_range), **settings)
    torch.nn.init.normal_(model.velocity_head.linear.weight, std=0.1)  # zero-initialised: give it some velocity
    return model, tokenizer


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        num_decodes_per_latent=2,
        max_completion_length=4,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    settings.update(overrides)
    return LaDiRLConfig(**settings)


def digit_fraction_reward(completions, **kwargs):
    """Fraction of an answer's words that are numbers: varies on a random model, so advantages are not all zero."""
    return [sum(word.isdigit() for word in text.split()) / max(len(text.split()), 1) for text in completions]


def rollout(trainer, prompts):
    trainer.model.train()
    return trainer._generate_and_score_completions([{"prompt": prompt} for prompt in prompts])


# ------------------------------------------------------------------ rollout bookkeeping


def test_reward_functions_see_n_times_m_answers_per_prompt_with_dataset_columns(tmp_path):
    model, tokenizer = make_model()
    seen = []

    def recording_reward(prompts, completions, completion_ids, answer, **kwargs):
        seen.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, "answer": answer})
        return [1.0] * len(completions)

    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
        "answer": ["7", "4", "mat", "d"],
    })
    args = make_args(tmp_path, num_generations=4, num_decodes_per_latent=3, per_device_train_batch_size=8)
    trainer = LaDiRLTrainer(model=model, reward_funcs=recording_reward, args=args, train_dataset=dataset,
                            processing_class=tokenizer)
    inputs = [row for row in dataset.select([0, 1]) for _ in range(4)]  # GRPO's sampler repeats a prompt N times
    trainer.model.train()
    output = trainer._generate_and_score_completions(inputs)

    call = seen[-1]
    assert len(call["completions"]) == 2 * 4 * 3  # prompts x N latents x M decodes
    assert call["prompts"][:12] == [dataset[0]["prompt"]] * 12 and call["prompts"][12:] == [dataset[1]["prompt"]] * 12
    assert call["answer"] == ["7"] * 12 + ["4"] * 12  # extra dataset columns, repeated with their rows
    assert call["completions"][0][0]["role"] == "assistant"  # conversational prompts give conversational answers
    assert len(call["completion_ids"]) == 24 and all(isinstance(ids, list) for ids in call["completion_ids"])
    assert output["advantages"].shape == (8,)
    assert output["step_latents"].shape[:1] == (8,) and output["block_mask"].shape[0] == 8


def test_latent_utility_is_the_mean_of_its_answers_and_advantages_are_group_normalised(tmp_path):
    model, tokenizer = make_model()
    rewards_given = []

    def scripted_reward(completions, **kwargs):
        values = [float((7 * i) % 5) for i in range(len(completions))]
        rewards_given.append(values)
        return values

    args = make_args(tmp_path, num_generations=4, num_decodes_per_latent=3, per_device_train_batch_size=8)
    trainer = LaDiRLTrainer(model=model, reward_funcs=scripted_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    output = rollout(trainer, [p for p in PROMPTS[:2] for _ in range(4)])

    rewards = torch.tensor(rewards_given[-1]).view(8, 3)
    utility = rewards.mean(1)  # U_i = mean_j r_ij
    groups = utility.view(2, 4)
    expected = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(output["advantages"], expected, rtol=1e-5, atol=1e-5)
    assert output["advantages"].view(2, 4).sum(1).abs().max() < 1e-5  # zero mean within each prompt's group
    logged = trainer._metrics["train"]
    assert logged["latent_utility/mean"][-1] == pytest.approx(utility.mean().item(), abs=1e-6)
    assert logged["reward"][-1] == pytest.approx(rewards.mean().item(), abs=1e-6)


def test_a_static_rollout_cache_gives_the_rollouts_of_the_default_one(tmp_path):
    """`cache_implementation="static"` reaches the sampler (a static cache in every rollout) and changes no rollout: the
    same traces, answers, rewards and advantages from the same random stream."""
    outputs, caches = {}, {}
    for cache in (None, "static"):
        model, tokenizer = make_model(seed=4, max_blocks=3)
        args = make_args(tmp_path, cache_implementation=cache, per_device_train_batch_size=8)
        trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                                train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
        prefill = model.prefill
        model.prefill = lambda *a, **k: caches.setdefault(cache, prefill(*a, **k))  # keep the rollout's context
        torch.manual_seed(11)
        outputs[cache] = rollout(trainer, [p for p in PROMPTS[:2] for _ in range(4)])
    assert caches[None].static_length is None and caches["static"].static_length is not None
    for name in ("step_latents", "block_mask", "sampler_log_probs", "advantages"):
        torch.testing.assert_close(outputs["static"][name], outputs[None][name], rtol=0, atol=1e-4)
    assert outputs[None]["advantages"].abs().max() > 0.1  # the rewards differed: the comparison covers them
    assert (outputs[None]["block_mask"].sum(1) < 3).any()  # some rows stopped early: the static cache kept them


def test_unscorable_answers_are_ignored_in_the_utility(tmp_path):
    model, tokenizer = make_model()

    def sometimes_none(completions, **kwargs):  # None: "cannot judge this one", as TRL reward functions may say
        return [None if i % 2 else 1.0 + i for i in range(len(completions))]

    args = make_args(tmp_path, num_generations=2, num_decodes_per_latent=2, per_device_train_batch_size=4,
                     scale_rewards="none")
    trainer = LaDiRLTrainer(model=model, reward_funcs=sometimes_none, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    output = rollout(trainer, [p for p in PROMPTS[:2] for _ in range(2)])
    # per latent the scored answers are 1, 3, 5, 7: utilities 1, 3 | 5, 7 -> advantages -1, 1 | -1, 1
    torch.testing.assert_close(output["advantages"], torch.tensor([-1.0, 1.0, -1.0, 1.0]))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_text_policy_advantages_compare_answers_of_the_same_latent(tmp_path, scale_rewards):
    model, tokenizer = make_model()

    def scripted_reward(completions, **kwargs):
        return [float(i % 4) + (i // 4) * (i // 4) for i in range(len(completions))]

    args = make_args(tmp_path, num_generations=2, num_decodes_per_latent=4, per_device_train_batch_size=4,
                     text_policy_coef=1.0, scale_rewards=scale_rewards)
    trainer = LaDiRLTrainer(model=model, reward_funcs=scripted_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    output = rollout(trainer, [p for p in PROMPTS[:2] for _ in range(2)])
    # latent i's answers score i^2 + (0, 1, 2, 3): the same spread within every latent, different means
    rewards = torch.arange(4.0)[None, :] + torch.arange(4.0)[:, None] ** 2
    expected = rewards - rewards.mean(1, keepdim=True)
    if scale_rewards == "group":  # the group of an answer: the answers of its latent
        expected = expected / (rewards.std(1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":  # GRPO's batch scaling: the std of every reward in the batch
        expected = expected / (rewards.std() + 1e-4)
    torch.testing.assert_close(output["text_advantages"], expected, rtol=1e-5, atol=1e-5)
    assert output["completion_ids"].shape[:2] == (4, 4) and output["completion_mask"].shape[:2] == (4, 4)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, output)
    assert torch.isfinite(loss)
    assert trainer._metrics["train"]["text_entropy_trained"][-1] > 0


# ------------------------------------------------------------------ the update


TOKEN_POSTERIOR = dict(token_aligned_latents=True, velocity_parameterization="token_posterior")


@pytest.mark.statistical
@pytest.mark.parametrize(
    "latent_policy_parameters, model_options, sgd_learning_rate",
    [("velocity_head", {}, 1e-3), ("denoiser_adapter", {}, 1e-3), ("reasoner", {}, 1e-3),
     # a token posterior's gradient reaches the adapter through the LM's slot priors only: ~100x smaller here
     ("denoiser_adapter", TOKEN_POSTERIOR, 1e-1)],
    ids=["velocity_head", "denoiser_adapter", "reasoner", "token_posterior-denoiser_adapter"],
)
def test_one_update_moves_each_trajectory_log_prob_with_the_sign_of_its_advantage(
    tmp_path, latent_policy_parameters, model_options, sgd_learning_rate, statistical_seed, margin
):
    model, tokenizer = make_model(seed=statistical_seed, **model_options)
    if model_options:
        spread_latent_codebook(model)  # else the tiny codebook's rows are too close for the priors to matter
    args = make_args(tmp_path, num_generations=8, per_device_train_batch_size=8,
                     latent_policy_parameters=latent_policy_parameters, seed=statistical_seed)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    batch = rollout(trainer, [PROMPTS[0]] * 8)
    assert (batch["advantages"] > 0).any() and (batch["advantages"] < 0).any()
    denoising_inputs = trainer._denoising_inputs(batch)
    mask = batch["block_mask"][:, :, None].float()
    initial_state = {name: value.clone() for name, value in model.state_dict().items()}
    trainer.current_gradient_accumulation_steps = 1

    def log_prob_change_after_one_step(advantages):
        """Trajectory log-probabilities after one SGD step on the LaDi-RL loss, minus before."""
        model.load_state_dict(initial_state)
        model.zero_grad(set_to_none=True)
        before = model.denoising_log_probs(**denoising_inputs)["log_probs"].detach()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=sgd_learning_rate)
        loss = trainer._compute_loss(trainer.model, dict(batch, advantages=advantages))
        loss.backward()
        optimizer.step()
        after = model.denoising_log_probs(**denoising_inputs)["log_probs"].detach()
        return ((after - before) * mask).sum((1, 2))

    # a small step is first-order: the trajectory with the only advantage moves by far the most, with its sign (the
    # margins are in units of the mean |change| of all 8 trajectories)
    # smallest margins over seeds 0-4 x 1-2 threads (AMD EPYC):
    #   trajectory 0: 0.097 (4.3 x the mean |change|), trajectory 5: 0.065 (3.7 x), the sum: 0.65
    #   token posterior (lr 1e-1): trajectory 0: 4.3e-4 (1.5 x), trajectory 5: 1.1e-4 (1.6 x), the sum: 0.0026
    for trajectory in (0, 5):
        for sign in (1.0, -1.0):
            advantages = torch.zeros(8)
            advantages[trajectory] = sign
            change = log_prob_change_after_one_step(advantages)
            margin.check(f"trajectory {trajectory}, advantage {sign:+.0f}: log-prob change x sign",
                         sign * change[trajectory], 0, ">", scale=change.abs().mean(), context=change)
    # with the rollout's own advantages the step raises the advantage-weighted log-likelihood
    change = log_prob_change_after_one_step(batch["advantages"])
    margin.check("sum of advantage x log-prob change", (batch["advantages"] * change).sum(), 0, ">",
                 scale=(batch["advantages"] * change).abs().sum(), context=change)


def test_a_token_posterior_model_has_no_velocity_head_policy(tmp_path):
    model, tokenizer = make_model(**TOKEN_POSTERIOR)
    with pytest.raises(ValueError, match="no velocity head to train.*'denoiser_adapter'"):
        LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=make_args(tmp_path),
                      train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)


def test_velocity_head_policy_leaves_the_answer_decoder_untouched(tmp_path):
    model, tokenizer = make_model()
    shared_before = {n: p.detach().clone() for n, p in model.named_parameters() if "velocity_head" not in n}
    head_before = model.velocity_head.linear.weight.detach().clone()
    args = make_args(tmp_path, max_steps=2)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}), processing_class=tokenizer)
    trainer.train()
    assert not torch.equal(model.velocity_head.linear.weight, head_before)
    for name, parameter in model.named_parameters():
        if "velocity_head" not in name:
            assert torch.equal(parameter, shared_before[name]), name


def test_denoiser_adapter_policy_moves_the_velocity_and_leaves_the_answer_decoder_bit_identical(tmp_path):
    """The denoiser adapter acts at noisy-block positions only, which nothing else reads: after training it, the
    answer decoder's and stop head's outputs are bit for bit those before, while the velocity field has moved."""
    model, tokenizer = make_model()
    args = make_args(tmp_path, max_steps=2, latent_policy_parameters="denoiser_adapter", denoiser_lora_rank=4)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}), processing_class=tokenizer)
    assert model.config.denoiser_lora_rank == 4
    adapter = model.adapter_parameters("denoiser")
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, PROMPTS[:2])
    generator = torch.Generator().manual_seed(3)
    inputs = dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        latents=torch.randn(2, 2, 3, 8, generator=generator), block_mask=torch.tensor([[1, 1], [1, 0]]),
        noisy_latents=torch.randn(2, 2, 3, 8, generator=generator), noisy_timesteps=torch.tensor([[0.9, 0.4], [0.7, 0.2]]),
        noisy_block_index=torch.tensor([[0, 1], [0, 1]]),
        answer_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), answer_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
    )
    with torch.no_grad():
        before = model._packed_forward(**inputs)
    others_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if "velocity_head" not in n and ".denoiser." not in n}
    adapter_before = [p.detach().clone() for p in adapter]
    trainer.train()
    assert {id(p) for p in trainer.optimizer.param_groups[0]["params"]} == {id(p) for p in model.denoiser_parameters()}
    assert any(not torch.equal(p, q) for p, q in zip(adapter, adapter_before))  # the adapter learned
    with torch.no_grad():
        after = model._packed_forward(**inputs)
    assert torch.equal(after["answer_logits"], before["answer_logits"])
    assert torch.equal(after["stop_logits"], before["stop_logits"])
    assert (after["velocity"] - before["velocity"]).abs().max() > 1e-4
    for name, parameter in model.named_parameters():
        if name in others_before:
            assert torch.equal(parameter, others_before[name]), name
    # the adapter is part of the saved model
    reloaded_dir = tmp_path / "saved"
    model.save_pretrained(reloaded_dir)
    reloaded = LaDiRModel.from_pretrained(reloaded_dir)
    assert reloaded.config.denoiser_lora_rank == 4
    with torch.no_grad():
        assert torch.equal(reloaded._packed_forward(**inputs)["velocity"], after["velocity"])


@pytest.mark.parametrize("latent_policy_parameters", ["velocity_head", "denoiser_adapter", "reasoner"])
def test_with_the_text_term_on_the_latent_loss_moves_only_the_parameters_of_its_policy(
    tmp_path, latent_policy_parameters
):
    """text_policy_coef > 0 makes the shared parameters trainable (the text term trains them); the latent loss must
    still move only the velocity head when latent_policy_parameters="velocity_head", and the shared ones too with
    "reasoner" and "denoiser_adapter" (whose gradient runs through the LM features the noisy blocks read)."""
    model, tokenizer = make_model()
    args = make_args(tmp_path, num_generations=4, per_device_train_batch_size=4, text_policy_coef=0.5,
                     latent_policy_parameters=latent_policy_parameters)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    batch = rollout(trainer, [PROMPTS[0]] * 4)
    shared = model.shared_reasoner_parameters()
    assert all(parameter.requires_grad for parameter in shared)  # the text term trains them
    model.zero_grad(set_to_none=True)
    log_probs = model(task="policy", denoising=trainer._denoising_inputs(batch))["denoising"]["log_probs"]
    (batch["advantages"][:, None, None] * log_probs).sum().backward()  # the latent policy gradient alone
    assert model.velocity_head.linear.weight.grad.abs().sum() > 0
    shared_gradient = sum(p.grad.abs().sum().item() for p in shared if p.grad is not None)
    if latent_policy_parameters == "denoiser_adapter":
        assert sum(p.grad.abs().sum().item() for p in model.adapter_parameters("denoiser") if p.grad is not None) > 0
    if latent_policy_parameters == "velocity_head":
        assert shared_gradient == 0.0
    else:
        assert shared_gradient > 0.0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_step_without_advantages_moves_the_policy_only_by_the_configured_weight_decay(tmp_path, weight_decay):
    """A constant reward gives every latent a zero advantage, so the loss has no gradient: with weight_decay=0 the
    step leaves the velocity head exactly as it was, with weight_decay=w AdamW shrinks it by lr * w."""
    model, tokenizer = make_model()
    head_before = model.velocity_head.linear.weight.detach().clone()
    args = make_args(tmp_path, max_steps=1, weight_decay=weight_decay, latent_kl_beta=0.0)
    trainer = LaDiRLTrainer(model=model, reward_funcs=lambda completions, **kwargs: [1.0] * len(completions), args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.train()
    assert all(group["weight_decay"] == weight_decay for group in trainer.optimizer.param_groups)
    expected = head_before * (1 - args.learning_rate * weight_decay)  # decoupled decay, scheduler at its first lr
    assert torch.allclose(model.velocity_head.linear.weight, expected, atol=1e-7, rtol=0)


def crafted_rollout(trainer, log_ratio, advantage):
    """A real rollout whose recorded old log-probs are the current ones minus ``log_ratio`` and whose advantages are
    all ``advantage``: every unit of the latent loss then has the ratio ``exp(log_ratio)``."""
    batch = rollout(trainer, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2)
    with torch.no_grad():
        log_probs = trainer.model.denoising_log_probs(**trainer._denoising_inputs(batch))["log_probs"]
    batch["old_log_probs"] = log_probs - log_ratio
    batch["advantages"] = torch.full_like(batch["advantages"], advantage)
    trainer.current_gradient_accumulation_steps = 1
    return batch


@pytest.mark.parametrize(
    "overrides, log_ratio, advantage, expected_loss, clipped_low, clipped_high",
    [
        # A < 0 and rho = e^2: -min(rho A, clip(rho) A) = rho = 7.389; the high clip does not bind when A < 0
        (dict(), 2.0, -1.0, 7.389, 0.0, 0.0),
        (dict(delta=2.0), 2.0, -1.0, 2.0, 0.0, 0.0),  # GRPO's two-sided clip caps the unclipped ratio at delta
        (dict(), 2.0, 1.0, -1.2, 0.0, 1.0),  # A > 0: the high clip binds, -(1 + eps_high) A
        (dict(), -1.0, -1.0, 0.8, 1.0, 0.0),  # A < 0, rho = e^-1 < 1 - eps_low: the low clip binds
        # the off-policy mask drops a trace with A < 0 whose mean log(pi_old / pi_theta) = 1 exceeds the threshold
        (dict(off_policy_mask_threshold=0.5), -1.0, -1.0, 0.0, 1.0, 0.0),
        (dict(off_policy_mask_threshold=1.5), -1.0, -1.0, 0.8, 1.0, 0.0),
        (dict(off_policy_mask_threshold=0.5), -1.0, 1.0, -1 * 0.368, 0.0, 0.0),  # A >= 0 is always kept
    ],
)
def test_grpo_clip_options_keep_their_meaning_on_the_denoising_steps(
    tmp_path, overrides, log_ratio, advantage, expected_loss, clipped_low, clipped_high
):
    model, tokenizer = make_model()
    args = make_args(tmp_path, loss_type="grpo", latent_kl_beta=0.0, **overrides)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    batch = crafted_rollout(trainer, log_ratio, advantage)
    loss = trainer._compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-3)
    metrics = trainer._metrics["train"]
    assert metrics["clip_ratio/low_mean"][-1] == pytest.approx(clipped_low)
    assert metrics["clip_ratio/high_mean"][-1] == pytest.approx(clipped_high)
    assert metrics["clip_ratio/region_mean"][-1] == pytest.approx(max(clipped_low, clipped_high))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_each_loss_type_normalises_the_denoising_steps_as_grpo_normalises_tokens(tmp_path, loss_type):
    """Traces of 2 and 1 blocks, 4 denoising steps each: GRPO's normalisations, with (block, step) for token."""
    model, tokenizer = make_model()
    importance_sampling_level = "sequence" if loss_type == "luspo" else "token"
    args = make_args(tmp_path, loss_type=loss_type, latent_kl_beta=0.0,
                     importance_sampling_level=importance_sampling_level)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    batch = crafted_rollout(trainer, 0.0, 1.0)  # ratio 1: every unit's loss is -A
    # the generation batch's units (dapo's normaliser): its real blocks x trained steps, counted by the rollout
    num_steps = batch["step_indices"].shape[1]
    assert batch["num_items_in_batch"].item() == batch["block_mask"].sum().item() * num_steps
    batch["block_mask"] = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    batch["num_items_in_batch"] = torch.tensor(6.0 * num_steps)
    advantages = torch.tensor([1.0, 0.0, -1.0, 4.0])  # the trace with advantage 0 is not scored, only counted
    batch["advantages"] = advantages
    units = torch.tensor([2.0, 1.0, 2.0, 1.0]) * num_steps  # real (block, step) units per trace
    unit_loss_sum = (-advantages * units).sum()
    expected = {
        "grpo": (-advantages).mean(),  # mean over a trace's units, then over traces
        "bnpo": unit_loss_sum / units.sum(),  # mean over the batch's units
        "dr_grpo": unit_loss_sum / (4 * 2 * num_steps),  # / (rows * max blocks * steps)
        "dapo": unit_loss_sum / (6.0 * num_steps),  # / units of the generation batch
        "luspo": (-advantages * units).mean(),  # sum over a trace's units, mean over traces
    }[loss_type]
    loss = trainer._compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    "latent_policy_parameters, model_options",
    [("velocity_head", {}), ("denoiser_adapter", TOKEN_POSTERIOR)],
    ids=["velocity_head", "token_posterior-denoiser_adapter"],
)
def test_traces_with_advantage_zero_are_not_fed_to_the_loss_and_the_gradient_is_unchanged(
    tmp_path, latent_policy_parameters, model_options
):
    """The loss scores only the traces with an advantage; its value and gradient equal those of the whole batch
    scored by the model and the clipped objective written out here (at ratio 1 its gradient is -A grad log pi)."""
    model, tokenizer = make_model(**model_options)
    if model_options:
        spread_latent_codebook(model)
    args = make_args(tmp_path, loss_type="bnpo", latent_kl_beta=0.0, latent_policy_parameters=latent_policy_parameters)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    batch = crafted_rollout(trainer, 0.0, 1.0)
    advantages = torch.tensor([0.0, 1.5, 0.0, -0.5])
    batch["advantages"] = advantages
    trained = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad(set_to_none=True)
    log_probs = model.denoising_log_probs(**trainer._denoising_inputs(batch))["log_probs"]  # all 4 traces
    mask = batch["block_mask"][:, :, None].expand_as(log_probs).float()
    ratio = torch.exp(log_probs - log_probs.detach())
    expected_loss = (-advantages[:, None, None] * ratio * mask).sum() / mask.sum()  # bnpo: mean over the units
    expected_loss.backward()
    expected_grads = [p.grad.clone() for p in trained]
    assert sum(g.abs().sum() for g in expected_grads) > 0

    fed_rows = []
    original_forward = model.forward

    def recording_forward(*inputs, **kwargs):
        fed_rows.append(kwargs["denoising"]["step_latents"].shape[0])
        return original_forward(*inputs, **kwargs)

    model.forward = recording_forward
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    assert fed_rows == [2]
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-7)
    for parameter, expected in zip(trained, expected_grads):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=1e-7)

    # no trace with an advantage: one row is still fed (every process runs the same forward and backward), loss 0
    batch["advantages"] = torch.zeros(4)
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    assert fed_rows == [2, 1] and loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in trained)


@pytest.mark.parametrize("use_bias_correction_kl", [False, True])
def test_bias_corrected_kl_is_the_kl_reweighted_by_the_ratio(tmp_path, use_bias_correction_kl):
    model, tokenizer = make_model()
    args = make_args(tmp_path, latent_kl_beta=0.1, use_bias_correction_kl=use_bias_correction_kl)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    batch = crafted_rollout(trainer, 0.5, 0.0)  # A = 0: the loss is the KL term alone
    with torch.no_grad():
        outputs = trainer.model.denoising_log_probs(**trainer._denoising_inputs(batch))
    batch["ref_means"] = outputs["means"] + 0.01
    # ||mu - mu_ref||^2 / (2 std^2) per step, independent of the trainer's code
    kl = (0.01**2 * outputs["means"][0, 0, 0].numel()) / (2 * outputs["stds"] ** 2)
    kl = kl * (torch.exp(torch.tensor(0.5)) if use_bias_correction_kl else 1.0)
    step_mask = batch["block_mask"][:, :, None].expand_as(kl)
    expected = kl[step_mask].mean()  # over the real blocks' steps
    trainer._compute_loss(trainer.model, batch)
    assert trainer._metrics["train"]["latent_kl"][-1] == pytest.approx(expected.item(), rel=1e-4)


# The tiny model's answer decoder can not be sharp at temperature 1: its tied LM head is frozen and reads an RMS-normed
# hidden state, which caps P('cat' | a 'cat' latent) near 0.7 (the other ~150 tokens share the rest). Decoding at 0.3
# makes the answer follow the latent's mode, so the reward measures what the latent policy controls.
ANSWER_TEMPERATURE = 0.3


def train_bimodal_reasoner(seed=0, steps=300, rows=16):
    """A tiny reasoner whose latent decides the answer: latents near +1 decode to 'cat', near -1 to 'dog'. It learns
    both modes from equal halves of `rows`; how much mass its denoiser then puts on each depends on the CPU and the
    seed (measured 0.2-0.6 'cat'), so `make_cat_rare` sets the start the tests need."""
    model, tokenizer = make_model(
        seed=seed, initializer_range=0.2, latent_tokens_per_block=2, latent_dim=4, encoder_lora_rank=8,
        reasoner_lora_rank=8, max_blocks=1, num_denoise_steps=8, initial_noise_scale=1.0,
    )
    torch.nn.init.zeros_(model.velocity_head.linear.weight)
    model.train_only(model.reasoner_parameters())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["what is it ?"] * rows)
    sign = torch.tensor([1.0, -1.0]).repeat(rows // 2)
    latents = sign[:, None, None, None] * torch.ones(rows, 1, 2, 4)
    answers = torch.tensor([[tokenizer.convert_tokens_to_ids("cat" if s > 0 else "dog"), tokenizer.eos_token_id]
                            for s in sign])
    for _ in range(steps):
        loss = model(task="reasoner", prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                     latents=latents + 0.3 * torch.randn_like(latents), block_mask=torch.ones(rows, 1, dtype=torch.bool),
                     answer_ids=answers, answer_mask=torch.ones_like(answers), prompt_dropout=0.0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, tokenizer


def fraction_cat(model, tokenizer, seed=1, num_latents=128):
    """The share of 'cat' answers over `num_latents` latents, decoded as the trainer decodes them."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    texts = LaDiRPipeline(model, tokenizer).sample_answers(
        ["what is it ?"], num_latents=num_latents, sde_noise_level=0.5, max_new_tokens=2,
        temperature=ANSWER_TEMPERATURE, generator=generator,
    ).texts
    return sum(text.strip().startswith("cat") for text in texts) / len(texts)


def make_cat_rare(model, tokenizer, seed, target):
    """Shift the velocity head's bias along the all-ones direction (the 'cat' mode is +1 in every coordinate) until
    'cat' is rare: a bisection on the shift for a 'cat' share of `target` over 64 latents. Every denoising step moves
    `z` by -step_size * velocity, so a positive shift moves the sampled latents towards the 'dog' mode."""
    bias = model.velocity_head.linear.bias
    original = bias.detach().clone()
    low, high = 0.0, 4.0  # share(low) > target >= share(high): measured 'cat' shares at a shift of 4 are 0
    with torch.no_grad():
        for _ in range(7):
            middle = (low + high) / 2
            bias.copy_(original + middle)
            if fraction_cat(model, tokenizer, seed=seed, num_latents=64) > target:
                low = middle
            else:
                high = middle
        bias.copy_(original + high)


@pytest.mark.statistical
def test_rewarding_one_answer_raises_the_mean_reward(tmp_path, statistical_seed, margin):
    """From a measured start where 'cat' is rare, 60 LaDi-RL steps rewarding 'cat' make it the typical answer."""
    seed = statistical_seed
    model, tokenizer = train_bimodal_reasoner(seed=seed)
    make_cat_rare(model, tokenizer, seed=seed + 2, target=0.25)
    before = fraction_cat(model, tokenizer, seed=seed + 1)

    def cat_reward(completions, **kwargs):
        return [float(text.strip().startswith("cat")) for text in completions]

    steps = 60
    # 16 latents per group: with 'cat' at ~25% nearly every group has a rewarded latent, so the advantages carry
    # signal on most steps (with 8, seeds where the first groups had none drifted to 'dog' and never came back)
    args = make_args(tmp_path, per_device_train_batch_size=16, num_generations=16, num_decodes_per_latent=2,
                     max_completion_length=2, max_steps=steps, learning_rate=3e-2, sde_noise_level=0.5,
                     temperature=ANSWER_TEMPERATURE, seed=seed)
    trainer = LaDiRLTrainer(model=model, reward_funcs=cat_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": ["what is it ?"] * (16 * steps)}),
                            processing_class=tokenizer)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    after = fraction_cat(model, tokenizer, seed=seed + 1)  # the same sampling noise as `before`
    # A share over 128 latents has a standard deviation of at most 0.044, a mean reward over 10 steps (320 answers of
    # 160 latents) at most 0.04.
    # smallest margins over seeds 0-4 x 1 thread (AMD EPYC), 16 latents per group:
    #   start 0.19 below 0.5, rise 0.24 above 0.45 (5 sd), final shares 1.0; the reward check (seeds 0, 2): 0.30
    margin.check("'cat' share at the start (rare: room to rise)", before, 0.5, "<", scale=0.044)
    margin.check("'cat' share rise", after - before, 0.45, ">", scale=0.044, context=(before, after))
    # the trainer's reward at the start is the start share (the same decoding), so its rise is read against `before`
    margin.check("mean reward of the last 10 steps minus the start share", sum(rewards[-10:]) / 10 - before, 0.4,
                 ">", scale=0.04, context=rewards)


@pytest.mark.statistical
def test_reference_kl_is_zero_at_first_and_grows_as_the_policy_moves(tmp_path, statistical_seed, margin):
    model, tokenizer = make_model(seed=statistical_seed)
    args = make_args(tmp_path, max_steps=3, latent_kl_beta=0.1, learning_rate=5e-2, seed=statistical_seed)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 3}), processing_class=tokenizer)
    reference_head = trainer.ref_denoiser.velocity_head.linear.weight.detach().clone()
    trainer.train()
    kls = [entry["latent_kl"] for entry in trainer.state.log_history if "latent_kl" in entry]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)
    # smallest margin over seeds 0-4 x 1-2 threads (AMD EPYC): 5.9 (the KL is 6-9)
    margin.check("latent KL to the reference after 2 updates", kls[-1], 1e-4, ">", context=kls)
    assert torch.equal(trainer.ref_denoiser.velocity_head.linear.weight, reference_head)  # the reference stays frozen


@pytest.mark.statistical
def test_reused_rollouts_record_old_log_probs_and_clip(tmp_path, statistical_seed, margin):
    """num_iterations=2 with gradient accumulation: the ratio is against the recorded old policy, and clips."""
    model, tokenizer = make_model(seed=statistical_seed)
    args = make_args(tmp_path, max_steps=2, num_iterations=2, gradient_accumulation_steps=2, learning_rate=5e-2,
                     seed=statistical_seed)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tokenizer)
    trainer.train()
    assert "old_log_probs" in trainer._buffered_inputs[0]
    history = [entry for entry in trainer.state.log_history if "clip_ratio/region_mean" in entry]
    assert history[0]["approx_kl"] == pytest.approx(0.0, abs=1e-4)  # first pass: the policy is the old policy
    # the reuse pass sees the moved policy
    # smallest margin over seeds 0-4 x 1-2 threads (AMD EPYC): 0.875
    margin.check("clip ratio of the reuse pass", history[-1]["clip_ratio/region_mean"], 0, ">", context=history)
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in history)


def test_metrics_and_completions_table(tmp_path):
    model, tokenizer = make_model()
    args = make_args(tmp_path, log_completions=True, diversity_guidance_scale=0.3)
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("reward", "rewards/digit_fraction_reward/mean", "latent_utility/mean", "latent_utility/std",
                "frac_reward_zero_std", "decode_agreement", "latent_diversity", "distinct_answers_per_prompt",
                "entropy", "clip_ratio/region_mean", "approx_kl", "time/denoising", "time/decoding", "time/scoring"):
        assert key in logged, key
    assert 0 <= logged["decode_agreement"] <= 1 and logged["latent_diversity"] > 0
    # the sampler's log-probs against the loss's recomputation, at the weights that sampled (float32)
    assert logged["sampler_log_prob_gap"] < 1e-4
    assert logged["clip_ratio/low_mean"] == logged["clip_ratio/high_mean"] == 0.0  # ratio 1 on the first pass
    assert 1 <= logged["distinct_answers_per_prompt"] <= 8
    columns = [trainer._logs["prompt"], trainer._logs["completion"], trainer._logs["advantages"],
               trainer._logs["extra"]["latent (first block)"], trainer._logs["rewards"]["digit_fraction_reward"]]
    assert len({len(column) for column in columns}) == 1 and len(columns[0]) == 4 * 2  # one row per answer


# ------------------------------------------------------------------ the user's view


def test_a_grpo_script_becomes_a_ladirl_script_by_swapping_import_config_and_model(tmp_path):
    tokenizer = make_tokenizer()
    dataset = Dataset.from_dict({"prompt": PROMPTS * 2})
    config_kwargs = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                         num_generations=4, max_completion_length=4, max_steps=1, report_to="none",
                         save_strategy="no", gradient_checkpointing=False, beta=0.01)
    trainer_kwargs = dict(reward_funcs=digit_fraction_reward, train_dataset=dataset, processing_class=tokenizer)

    base_dir = tmp_path / "base"
    tiny_causal_lm(tokenizer, seed=None).save_pretrained(base_dir)
    grpo = GRPOTrainer(model=str(base_dir), args=GRPOConfig(**config_kwargs), **trainer_kwargs)
    grpo.train()
    model, _ = make_model()
    ladirl = LaDiRLTrainer(model=model, args=LaDiRLConfig(**config_kwargs), **trainer_kwargs)
    ladirl.train()
    assert "reward" in grpo.state.log_history[0] and "reward" in ladirl.state.log_history[0]
    assert ladirl.latent_kl_beta == 0.01  # GRPO's `beta` carries over as the latent KL weight


def test_checkpoint_saves_and_resumes(tmp_path):
    def run(output_dir, max_steps, resume=None):
        model, tokenizer = make_model()
        args = make_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2, learning_rate=5e-2)
        trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                                train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    straight, straight_model = run(tmp_path / "straight", max_steps=4)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    resumed, resumed_model = run(tmp_path / "resumed", max_steps=4, resume=str(checkpoint))
    assert resumed.state.global_step == 4

    def losses(trainer):
        return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}

    # the resumed run trained steps 3 and 4 only (1 and 2 come from the checkpoint's history), with the same losses
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    reloaded = LaDiRModel.from_pretrained(checkpoint)
    assert not torch.equal(reloaded.velocity_head.linear.weight, straight_model.velocity_head.linear.weight)
    # the resumed run continued from the checkpoint's weights, optimizer and RNG: it ends where the straight run ended
    torch.testing.assert_close(resumed_model.velocity_head.linear.weight, straight_model.velocity_head.linear.weight,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("launcher, moment", [("python", "step 3"), ("python", "saving checkpoint-4"),
                                              ("ddp", "step 3"), pytest.param("zero2", "step 3", marks=pytest.mark.slow)])
def test_a_run_killed_between_checkpoints_resumes_to_the_same_result(tmp_path, launcher, moment):
    """SIGKILL in a real subprocess while step 3 runs (checkpoint-2 written), then `resume_from_checkpoint=True` in a
    new process: the losses of steps 3-6 and the final weights equal those of an uninterrupted run, bit for bit (one
    thread, fixed seed: the CPU computation is deterministic). The same with two processes (DDP, ZeRO-2), where every
    process of the run is killed at once (its whole process group, launcher included), and with the kill landing
    while checkpoint-4 is being written (its weights and optimizer on disk, its trainer state not): the resume must
    take checkpoint-2, not the half-written one."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "train_ladirl_resumable.py")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    command = [sys.executable, script] if launcher == "python" else [*accelerate_launch_command(launcher), script]
    processes = 1 if launcher == "python" else 2

    def run(output_dir, *flags):
        result = subprocess.run([*command, str(output_dir), *flags], capture_output=True, text=True, env=environment,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    run(tmp_path / "straight")
    killed = tmp_path / "killed"
    hang = ["--hang", "3"] if moment == "step 3" else ["--hang_in_save", "4"]
    process = subprocess.Popen([*command, str(killed), *hang], env=environment, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list(killed.glob("hanging-*"))) < processes:
            assert process.poll() is None and time.monotonic() < deadline, f"the run ended before it reached {moment}"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and every worker, as an out-of-memory kill or `kill -9`
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        # the launcher may start its workers in a session of their own; each wrote its pid into its marker
        for marker in killed.glob("hanging-*"):
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(marker.read_text()), signal.SIGKILL)
    if moment == "step 3":
        assert sorted(path.name for path in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    else:
        assert sorted(path.name for path in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        assert (killed / "checkpoint-4" / "model.safetensors").exists()  # half-written: weights, no trainer state
        assert not (killed / "checkpoint-4" / "trainer_state.json").exists()
    run(killed, "--resume")

    straight_losses = json.loads((tmp_path / "straight" / "losses.json").read_text())
    resumed_losses = json.loads((killed / "losses.json").read_text())
    # the resumed run's history holds steps 1-2 from checkpoint-2 and steps 3-6 it trained itself
    assert resumed_losses == straight_losses and len(straight_losses) == 6
    straight = LaDiRModel.from_pretrained(tmp_path / "straight" / "final").state_dict()
    resumed = LaDiRModel.from_pretrained(killed / "final").state_dict()
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    first = LaDiRModel.from_pretrained(killed / "checkpoint-2").velocity_head.linear.weight
    assert not torch.equal(first, straight["velocity_head.linear.weight"])  # steps 3-6 did move the policy


def test_resume_true_skips_a_checkpoint_whose_save_was_interrupted(tmp_path, caplog):
    """A kill while checkpoint-4 was being written leaves its weights but no trainer state: resume_from_checkpoint=
    True resumes from checkpoint-2 (the last complete one), says so, and leaves checkpoint-4 on disk."""
    def trainer_for(max_steps):
        model, tokenizer = make_model()
        args = make_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, learning_rate=5e-2)
        return LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tokenizer)

    trainer_for(4).train()
    interrupted = tmp_path / "checkpoint-4"
    (interrupted / "trainer_state.json").unlink()
    with open(interrupted / "optimizer.pt", "r+b") as optimizer_file:
        optimizer_file.truncate(100)
    resumed = trainer_for(6)
    with caplog.at_level("WARNING", logger="trl_ladi.trainers.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert steps[:2] == [1, 2] and 3 in steps  # steps 1-2 from checkpoint-2's history, 3 onwards trained again
    assert "checkpoint-4" in caplog.text and "left on disk" in caplog.text
    assert (interrupted / "model.safetensors").exists()


def test_resume_true_with_only_interrupted_checkpoints_says_what_to_do(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hist')  # cut short
    model, tokenizer = make_model()
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=make_args(tmp_path),
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    with pytest.raises(ValueError, match="no checkpoint .* was written completely.*checkpoint-2"):
        trainer.train(resume_from_checkpoint=True)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(use_vllm=True), "use_vllm"),
        (dict(sde_noise_level=0.0), "sde_noise_level"),
        (dict(text_policy_coef=0.5, num_decodes_per_latent=1), "num_decodes_per_latent >= 2"),
        (dict(loss_type="cispo"), "loss_type"),
        (dict(latent_utility="median"), "latent_utility"),
        (dict(latent_policy_parameters="everything"), "latent_policy_parameters"),
        (dict(train_timestep_fraction=0.0), "train_timestep_fraction"),
        (dict(entropy_coef=0.1), "entropy_coef.*SDE noise schedule"),
        (dict(mask_truncated_completions=True), "mask_truncated_completions.*reward function"),
        (dict(sync_ref_model=True), "sync_ref_model.*frozen copy"),
        (dict(top_p=0.9), "top_p.*temperature"),
        (dict(top_k=50), "top_k.*temperature"),
        (dict(repetition_penalty=1.1), "repetition_penalty.*temperature"),
        (dict(generation_kwargs={"num_beams": 2}), "generation_kwargs.*temperature"),
        (dict(pad_to_multiple_of=8), "pad_to_multiple_of.*left-padded"),
        (dict(cache_implementation="dynamic"), "cache_implementation='dynamic'.*None.*'static'"),
        (dict(chat_template_kwargs={"enable_thinking": False}), "chat_template_kwargs.*chat template"),
        (dict(model_init_kwargs={"dtype": "bfloat16"}), "model_init_kwargs.*from_pretrained"),
        (dict(trust_remote_code=True), "trust_remote_code.*never runs code"),
        (dict(cast_lm_head_to_fp32=True), "cast_lm_head_to_fp32.*float32"),
        (dict(router_aux_loss_coef=0.01), "router_aux_loss_coef.*dense"),
        (dict(max_tool_calling_iterations=2), "max_tool_calling_iterations.*tool"),
        (dict(num_denoise_steps=0), "num_denoise_steps must be at least 1"),
        (dict(max_latent_blocks=0), "max_latent_blocks must be at least 1"),
        (dict(initial_noise_scale=0.0), "initial_noise_scale must be > 0"),
        (dict(diversity_guidance_scale=-0.1), "diversity_guidance_scale must be >= 0"),
        (dict(denoiser_lora_rank=0), "denoiser_lora_rank must be at least 1"),
        (dict(latent_policy_parameters="denoiser_adapter", activation_checkpointing=True),
         "denoiser_adapter.*activation checkpointing"),
    ],
)
def test_incompatible_config_values_fail_with_a_message(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_diversity_guidance_needs_whole_groups_on_each_process(tmp_path, monkeypatch):
    # 3 processes x 2 rows: the 3 latents of a prompt would be split across processes
    monkeypatch.setattr(LaDiRLConfig, "world_size", property(lambda self: 3))
    with pytest.raises(ValueError, match="whole groups"):
        make_args(tmp_path, diversity_guidance_scale=0.3, num_generations=3, per_device_train_batch_size=2)
    make_args(tmp_path, diversity_guidance_scale=0.3, num_generations=3, per_device_train_batch_size=3)


def inject_non_finite(model, trainer, monkeypatch, where):
    """Make one rollout (or the loss) non-finite: a NaN velocity, latent or log-probability in trace 0, or a NaN loss."""
    if where == "velocity":
        velocity = model.denoising_velocity

        def nan_in_row_0(*args, **kwargs):
            result = velocity(*args, **kwargs).clone()
            result[0] = float("nan")
            return result

        monkeypatch.setattr(model, "denoising_velocity", nan_in_row_0)
    elif where in ("latents", "log_probs"):
        sample = LaDiRPipeline.sample

        def nan_in_trace_0(self, *args, **kwargs):
            samples = sample(self, *args, **kwargs)
            (samples.trace.step_latents if where == "latents" else samples.trace.step_log_probs)[0] = float("nan")
            return samples

        monkeypatch.setattr(LaDiRPipeline, "sample", nan_in_trace_0)
    else:
        policy_loss = trainer._policy_loss
        monkeypatch.setattr(trainer, "_policy_loss", lambda *args: policy_loss(*args) * float("nan"))


NON_FINITE_REPORTS = {
    # a NaN latent makes its trace's log-probabilities NaN too, which the report adds
    "velocity": "NaN/inf in the sampled latents of 1 (a non-finite velocity or latent input)",
    "latents": "NaN/inf in the sampled latents of 1 (a non-finite velocity or latent input)",
    "log_probs": "NaN/inf in the sampled denoising log-probabilities of 1 of 8 latent traces",
    "loss": "the loss is non-finite (nan)",
}


@pytest.mark.parametrize("where", list(NON_FINITE_REPORTS))
def test_non_finite_values_are_reported_and_skipped(tmp_path, monkeypatch, caplog, where):
    model, tokenizer = make_model()
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=make_args(tmp_path, num_generations=4,
                            per_device_train_batch_size=8), train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
                            processing_class=tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inject_non_finite(model, trainer, monkeypatch, where)
    with caplog.at_level("WARNING", logger="trl_ladi.trainers.ladirl_trainer"):
        trainer.train()
    assert f"Step 1: {NON_FINITE_REPORTS[where]}" in caplog.text
    logged = trainer.state.log_history[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    if where == "loss":  # the whole optimizer step is dropped
        assert logged["non_finite/skipped_updates"] == 1 and moved == []
    else:  # trace 0 is left out; the other traces still train the policy
        assert logged["non_finite/skipped_traces"] == 1 and logged["non_finite/skipped_updates"] == 0
        assert moved and all(name.startswith("velocity_head") for name in moved)


@pytest.mark.parametrize("where", ["velocity", "log_probs", "loss"])
def test_non_finite_values_stop_training_when_asked(tmp_path, monkeypatch, where):
    model, tokenizer = make_model()
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=make_args(
                            tmp_path, num_generations=4, per_device_train_batch_size=8, on_non_finite="stop"),
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}), processing_class=tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inject_non_finite(model, trainer, monkeypatch, where)
    with pytest.raises(FloatingPointError, match=rf"Step 1: {re.escape(NON_FINITE_REPORTS[where])}.*on_non_finite"):
        trainer.train()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_bad_inputs_name_the_problem(tmp_path):
    model, tokenizer = make_model()
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="'prompt' column"):
        LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                      train_dataset=Dataset.from_dict({"question": PROMPTS}), processing_class=tokenizer)
    with pytest.raises(TypeError, match="LaDiRModel.from_base"):
        LaDiRLTrainer(model=tiny_causal_lm(tokenizer, seed=None),
                      reward_funcs=digit_fraction_reward, args=args,
                      train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    with pytest.raises(ValueError, match="processing_class"):
        LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                      train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(ValueError, match="no rows"):
        LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                      train_dataset=Dataset.from_dict({"prompt": []}), processing_class=tokenizer)
    # the tiny base has 512 positions; 2 blocks of 6 and an answer of 4 leave 495 for the prompt
    long_prompt = " ".join(["cat"] * 600)
    with pytest.raises(ValueError, match=r"longest prompt \(row 1\) has 6\d\d tokens.*base model has 512"):
        LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args,
                      train_dataset=Dataset.from_dict({"prompt": [PROMPTS[0], long_prompt]}), processing_class=tokenizer)
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": prompt}] for prompt in PROMPTS]})
    no_template = make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat messages, but the tokenizer has no chat template"):
        LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args, train_dataset=chat,
                      processing_class=no_template)


def test_a_saved_ladir_folder_that_is_incomplete_or_inconsistent_is_refused_before_training(tmp_path):
    model, tokenizer = make_model()
    model.save_pretrained(tmp_path / "no-weights")
    tokenizer.save_pretrained(tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    model.save_pretrained(tmp_path / "mismatch")
    tokenizer.save_pretrained(tmp_path / "mismatch")
    config = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    config["latent_dim"] = 16  # the weights were saved with 8
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(config))
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    for folder, message in (
        ("no-weights", "no-weights has no weights.*save_pretrained"),
        ("mismatch", "mismatch do not fit its config.json.*saved with these weights"),
    ):
        with pytest.raises((FileNotFoundError, ValueError), match=message):
            LaDiRLTrainer(model=str(tmp_path / folder), reward_funcs=digit_fraction_reward, args=make_args(tmp_path),
                          train_dataset=dataset)


def answer_http_503(completions, **kwargs):
    raise ConnectionError("503 Service Unavailable")


def answer_strings(completions, **kwargs):
    return ["good"] * len(completions)


def answer_a_dict(completions, **kwargs):
    return {"reward": 1.0}


@pytest.mark.parametrize(
    "reward_func, error, message",
    [
        (answer_http_503, RuntimeError, "reward function 'answer_http_503' raised ConnectionError: 503.*while scoring 8"),
        (answer_strings, TypeError, "'answer_strings' returned str 'good' for answer 0.*float, or None"),
        (answer_a_dict, TypeError, "'answer_a_dict' returned dict.*list of 8 floats"),
    ],
)
def test_a_failing_reward_function_is_named_with_what_it_did(tmp_path, reward_func, error, message):
    model, tokenizer = make_model()
    head_before = model.velocity_head.linear.weight.detach().clone()
    trainer = LaDiRLTrainer(model=model, reward_funcs=[digit_fraction_reward, reward_func], args=make_args(tmp_path),
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    assert trainer.reward_func_names == ["digit_fraction_reward", reward_func.__name__]
    with pytest.raises(error, match=message):
        trainer.train()
    assert torch.equal(model.velocity_head.linear.weight, head_before)  # nothing was updated


# ------------------------------------------------------------------ multi-process


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_ladirl_tiny.py")


# A process of the 2-process gloo group sometimes aborts with this after its 3 steps are done (a C++ thread destroyed
# while joinable; 2 of 5 full-suite runs on 2026-12-04, once at DDP and once at ZeRO-3, and 0 of 25 DDP launches run
# alone). It is not a wrong loss, so such a launch is run once more; any other failure, or this one twice, fails.
TEARDOWN_ABORT = "terminate called without an active exception"


def launch(config, output_dir):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    for _ in range(2):
        result = subprocess.run(
            [*accelerate_launch_command(config), SCRIPT, str(output_dir)],
            capture_output=True, text=True, env=environment, timeout=600,
        )
        if result.returncode == 0 or TEARDOWN_ABORT not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output_dir / "losses.json") as f:
        return json.load(f)


def test_ddp_zero2_and_zero3_give_the_same_losses(tmp_path):
    """Two processes each (gloo on CPU). The first DeepSpeed run on a machine compiles one op (about 50 s)."""
    runs = {config: launch(config, tmp_path / config) for config in ("ddp", "zero2", "zero3")}
    assert runs["ddp"]["engine"] == "DistributedDataParallel" and runs["ddp"]["processes"] == 2
    assert runs["zero2"]["engine"] == runs["zero3"]["engine"] == "DeepSpeedEngine"
    reference = runs["ddp"]["losses"]
    assert any(abs(loss) > 1e-3 for loss in reference.values())  # a non-trivial loss to compare
    for config in ("zero2", "zero3"):
        assert runs[config]["losses"].keys() == reference.keys()
        for step, loss in reference.items():
            # measured agreement ~1e-7; float32 reductions in a different order allow a little more
            assert runs[config]["losses"][step] == pytest.approx(loss, abs=1e-5), (config, step)


def test_half_precision_weights_get_a_warning_and_float32_weights_do_not(tmp_path, caplog):
    model, tokenizer = make_model()
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    with caplog.at_level("WARNING", logger="trl_ladi.trainers.ladirl_trainer"):
        LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=make_args(tmp_path / "fp32"),
                      train_dataset=dataset, processing_class=tokenizer)
    assert "half precision" not in caplog.text
    model, tokenizer = make_model()
    with caplog.at_level("WARNING", logger="trl_ladi.trainers.ladirl_trainer"):
        LaDiRLTrainer(model=model.to(torch.bfloat16), reward_funcs=digit_fraction_reward,
                      args=make_args(tmp_path / "bf16"), train_dataset=dataset, processing_class=tokenizer)
    assert "The model has weights in bfloat16" in caplog.text and "bf16=True" in caplog.text
