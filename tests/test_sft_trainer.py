"""LaDiRSFTTrainer: the VAE and reasoner stages on a tiny model and a synthetic arithmetic data set.

The pipeline fixture runs what a user runs: a (tiny, briefly pre-trained) causal LM -> `LaDiRModel.from_base` ->
VAE stage -> reasoner stage -> `save_model`, and records the numbers the tests check.
"""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from transformers import HfArgumentParser

from trl_ladi.modeling import LaDiRModel, tokenize_prompts
from trl_ladi.pipeline import LaDiRPipeline
from trl_ladi.testing import make_tokenizer, tiny_causal_lm, tiny_ladir_model
from trl_ladi.trainers import LaDiRSFTConfig, LaDiRSFTTrainer
from trl_ladi.trainers.sft_trainer import DataCollatorForLatentReasoner, DataCollatorForSentenceVAE

ANSWER_TEMPLATE = "the answer is {answer}"  # the tiny tokenizer splits on whitespace only


def chain_rows():
    """`a + b - b`: two worked steps, and an answer the reasoner can learn fast (it equals the first term)."""
    rows = {"prompt": [], "reasoning": [], "answer": []}
    for a in range(1, 10):
        for b in range(1, 10):
            rows["prompt"].append([{"role": "user", "content": f"what is {a} + {b} - {b} ?"}])
            rows["reasoning"].append(f"{a} + {b} = {a + b} .\n{a + b} - {b} = {a} .")
            rows["answer"].append(str(a))
    return rows


def pretrained_tiny_lm(tokenizer, rows, steps=100, seed=0):
    """A tiny Llama that has seen the data set's text, standing in for a pretrained base LM (the VAE decoder is
    the frozen base LM, so it has to know the language already)."""
    language_model = tiny_causal_lm(tokenizer, seed=seed, hidden_size=64)
    texts = [
        f"{prompt[0]['content']} {reasoning} {ANSWER_TEMPLATE.format(answer=answer)}"
        for prompt, reasoning, answer in zip(rows["prompt"], rows["reasoning"], rows["answer"])
    ]
    input_ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts])
    optimizer = torch.optim.AdamW(language_model.parameters(), lr=3e-3)
    for _ in range(steps):
        language_model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return language_model


# the LaDiR sizes of this file's tiny models
TINY_LADIR_SIZES = dict(
    latent_tokens_per_block=2,
    latent_dim=16,
    max_blocks=3,
    encoder_lora_rank=8,
    reasoner_lora_rank=8,
    timestep_embedding_dim=32,
)


def sft_config(tmp_path, stage, **overrides):
    settings = dict(
        output_dir=str(tmp_path / stage),
        stage=stage,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        bf16=False,
        disable_tqdm=True,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        logging_steps=10,
        seed=0,
        answer_template=ANSWER_TEMPLATE,
    )
    settings.update(overrides)
    return LaDiRSFTConfig(**settings)


def answer_accuracy(model, tokenizer, rows, seed=0) -> float:
    generator = torch.Generator().manual_seed(seed)
    texts = LaDiRPipeline(model, tokenizer).sample_answers(rows["prompt"], temperature=0.0, generator=generator).texts
    expected = [ANSWER_TEMPLATE.format(answer=answer) for answer in rows["answer"]]
    return sum(text.strip() == target for text, target in zip(texts, expected)) / len(expected)


def snapshot(parameters):
    return [parameter.detach().clone() for parameter in parameters]


def unchanged(before, parameters):
    return all(torch.equal(old, new.detach()) for old, new in zip(before, parameters))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, statistical_seed):
    """The two stages, with every seed (the base LM's init, the trainers', the sampler's) from `statistical_seed`."""
    tmp_path = tmp_path_factory.mktemp("ladir_sft")
    seed = statistical_seed
    tokenizer = make_tokenizer()
    rows = chain_rows()
    dataset = datasets.Dataset.from_dict(rows)
    model = tiny_ladir_model(language_model=pretrained_tiny_lm(tokenizer, rows, seed=seed), seed=None, **TINY_LADIR_SIZES)
    results = {"tokenizer": tokenizer, "rows": rows, "model": model}

    reasoner_before_vae = snapshot(model.reasoner_parameters())
    vae_trainer = LaDiRSFTTrainer(
        model=model,
        args=sft_config(tmp_path, "vae", num_train_epochs=24, per_device_train_batch_size=8, token_substitution_prob=0.1,
                        seed=seed),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    results["vae_accuracy_before"] = vae_trainer.evaluate()["eval_token_accuracy"]
    vae_trainer.train()
    results["vae_accuracy_after"] = vae_trainer.evaluate()["eval_token_accuracy"]
    results["reasoner_untouched_by_vae"] = unchanged(reasoner_before_vae, model.reasoner_parameters())
    results["vae_trainer"] = vae_trainer

    vae_before_reasoner = snapshot(model.vae_parameters())
    results["answer_accuracy_before"] = answer_accuracy(model, tokenizer, rows, seed=seed)
    reasoner_trainer = LaDiRSFTTrainer(
        model=model,
        args=sft_config(tmp_path, "reasoner", num_train_epochs=16, seed=seed),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    reasoner_trainer.train()
    results["answer_accuracy_after"] = answer_accuracy(model, tokenizer, rows, seed=seed)
    results["vae_untouched_by_reasoner"] = unchanged(vae_before_reasoner, model.vae_parameters())
    results["flow_losses"] = [entry["flow_loss"] for entry in reasoner_trainer.state.log_history if "flow_loss" in entry]
    results["saved_dir"] = tmp_path / "saved"
    reasoner_trainer.save_model(str(results["saved_dir"]))
    print({name: value for name, value in results.items() if "accuracy" in name or name == "flow_losses"})
    return results


# ---------------------------------------------------------------------- the stages


@pytest.mark.statistical
def test_vae_stage_learns_to_reconstruct_and_sets_scaling_factor(pipeline, margin):
    before, after = pipeline["vae_accuracy_before"], pipeline["vae_accuracy_after"]
    # token accuracy of the reconstructions, on the 81 training rows (~1000 tokens: a sampling spread of ~0.015)
    # smallest margin over seeds 0-4 x 1-2 threads (AMD EPYC), 24 VAE epochs: 0.084 (mean rise 0.31; 16 epochs with the
    # contiguous tiny vocabulary gave 0.068)
    margin.check("VAE token accuracy rise", after - before, 0.1, ">", context=(before, after))
    assert pipeline["reasoner_untouched_by_vae"]

    model, trainer = pipeline["model"], pipeline["vae_trainer"]
    factor = model.config.latent_scaling_factor
    assert factor != 1.0
    logged = [entry["latent_scaling_factor"] for entry in trainer.state.log_history if "latent_scaling_factor" in entry]
    assert logged and logged[-1] == pytest.approx(factor)
    # metrics were logged per window, with the stage's names
    assert any("reconstruction_loss" in entry and "kl" in entry for entry in trainer.state.log_history)


@pytest.mark.statistical
def test_reasoner_stage_lowers_flow_loss_and_answers_better(pipeline, margin):
    flow_losses = pipeline["flow_losses"]
    assert len(flow_losses) >= 3, flow_losses
    # smallest margins over seeds 0-4 x 1-2 threads (AMD EPYC), 16 reasoner epochs after 24 VAE epochs:
    #   flow ratio 0.295 below 0.7; the accuracy starts at 0 and rises by 0.48 on average, 0.06 above the bound
    margin.check("last / first logged flow loss", flow_losses[-1] / flow_losses[0], 0.7, "<", context=flow_losses)
    before, after = pipeline["answer_accuracy_before"], pipeline["answer_accuracy_after"]
    # exact-match answer accuracy on the 81 training prompts (greedy decoding): the start has room to rise
    margin.check("answer accuracy before the reasoner stage", before, 0.3, "<=", context=(before, after))
    margin.check("answer accuracy rise", after - before, 0.15, ">=", context=(before, after))
    assert pipeline["vae_untouched_by_reasoner"]


def test_saved_model_reloads_and_generates_the_same(pipeline):
    model, tokenizer, rows = pipeline["model"], pipeline["tokenizer"], pipeline["rows"]
    reloaded = LaDiRModel.from_pretrained(pipeline["saved_dir"])
    assert reloaded.config.latent_scaling_factor == pytest.approx(model.config.latent_scaling_factor)
    prompts = rows["prompt"][:6]
    outputs = []
    for candidate in (model, reloaded):
        candidate.eval()
        generator = torch.Generator().manual_seed(7)
        pipeline = LaDiRPipeline(candidate, tokenizer)
        outputs.append(pipeline.sample_answers(prompts, temperature=0.7, generator=generator))
    assert outputs[0].texts == outputs[1].texts
    torch.testing.assert_close(outputs[0].latents, outputs[1].latents)
    # the VAE decoder shows the sampled latent blocks as text
    thoughts = reloaded.decode_latents_to_text(outputs[1].latents[0], tokenizer)
    assert len(thoughts) == outputs[1].latents.shape[1] and all(isinstance(text, str) for text in thoughts)


# ---------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def small_model():
    tokenizer = make_tokenizer()
    return tiny_ladir_model(tokenizer, seed=0, **TINY_LADIR_SIZES), tokenizer


def test_gsm8k_solution_column_is_split_into_blocks_and_answer(small_model, tmp_path):
    model, tokenizer = small_model
    dataset = datasets.Dataset.from_dict(
        {"prompt": ["what is 3 + 4 + 5 ?"], "solution": ["3 + 4 = 7 .\n7 + 5 = 12 .\n#### 12"]}
    )
    vae = LaDiRSFTTrainer(model=model, args=sft_config(tmp_path, "vae"), train_dataset=dataset, processing_class=tokenizer)
    sentences = [tokenizer.decode(ids) for ids in vae.train_dataset["sentence_ids"]]
    assert sentences == ["3 + 4 = 7 .", "7 + 5 = 12 ."]

    reasoner = LaDiRSFTTrainer(
        model=model, args=sft_config(tmp_path, "reasoner"), train_dataset=dataset, processing_class=tokenizer
    )
    row = reasoner.train_dataset[0]
    assert tokenizer.decode(row["answer_ids"]) == "the answer is 12 <eos>"
    assert row["latents"].shape == (2, model.config.latent_tokens_per_block, model.config.latent_dim)


def test_rows_without_answer_marker_are_reported_by_index(small_model, tmp_path):
    model, tokenizer = small_model
    dataset = datasets.Dataset.from_dict(
        {"prompt": ["a", "b", "c", "d"], "solution": ["1 + 1 = 2 .\n#### 2", "1 + 1 = 2 .", "#### 3 +", "no marker"]}
    )
    with pytest.raises(ValueError, match=r"rows \[1, 3\]"):
        LaDiRSFTTrainer(model=model, args=sft_config(tmp_path, "vae"), train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize(
    "columns, missing",
    [({"question": ["q"], "reasoning": ["r ."], "answer": ["1"]}, "'prompt'"), ({"prompt": ["q"], "reasoning": ["r ."]}, "'answer'")],
)
def test_missing_column_is_named(small_model, tmp_path, columns, missing):
    model, tokenizer = small_model
    with pytest.raises(ValueError, match=missing):
        LaDiRSFTTrainer(
            model=model, args=sft_config(tmp_path, "vae"), train_dataset=datasets.Dataset.from_dict(columns),
            processing_class=tokenizer,
        )


def test_vae_collator_pads_encoder_left_and_targets_right_with_eos():
    collator = DataCollatorForSentenceVAE(pad_token_id=0, eos_token_id=1)
    batch = collator([{"sentence_ids": [5, 6, 7]}, {"sentence_ids": [8]}])
    assert batch["sentence_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["sentence_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["target_ids"].tolist() == [[5, 6, 7, 1], [8, 1, 0, 0]]
    assert batch["target_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("conversational", [False, True])
def test_reasoner_collator_formats_prompts_like_the_sampler(conversational):
    tokenizer = make_tokenizer()
    prompts = ["what is 1 + 2 ?", "what is 3 ?"]
    if conversational:
        prompts = [[{"role": "user", "content": prompt}] for prompt in prompts]
    examples = [
        {"prompt": prompts[0], "answer_ids": [5, 1], "latents": torch.ones(2, 2, 4)},
        {"prompt": prompts[1], "answer_ids": [6, 7, 1], "latents": torch.ones(1, 2, 4)},
    ]
    batch = DataCollatorForLatentReasoner(tokenizer)(examples)
    expected_ids, expected_mask = tokenize_prompts(tokenizer, prompts)
    assert torch.equal(batch["prompt_ids"], expected_ids) and torch.equal(batch["prompt_mask"], expected_mask)
    assert batch["block_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["latents"].shape == (2, 2, 2, 4) and batch["latents"][1, 1].abs().sum() == 0
    assert batch["answer_ids"].tolist() == [[5, 1, 0], [6, 7, 1]]
    assert batch["answer_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]

    truncated = DataCollatorForLatentReasoner(tokenizer, max_prompt_length=3)(examples)
    assert torch.equal(truncated["prompt_ids"], expected_ids[:, -3:])


def test_reasoner_collator_batches_slot_tokens_without_latents():
    """A token-posterior model's rows carry their slot tokens only (it reads its codebook): the blocks are counted
    from those, and padding blocks hold eos."""
    tokenizer = make_tokenizer()
    examples = [
        {"prompt": "what is 1 + 2 ?", "answer_ids": [5, 1], "slot_token_ids": torch.tensor([[4, 5], [6, 1]])},
        {"prompt": "what is 3 ?", "answer_ids": [6, 1], "slot_token_ids": torch.tensor([[7, 1]])},
    ]
    batch = DataCollatorForLatentReasoner(tokenizer)(examples)
    assert "latents" not in batch
    assert batch["block_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["slot_token_ids"].tolist() == [[[4, 5], [6, 1]], [[7, 1], [tokenizer.eos_token_id] * 2]]


@pytest.mark.statistical
def test_token_substitution_replaces_about_the_configured_fraction(small_model, tmp_path, statistical_seed, margin):
    model, tokenizer = small_model
    dataset = datasets.Dataset.from_dict({"prompt": ["q"], "reasoning": ["the cat sat on the mat ."], "answer": ["1"]})
    trainer = LaDiRSFTTrainer(
        model=model, args=sft_config(tmp_path, "vae", token_substitution_prob=0.25), train_dataset=dataset,
        processing_class=tokenizer,
    )
    sentence_ids = torch.full((200, 50), tokenizer.convert_tokens_to_ids("cat"))
    sentence_mask = torch.ones_like(sentence_ids)
    sentence_mask[:, :10] = 0  # left padding is never substituted
    torch.manual_seed(statistical_seed)
    substituted = trainer._substitute_tokens(sentence_ids, sentence_mask)
    changed = substituted != sentence_ids
    assert not changed[:, :10].any()
    # 8000 Bernoulli(0.25) draws: the fraction's standard deviation is 0.0048, the bounds are 10 of them away
    # smallest margins over seeds 0-4 x 1-2 threads (AMD EPYC):
    #   0.040 (8.2 sd) low, 0.045 (9.3 sd) high
    fraction, spread = changed[:, 10:].float().mean().item(), (0.25 * 0.75 / changed[:, 10:].numel()) ** 0.5
    margin.check("substituted fraction (low side)", fraction, 0.2, ">", scale=spread)
    margin.check("substituted fraction (high side)", fraction, 0.3, "<", scale=spread)
    assert not set(substituted[changed].tolist()) & set(tokenizer.all_special_ids)


# ---------------------------------------------------------------------- config


def test_config_parses_from_the_command_line_and_documents_every_field():
    (config,) = HfArgumentParser(LaDiRSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", "out", "--stage", "reasoner", "--flow_weight", "3", "--use_cpu", "--report_to", "none"]
    )
    assert config.stage == "reasoner" and config.flow_weight == 3.0
    assert config.remove_unused_columns is False and config.gradient_checkpointing is False
    from dataclasses import fields

    from transformers import TrainingArguments

    added = {field.name for field in fields(LaDiRSFTConfig)} - {field.name for field in fields(TrainingArguments)}
    assert added and all(LaDiRSFTConfig.__dataclass_fields__[name].metadata.get("help") for name in added)


@pytest.mark.parametrize(
    "overrides, message",
    [({"stage": "rl"}, "stage must be one of"), ({"answer_template": "The answer is"}, "must contain '{answer}'")],
)
def test_config_rejects_bad_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        LaDiRSFTConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_reasoner_stage_warns_when_its_stop_head_has_not_learned(tmp_path, caplog):
    """A reasoner stage that ends with its stop loss high says so (on the main job such a start reached 4.7% pass@1),
    with the loss it ended at; a low last stop loss gives no warning."""
    tokenizer = make_tokenizer()
    model = tiny_ladir_model(tokenizer, seed=0, **TINY_LADIR_SIZES)
    trainer = LaDiRSFTTrainer(
        model=model,
        args=sft_config(tmp_path, "reasoner", max_steps=2, learning_rate=1e-6, logging_steps=1),
        train_dataset=datasets.Dataset.from_dict(chain_rows()),
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="trl_ladi.trainers.sft_trainer"):
        trainer.train()
    stop_losses = [entry["stop_loss"] for entry in trainer.state.log_history if "stop_loss" in entry]
    assert stop_losses[-1] > 0.3, stop_losses  # an untrained two-way head: about ln 2
    warned = [record.getMessage() for record in caplog.records if "stop head has not learned" in record.getMessage()]
    assert len(warned) == 1 and f"stop loss of {stop_losses[-1]:.3f}" in warned[0], warned
    assert "stop_weight" in warned[0]

    trainer.state.log_history.append({"stop_loss": 0.01})
    assert trainer._stop_head_warning() is None


def test_reasoner_stage_refuses_a_stop_token_its_answers_do_not_start_with(tmp_path):
    """A model whose LM head decides when to answer (`stop_token_id`) must be trained on answers that start with that
    token; otherwise the stage says which tokens they start with and how to build the model."""
    tokenizer = make_tokenizer()
    dataset = datasets.Dataset.from_dict(chain_rows())
    wrong = tiny_ladir_model(tokenizer, seed=0, stop_token_id=tokenizer.convert_tokens_to_ids("answer"),
                             **TINY_LADIR_SIZES)
    wrong.config.latent_scaling_factor = 2.0  # as a VAE stage sets it (else the trainer warns)
    with pytest.raises(ValueError, match=r"stop_token_id is \d+ \('answer'\).*start with the tokens \['the'\]"):
        LaDiRSFTTrainer(model=wrong, args=sft_config(tmp_path, "reasoner"), train_dataset=dataset,
                        processing_class=tokenizer)
    # "the answer is {answer}" starts with "the" whatever the answer
    right = tiny_ladir_model(tokenizer, seed=0, stop_token_id=tokenizer.convert_tokens_to_ids("the"), **TINY_LADIR_SIZES)
    right.config.latent_scaling_factor = 2.0
    LaDiRSFTTrainer(model=right, args=sft_config(tmp_path, "reasoner"), train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="start with the tokens"):  # an answer first: no fixed first token
        LaDiRSFTTrainer(model=right, args=sft_config(tmp_path, "reasoner", answer_template="{answer} is the answer"),
                        train_dataset=dataset, processing_class=tokenizer)


def test_trainer_needs_a_ladir_model(tmp_path):
    tokenizer = make_tokenizer()
    language_model = tiny_causal_lm(tokenizer, seed=None)
    dataset = datasets.Dataset.from_dict({"prompt": ["q"], "reasoning": ["r ."], "answer": ["1"]})
    with pytest.raises(TypeError, match="LaDiRModel.from_base"):
        LaDiRSFTTrainer(model=language_model, args=sft_config(tmp_path, "vae"), train_dataset=dataset, processing_class=tokenizer)


# ---------------------------------------------------------------------- distributed

TWO_PROCESS_SCRIPT = """
import dataclasses
import datasets, torch
from test_sft_trainer import TINY_LADIR_SIZES, chain_rows
from trl_ladi.testing import make_tokenizer, tiny_ladir_model
from trl_ladi.trainers import LaDiRSFTConfig, LaDiRSFTTrainer

tokenizer = make_tokenizer()
model = tiny_ladir_model(tokenizer, seed=0, **TINY_LADIR_SIZES)
args = LaDiRSFTConfig(
    output_dir="{output_dir}", stage="vae", use_cpu=True, report_to="none", save_strategy="no", bf16=False,
    disable_tqdm=True, per_device_train_batch_size=8, max_steps=6, logging_steps=2,
)
dataset = datasets.Dataset.from_dict(chain_rows())
trainer = LaDiRSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()
factor = model.config.latent_scaling_factor
gathered = trainer.accelerator.gather(torch.tensor([factor]))
assert trainer.accelerator.num_processes == 2
assert torch.allclose(gathered, gathered[0]), gathered  # the weights stayed in sync, so every process measured the same
reasoner = LaDiRSFTTrainer(model=model, args=dataclasses.replace(args, stage="reasoner"), train_dataset=dataset, processing_class=tokenizer)
reasoner.train()
if trainer.is_world_process_zero():
    print("TWO_PROCESS_OK", trainer.state.global_step, reasoner.state.global_step, factor)
"""


@pytest.mark.slow
def test_two_process_run(tmp_path):
    script = tmp_path / "two_process_sft.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_SCRIPT.format(output_dir=tmp_path / "out")))
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo_root / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script)]
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TWO_PROCESS_OK 6 6" in result.stdout, result.stdout[-2000:]



@pytest.mark.statistical
def test_rollout_answer_loss_reaches_the_denoiser_through_its_own_latents(statistical_seed, margin):
    """LaDiR's stage 2 (``rollout_denoise_steps > 0``): the answer is read from latents the model denoised itself, so
    the answer loss alone gives the velocity head a gradient (with teacher-forced latents it gives none), and a small
    step along that gradient lowers the answer loss on the same noise."""
    tokenizer = make_tokenizer()
    model = tiny_ladir_model(tokenizer, seed=statistical_seed, latent_tokens_per_block=3, latent_dim=8, encoder_lora_rank=4,
                             reasoner_lora_rank=4, max_blocks=2, num_denoise_steps=4)
    torch.nn.init.normal_(model.velocity_head.linear.weight, std=0.1)  # zero-initialised: give it some velocity
    model.train_only(model.reasoner_parameters())
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["what is 3 plus 4 ?", "2 + 2 =", "the cat sat on", "a b c"])
    answers = torch.tensor([[tokenizer.convert_tokens_to_ids(word), tokenizer.eos_token_id]
                            for word in ["cat", "dog", "mat", "a"]])
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, latents=torch.randn(4, 2, 3, 8),
                  block_mask=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.bool), answer_ids=answers,
                  answer_mask=torch.ones_like(answers), prompt_dropout=0.0, flow_weight=0.0, stop_weight=0.0)
    head = model.velocity_head.linear.weight

    def answer_loss_and_head_gradient(rollout_denoise_steps):
        torch.manual_seed(statistical_seed)  # the rollouts start from noise: the same noise on every call
        model.zero_grad(set_to_none=True)
        # flow_weight = stop_weight = 0: the total is the answer loss alone
        loss = model(task="reasoner", rollout_denoise_steps=rollout_denoise_steps, **inputs)["loss"]
        loss.backward()
        return loss.item(), head.grad

    _, teacher_forced_gradient = answer_loss_and_head_gradient(0)
    assert teacher_forced_gradient is None or not teacher_forced_gradient.any()
    before, gradient = answer_loss_and_head_gradient(3)
    assert gradient is not None and gradient.abs().sum() > 0
    with torch.no_grad():
        head -= 1e-2 * gradient / gradient.norm()
    after, _ = answer_loss_and_head_gradient(3)
    # the step's first-order decrease is 1e-2 |gradient|; the margin is read in that unit
    # smallest margin over seeds 0-4 x 1-2 threads (AMD EPYC): 1.0e-4, 1.0 x the first-order decrease
    margin.check("answer loss decrease", before - after, 0, ">", scale=1e-2 * gradient.norm(), context=(before, after))


def test_rollout_stage_runs_and_logs_its_losses(pipeline, tmp_path):
    """The plumbing of stage "rollout"; that its answer loss trains the denoiser is tested in test_ladirl_trainer.py."""
    model, tokenizer = pipeline["model"], pipeline["tokenizer"]
    rows = {name: values[:16] for name, values in pipeline["rows"].items()}
    vae_before = snapshot(model.vae_parameters())
    trainer = LaDiRSFTTrainer(
        model=model,
        args=sft_config(tmp_path, "rollout", max_steps=2, rollout_denoise_steps=2, learning_rate=1e-4, logging_steps=1),
        train_dataset=datasets.Dataset.from_dict(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "answer_loss" in entry]
    assert logged and all(entry["flow_loss"] > 0 and entry["answer_loss"] > 0 for entry in logged)
    assert unchanged(vae_before, model.vae_parameters())
