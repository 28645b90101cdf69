"""benchmarks/reproduce.py end to end on a tiny model (seconds), and its presets."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MODELS = ["base", "text SFT", "GRPO", "LaDiR", "LaDi-RL (denoiser_adapter)"]


def run_benchmark(script, *argv, cwd):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def import_benchmark(name: str):
    """A module of benchmarks/ (they import each other by file name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_reproduce(*argv, cwd):
    return run_benchmark("reproduce.py", *argv, cwd=cwd)


@pytest.fixture(scope="module")
def reproduce_output(tmp_path_factory):
    """One tiny run of benchmarks/reproduce.py (about 20 s), shared by the tests below."""
    folder = tmp_path_factory.mktemp("reproduce")
    result = run_reproduce("--preset", "tiny", "--output_dir", str(folder / "out"), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"


def test_reproduce_writes_every_model_and_k(reproduce_output):
    report = json.loads((reproduce_output / "reproduce.json").read_text())
    assert list(report["models"]) == MODELS
    for name, model in report["models"].items():
        assert sorted(int(k) for k in model["pass_at_k"]) == [1, 2, 3, 4], name
        assert all(0.0 <= value <= 1.0 for value in model["pass_at_k"].values()), name
        assert model["num_problems"] == 4 and model["num_samples"] == 4
    # the matched rollout budget: 1 step x 2 prompts x (2 latents x 2 decodes, or 4 completions)
    assert report["rl_budget"] == {"prompts_per_step": 2, "steps": 1, "answers_per_prompt": 4, "scored_answers": 8}
    assert set(report["training"]["GRPO"]) >= {"reward", "entropy"}
    assert set(report["training"]["LaDi-RL (denoiser_adapter)"]) >= {"reward", "latent_diversity",
                                                                    "distinct_answers_per_prompt"}
    assert all(len(curve) == 1 for curve in report["training"]["GRPO"].values())  # one value per RL step
    assert report["models"]["LaDiR"]["latent_diversity_mean"] > 0
    png = (reproduce_output / "reproduce.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_presets_resolve_and_bad_sizes_are_refused(tmp_path, monkeypatch, capsys):
    result = run_reproduce("--preset", "gpu", "--print_config", cwd=tmp_path)  # the command line, once
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct" and config["num_test_examples"] >= 256
    assert config["num_samples"] == 16
    # arm B starts from the main job's LaDiR recipe, which has no velocity head to train
    assert config["velocity_parameterization"] == "token_posterior" and config["token_aligned_latents"]
    assert config["latent_policy_parameters"] == ["denoiser_adapter"]

    # the rest in this process: each launch of the script spends most of its time importing torch and TRL
    reproduce = import_benchmark("reproduce")
    monkeypatch.chdir(tmp_path)
    reproduce.main(["--preset", "cpu", "--rl_steps", "3", "--no-token_aligned_latents", "--print_config"])
    config = json.loads(capsys.readouterr().out)
    assert config["rl_steps"] == 3 and not config["token_aligned_latents"]  # a flag overrides its preset
    for argv, message in [
        (["--num_samples", "3", "--eval_decodes_per_latent", "2"], "must be a multiple of --eval_decodes_per_latent"),
        (["--latent_kl_beta", "-0.1"], "--latent_kl_beta must be >= 0"),
        (["--prompts_per_step", "3", "--gradient_accumulation_steps", "2"],
         "must be a multiple of --gradient_accumulation_steps"),
    ]:
        with pytest.raises(SystemExit) as refused:
            reproduce.main(["--preset", "tiny", *argv])
        assert refused.value.code != 0 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "outputs").exists()  # refused before anything was written


def test_bench_vs_grpo_natural_mode_runs_on_reproduce_outputs(reproduce_output, tmp_path):
    """The natural-length comparison: GRPO from reproduce.py's text-SFT model, LaDi-RL from its LaDiR model."""
    output = tmp_path / "natural.json"
    result = run_benchmark(
        "bench_vs_grpo.py", "--tiny", "--natural", str(reproduce_output / "text-sft"), str(reproduce_output / "ladir"),
        "--num_generations", "4", "--num_latents", "2", "--num_decodes_per_latent", "2",
        "--grpo_max_completion_length", "8", "--max_completion_length", "4", "--warmup", "0", "--steps", "1",
        "--latent_policy_parameters", "denoiser_adapter", "--output", str(output), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(output.read_text())
    assert record["settings"]["max_completion_length"] == 4 and record["settings"]["grpo_max_completion_length"] == 8
    assert record["settings"]["ladirl"]["weights"].startswith("trained LaDiR model")
    assert record["settings"]["trainable_parameters"]["ladirl"] > 0
    for side in ("grpo", "ladirl"):
        assert record["summary"][side]["wall_seconds"]["mean"] > 0
    assert record["ratio_ladirl_over_grpo"]["answers_per_second"] > 0


def test_profile_rollout_smoke(tmp_path):
    """benchmarks/profile_rollout.py on the tiny model: every section is written, with the counts the settings give."""
    output = tmp_path / "profile.json"
    result = run_benchmark("profile_rollout.py", "--tiny", "--rows", "4", "--prompt_tokens", "8", "--blocks", "3",
                           "--denoise_steps", "2", "--answer_tokens", "3", "--calls", "2", "--output", str(output),
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(output.read_text())
    assert len(record["calls"]) == 2 and all(call["blocks"] == 3 for call in record["calls"])
    phases = record["profile"]["phases"]
    assert phases["denoising_velocity"]["calls"] == 3 * 2 and phases["append_block"]["calls"] == 3
    assert phases["answer_step"]["calls"] == 3 and record["profile"]["top_operators"]
    assert record["profile"]["timestep_embedding_calls"] == 3 * 2 + 3  # once per denoising step, once per block
    assert record["decode_vs_generate"]["answer_tokens"] == 3 and record["decode_vs_generate"]["ladir_decode_s_per_token"] > 0
    early = record["early_stops"]
    # 4 rows x 3 blocks, or 2 rows stopping after the first: 4 + 2 + 2 blocks, and fewer LM positions fed
    assert early["every_row_every_block"]["blocks_written"] == 12
    assert early["half_stop_after_one_block"]["blocks_written"] == 8
    assert early["half_stop_after_one_block"]["lm_positions"] < early["every_row_every_block"]["lm_positions"]


def test_bench_eval_smoke(tmp_path):
    """benchmarks/bench_eval.py on tiny models: both models answer every problem, the LaDiR sampler's parts are timed
    with the calls its settings give, and a second run from the same seed gives the same answers (digest)."""
    output = tmp_path / "eval.json"
    argv = ["--tiny", "--num_problems", "3", "--num_samples", "2", "--num_denoise_steps", "2", "--max_new_tokens", "4",
            "--answer_tokens", "3", "--output", str(output)]
    result = run_benchmark("bench_eval.py", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(output.read_text())
    for model in record["models"].values():
        assert model["num_answers"] == 3 * 2 and len(model["batch_s"]) == 1  # 3 problems fit one batch of 8
        assert sorted(int(k) for k in model["pass_at_k"]) == [1, 2]
    parts = record["models"]["LaDiR"]["parts"]
    assert parts["prefill"]["calls"] == 1  # one call for the batch, its prompts' 2 rows each read once inside
    blocks = parts["append_block"]["calls"]
    assert 1 <= blocks <= 2  # max_blocks of the tiny model
    # 4 slots a block: one prior each, then 2 posterior steps each
    assert parts["next_slot_prior"]["calls"] == 4 * blocks and parts["posterior_velocity"]["calls"] == 2 * 4 * blocks
    assert record["ratio_ladir_over_text_wall"] > 0
    again = run_benchmark("bench_eval.py", *argv[:-1], str(tmp_path / "again.json"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    repeated = json.loads((tmp_path / "again.json").read_text())
    for name, model in record["models"].items():
        assert repeated["models"][name]["answers_sha256"] == model["answers_sha256"], name


@pytest.mark.parametrize("switches", [[], ["--posterior_chunk_mb", "0", "--keep_freed_memory", "off"]],
                         ids=["package_defaults", "one_pass_glibc_defaults"])
def test_bench_loss_memory_smoke(tmp_path, switches):
    """benchmarks/bench_loss_memory.py on the tiny model: each advantage setting timed in each repeat, the switches
    recorded as they were applied."""
    output = tmp_path / "loss_memory.json"
    result = run_benchmark("bench_loss_memory.py", "--tiny", "--latents", "4", "--decodes", "1", "--repeats", "2",
                           "--output", str(output), *switches, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(output.read_text())
    assert [(row["repeat"], row["advantages"]) for row in record["timings"]] == [
        (repeat, setting) for repeat in range(2) for setting in ("every_trace", "half_the_traces", "no_trace")
    ]
    assert [row["traces_with_advantage"] for row in record["timings"][:3]] == [8, 4, 0]
    assert all(row["forward_s"] > 0 and row["backward_s"] > 0 for row in record["timings"])
    settings = record["settings"]
    assert settings["glibc_thresholds_raised"] == (not switches and platform.libc_ver()[0] == "glibc")
    assert settings["posterior_chunk_bytes"] == (2**62 if switches else 16 * 2**20)


def test_gpu_step_dry_run(tmp_path):
    """benchmarks/gpu_step.py, the prepared GPU check, on CPU with a tiny model: every section runs and its checks
    hold (the numbers on a GPU are the script's to report; here they show the code paths work)."""
    output = tmp_path / "gpu_step.json"
    result = run_benchmark("gpu_step.py", "--dry_run", "--output", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(output.read_text())
    assert record["dry_run"] and list(record["models"]) == ["tiny-llama"]
    model = record["models"]["tiny-llama"]
    assert set(model) == {"bf16", "attention", "compile", "vs_grpo", "static_step", "static_sampler"}
    # all weights in bf16: the sampler's log-probs and the loss's agree to well inside the clip range (0.2)
    assert model["bf16"]["steps_compared"] == 3 * 2 * 3  # rows x blocks x denoising steps
    assert model["bf16"]["log_prob_gap_max"] < 0.1 and model["bf16"]["log_prob_scale"] > 1
    # SDPA and eager attention read the block masks alike (float32)
    assert model["attention"]["eager_implementation_used"] == "eager"
    assert model["attention"]["sdpa_implementation_used"] == "sdpa"
    assert model["attention"]["max_log_prob_difference"] < 1e-3
    # the compiled decoder (backend "eager" on CPU: the graph capture without code generation) samples the same latents
    assert model["compile"]["backend"] == "eager" and model["compile"]["max_latent_difference"] < 1e-5
    # the denoising step against a static cache (eager and compiled) computes the sampler's hidden states; no CUDA
    # graphs on CPU
    static_step = model["static_step"]
    assert static_step["rows"] == 3 and static_step["fed_positions"] > 2 and static_step["hidden_scale"] > 0.1
    assert static_step["static_max_hidden_difference"] < 1e-5
    assert static_step["static_compiled_max_hidden_difference"] < 1e-5
    assert "static_cuda_graphs_step_seconds" not in static_step
    # the whole sampler with a static cache, eager and compiled, samples the default way's latents; a compiled pass
    # after the first compiles nothing more (one shape per kind of step)
    static_sampler = model["static_sampler"]
    assert static_sampler["static_max_latent_difference"] < 1e-5
    assert static_sampler["static_compiled_max_latent_difference"] < 1e-5
    assert static_sampler["static_compiled_graphs"] == 5  # prompt, first slot, slot, finished block, answer token
    assert static_sampler["static_compiled_graphs_compiled_again"] == 0
    vs_grpo = model["vs_grpo"]
    assert vs_grpo["summary"]["grpo"]["mean_answer_tokens"]["mean"] <= 8
    assert vs_grpo["summary"]["ladirl"]["latent_blocks/mean"]["mean"] == 2
    assert vs_grpo["summary"]["ladirl"]["sampler_log_prob_gap"]["max"] < 1e-3  # float32
    assert vs_grpo["ratio_ladirl_over_grpo"]["answers_per_second"] > 0


def test_reproduce_reuses_starts_and_refuses_other_settings(reproduce_output, tmp_path, monkeypatch):
    """`--start_dir`: RL again from an earlier run's supervised starts, which evaluate exactly as they did there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="was trained with other settings") as refused:  # in this process: no launch
        import_benchmark("reproduce").main(["--preset", "tiny", "--start_dir", str(reproduce_output),
                                            "--num_train_examples", "32", "--output_dir", str(tmp_path / "refused")])
    assert "--num_train_examples: 16 there, 32 here" in str(refused.value)
    assert not (tmp_path / "refused").exists()  # refused before anything was written

    result = run_reproduce("--preset", "tiny", "--start_dir", str(reproduce_output), "--ladirl_learning_rate", "1e-2",
                           "--reevaluate_starts", "--output_dir", str(tmp_path / "again"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    earlier = json.loads((reproduce_output / "reproduce.json").read_text())
    again = json.loads((tmp_path / "again" / "reproduce.json").read_text())
    assert list(again["models"]) == MODELS
    assert "train text SFT" not in again["timings"] and "train LaDiR" not in again["timings"]  # not trained again
    assert again["start_dir"]["timings"]["train LaDiR"] == earlier["timings"]["train LaDiR"]
    assert again["start_dir"]["ladir_stage_steps"] == earlier["ladir_stage_steps"]
    assert again["start_dir"]["evaluations_reused"] is False
    assert {"eval base", "eval text SFT", "eval LaDiR"} <= set(again["timings"])  # sampled again...
    for name in ("base", "text SFT", "LaDiR"):  # ...and the same models, problems and seed gave the same samples
        for key in ("pass_at_k", "distinct_answers_mean"):
            assert again["models"][name][key] == earlier["models"][name][key], (name, key)
    assert not (tmp_path / "again" / "text-sft").exists() and not (tmp_path / "again" / "ladir").exists()

    # so by default the starts' evaluations are taken from the earlier run, and only the RL models are sampled; with
    # a latent KL the LaDi-RL model is named after it and its KL to the start logged (0 before the first step); both
    # arms here score their 2 prompts a step in 2 micro-batches
    result = run_reproduce("--preset", "tiny", "--start_dir", str(reproduce_output), "--ladirl_learning_rate", "1e-2",
                           "--latent_kl_beta", "0.1", "--gradient_accumulation_steps", "2",
                           "--output_dir", str(tmp_path / "reused"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reused = json.loads((tmp_path / "reused" / "reproduce.json").read_text())
    assert reused["settings"]["gradient_accumulation_steps"] == 2
    assert all(len(curve["reward"]) == reused["rl_budget"]["steps"] for curve in reused["training"].values())
    kl_model = "LaDi-RL (denoiser_adapter, latent_kl_beta 0.1)"
    assert list(reused["models"]) == [*MODELS[:-1], kl_model] and reused["start_dir"]["evaluations_reused"] is True
    assert not {"eval base", "eval text SFT", "eval LaDiR"} & set(reused["timings"])
    assert {"eval GRPO", f"eval {kl_model}"} <= set(reused["timings"])
    assert reused["training"][kl_model]["latent_kl"][0] == pytest.approx(0.0, abs=1e-6)
    for name in ("base", "text SFT", "LaDiR"):
        assert reused["models"][name] == earlier["models"][name], name

    # evaluated with other settings, the earlier results do not apply: sampled again
    result = run_reproduce("--preset", "tiny", "--start_dir", str(reproduce_output), "--num_test_examples", "3",
                           "--output_dir", str(tmp_path / "fewer"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    fewer = json.loads((tmp_path / "fewer" / "reproduce.json").read_text())
    assert fewer["start_dir"]["evaluations_reused"] is False and fewer["models"]["base"]["num_problems"] == 3


def test_tune_rl_learning_rates_validates_on_unseen_training_problems(reproduce_output, tmp_path):
    output = tmp_path / "tune"
    result = run_benchmark("tune_rl_learning_rates.py", "--start_dir", str(reproduce_output),
                           "--grpo_learning_rates", "1e-5", "--ladirl_learning_rates", "1e-3", "1e-2",
                           "--num_validation_examples", "3", "--num_samples", "2", "--output_dir", str(output),
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output / "tune_rl_learning_rates.json").read_text())
    assert list(report["models"]) == ["text SFT", "LaDiR", "GRPO lr 1e-05", "LaDi-RL (denoiser_adapter) lr 0.001",
                                      "LaDi-RL (denoiser_adapter) lr 0.01"]
    for name, model in report["models"].items():
        assert model["num_problems"] == 3 and model["num_samples"] == 2, name
    assert report["picked"]["grpo_learning_rate"] == 1e-5
    ladirl = {rate: report["models"][f"LaDi-RL (denoiser_adapter) lr {rate:g}"] for rate in (1e-3, 1e-2)}
    best = max(ladirl, key=lambda rate: (ladirl[rate]["pass_at_k"]["1"], ladirl[rate]["pass_at_k"]["2"]))
    assert report["picked"]["ladirl_learning_rate (denoiser_adapter)"] == best
    assert all(len(curve) == 1 for curve in report["training"]["GRPO lr 1e-05"].values())  # the run's 1 RL step
    assert str(tmp_path) not in (output / "tune_rl_learning_rates.json").read_text()  # no machine paths


def test_validation_split_is_outside_the_training_rows():
    import argparse

    validation_split = import_benchmark("tune_rl_learning_rates").validation_split
    from trl_ladi.data import load_math_dataset

    settings = argparse.Namespace(seed=0, dataset_name="chain_sum", num_train_examples=64)
    train, validation = validation_split(settings, 16)
    assert len(train) == 64 and len(validation) == 16
    assert not set(validation["prompt"]) & set(train["prompt"])
    test = load_math_dataset("chain_sum", "test", 200, seed=0, conversational=False, instruction=None)
    assert not set(validation["prompt"]) & set(test["prompt"])


@pytest.mark.statistical
def test_signal_fraction_recovers_the_share_of_the_expected_gradient(statistical_seed, margin):
    """Batch gradients g_i = mu + noise_i with |mu|^2 = 1 and tr(Sigma) = 3: a quarter of E|g|^2 is signal, and 3
    batches averaged give signal and noise equal weight. Pure noise gives 0."""
    import torch

    signal_fraction = import_benchmark("gradient_snr").signal_fraction
    generator = torch.Generator().manual_seed(statistical_seed)
    dimension, num_batches = 20_000, 40
    mean = torch.randn(dimension, generator=generator)
    mean = mean / mean.norm()
    noise_std = (3.0 / dimension) ** 0.5
    noises = [noise_std * torch.randn(dimension, generator=generator) for _ in range(num_batches)]
    # stored as the recorder stores them (bfloat16), with two batches that had no gradient
    gradients = [(mean + noise).to(torch.bfloat16) for noise in noises] + [None, None]
    result = signal_fraction(gradients)
    assert result["num_batches"] == num_batches + 2 and result["num_batches_with_gradient"] == num_batches
    assert result["num_parameters"] == dimension
    # measured over seeds 0-4 x 1-2 threads (AMD EPYC): |estimate - 0.25| at most 0.0027, jackknife error 0.0008-0.0009,
    # (1 - f) / f within 0.042 of 3, pure noise's estimate within 0.0004 of 0; the bounds are 4-10x those
    margin.check("|signal fraction - 0.25|", abs(result["signal_fraction"] - 0.25), 0.01, "<",
                 scale=result["signal_fraction_standard_error"])
    margin.check("jackknife standard error", result["signal_fraction_standard_error"], 0.004, "<")
    margin.check("batches for equal signal and noise, minus 3", abs(result["batches_for_equal_signal_and_noise"] - 3),
                 0.3, "<")
    noise_only = signal_fraction([noise.to(torch.bfloat16) for noise in noises])
    margin.check("|signal fraction of pure noise|", abs(noise_only["signal_fraction"]), 0.004, "<",
                 scale=noise_only["signal_fraction_standard_error"])
    assert noise_only["mean_pairwise_cosine"] == pytest.approx(noise_only["signal_fraction"], abs=0.01)
    assert signal_fraction([None, None, gradients[0]])["signal_fraction"] is None  # too few batches with a gradient


def test_gradient_snr_records_one_gradient_per_batch_of_each_arm(reproduce_output, tmp_path):
    output = tmp_path / "snr"
    for extra, prompts_from in (([], "the training problems"), (["--num_problems", "2"], "2 fixed problems")):
        result = run_benchmark("gradient_snr.py", "--start_dir", str(reproduce_output), "--num_batches", "3",
                               "--output_dir", str(output), *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((output / "gradient_snr.json").read_text())
        assert list(report["arms"]) == ["GRPO (text SFT start, all weights)", "LaDi-RL (LaDiR start, denoiser_adapter)"]
        for name, arm in report["arms"].items():
            assert arm["num_batches"] == 3 and 0 <= arm["num_batches_with_gradient"] <= 3, name
        assert report["rl_budget"] == {"prompts_per_step": 2, "answers_per_prompt": 4}
        assert report["prompts_from"] == prompts_from
        assert str(tmp_path) not in (output / "gradient_snr.json").read_text()  # no machine paths


def test_rl_on_seen_problems_trains_and_evaluates_on_the_same_unseen_problems(reproduce_output, tmp_path):
    output = tmp_path / "seen"
    result = run_benchmark("rl_on_seen_problems.py", "--start_dir", str(reproduce_output), "--grpo_learning_rates",
                           "1e-5", "--ladirl_learning_rates", "1e-3", "--latent_kl_betas", "0", "0.1",
                           "--num_problems", "2", "--steps", "2", "--num_samples", "2", "--output_dir", str(output),
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output / "rl_on_seen_problems.json").read_text())
    with_kl = "LaDi-RL (denoiser_adapter) lr 0.001 latent_kl_beta 0.1"
    assert list(report["models"]) == ["text SFT", "GRPO lr 1e-05", "LaDiR", "LaDi-RL (denoiser_adapter) lr 0.001",
                                      with_kl]
    for name, model in report["models"].items():
        assert model["num_problems"] == 2 and model["num_samples"] == 2, name
    # 2 steps x 2 prompts over 2 problems: each problem twice
    assert report["problems"]["times_each_is_trained_on"] == 2
    assert all(len(curve) == 2 for curve in report["training"]["LaDi-RL (denoiser_adapter) lr 0.001"].values())
    # the KL run logs its KL to the start's denoiser at every step: 0 at the first (the policy is the reference)
    kl = report["training"][with_kl]["latent_kl"]
    assert len(kl) == 2 and kl[0] == pytest.approx(0, abs=1e-6)
    assert str(tmp_path) not in (output / "rl_on_seen_problems.json").read_text()  # no machine paths


def save_tiny_token_posterior_model(folder):
    """A tiny token-posterior LaDiR model and its tokenizer, saved to `folder` (for the scripts that load one)."""
    from trl_ladi.testing import make_tokenizer, tiny_ladir_model

    tokenizer = make_tokenizer()
    tiny_ladir_model(tokenizer, latent_tokens_per_block=4, token_aligned_latents=True,
                     velocity_parameterization="token_posterior").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_prompts_with_gradient_counts_each_problems_outcomes(tmp_path):
    model_dir = save_tiny_token_posterior_model(tmp_path / "ladir")
    result = run_benchmark("prompts_with_gradient.py", "--ladir_model_path", str(model_dir), "--num_problems", "3",
                           "--num_latents", "8", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "out"),
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "prompts_with_gradient.json").read_text())
    assert [len(problem["rewards"]) for problem in report["problems"]] == [8, 8, 8]
    assert list(report["shares_by_latents_per_prompt"]) == ["4", "8"]
    for n, share in report["shares_by_latents_per_prompt"].items():
        # the three outcomes partition the problems, and each share is counted from the recorded rewards
        assert sum(share.values()) == pytest.approx(1.0)
        right = [sum(reward >= 1.0 for reward in problem["rewards"][: int(n)]) for problem in report["problems"]]
        assert share["all_wrong"] == pytest.approx(sum(c == 0 for c in right) / 3)
    assert str(tmp_path) not in json.dumps(report["settings"])  # no machine paths

    outcome_shares = import_benchmark("prompts_with_gradient").outcome_shares
    assert outcome_shares([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], 4) == {
        "mixed": 0.5, "all_wrong": 0.25, "all_right": 0.25}
    assert outcome_shares([[1, 0, 0, 0]], 1) == {"mixed": 0.0, "all_wrong": 0.0, "all_right": 1.0}


def test_ladir_quality_pairs_the_two_recipes_problem_by_problem():
    ladir_quality = import_benchmark("ladir_quality")
    result = ladir_quality.without_per_problem(
        {"pass@1": 0.5, "per_problem": [{"index": 0, "n": 8, "c": 8}, {"index": 1, "n": 8, "c": 0}]}
    )
    assert result == {"pass@1": 0.5, "correct_per_problem": [8, 0]}
    reference = {"correct_per_problem": [0, 0]}
    paired = ladir_quality.paired_difference(result, reference, ks=[1, 8], num_samples=8)
    # per problem +100 and 0 points: mean 50, standard deviation 70.7, standard error 70.7 / sqrt(2) = 50
    assert paired["pass@1"]["mean"] == pytest.approx(50.0)
    assert paired["pass@1"]["standard_error"] == pytest.approx(50.0)
    # 4 of 8 right against 1 of 8: pass@1 50 vs 12.5 (+37.5); pass@8 100 vs 100 (0)
    paired = ladir_quality.paired_difference({"correct_per_problem": [4, 4]}, {"correct_per_problem": [1, 1]},
                                             ks=[1, 8], num_samples=8)
    assert paired["pass@1"] == {"mean": pytest.approx(37.5), "standard_error": pytest.approx(0.0)}
    assert paired["pass@8"] == {"mean": pytest.approx(0.0), "standard_error": pytest.approx(0.0)}
    with pytest.raises(ValueError):  # not the same problems
        ladir_quality.paired_difference(result, {"correct_per_problem": [0]}, ks=[1], num_samples=8)


def test_ladir_quality_trains_each_recipe_from_its_training_seed(tmp_path):
    """A recipe trains the same way with or without the other before it, and another --training_seed trains it again
    (other initial weights) on the same problems, sampled with the same stream."""
    from trl_ladi.testing import make_tokenizer, tiny_causal_lm

    tokenizer = make_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    # 3 steps per stage (the first at the warm-up's rate 0), at rates that do not depend on how long a step took
    common = ["--model_name_or_path", str(tmp_path / "base"), "--seed", "5", "--num_train_examples", "8",
              "--num_test_examples", "3", "--num_samples", "4", "--budget_seconds", "1e6", "--batch_size", "4",
              "--max_steps_per_stage", "3", "--no-decay_learning_rate", "--latent_tokens_per_block", "2", "--latent_dim", "8", "--max_blocks", "2",
              "--max_new_tokens", "8", "--no-diagnostics"]

    def report(name, *argv):
        result = run_benchmark("ladir_quality.py", *common, *argv, "--output_dir", str(tmp_path / name), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / name / "ladir_quality.json").read_text())

    both = report("both", "--training_seed", "3")
    alone = report("alone", "--training_seed", "3", "--recipes", "ladir")
    other = report("other", "--training_seed", "4", "--recipes", "ladir")
    # a budget of steps per recipe and stage instead of seconds stops each after its steps
    by_steps = report("by_steps", "--training_seed", "3", "--ladir_step_budget", "1", "2",
                      "--text_sft_step_budget", "2", "--save_ladir_model")
    assert both["text_sft"]["num_problems"] == 3 and "ladir_minus_text_sft" in both
    assert "text_sft" not in alone and "ladir_minus_text_sft" not in alone and "vae" not in alone
    # the same LaDiR model and samples whether text SFT trained first or not; another seed, other latents
    assert alone["ladir"]["latent_diversity_mean"] == both["ladir"]["latent_diversity_mean"]
    assert other["ladir"]["latent_diversity_mean"] != alone["ladir"]["latent_diversity_mean"]
    assert alone["ladir_steps"] == {"vae": 3, "reasoner": 3} and by_steps["ladir_steps"] == {"vae": 1, "reasoner": 2}
    assert both["text_sft_steps"] == 3 and by_steps["text_sft_steps"] == 2
    # --save_ladir_model keeps the LaDiR model to sample again; without it only text SFT's folder holds a model
    from trl_ladi import LaDiRModel

    saved = LaDiRModel.from_pretrained(tmp_path / "by_steps" / "ladir")
    assert saved.config.latent_tokens_per_block == 2 and saved.config.max_blocks == 2  # the flags it trained with
    assert not (tmp_path / "alone" / "ladir").exists()


def test_recipe_replicates_pools_each_recipes_trainings(tmp_path):
    recipe_replicates = import_benchmark("recipe_replicates")
    settings = {"seed": 5, "num_test_examples": 2, "num_samples": 4, "budget_seconds": 300}

    def report(training_seed, **parts):
        return {"settings": {**settings, "training_seed": training_seed}, **parts}

    reports = [
        # 2 of 4 and 0 of 4 right: pass@1 25%, pass@4 50%
        ("both", report(5, text_sft={"correct_per_problem": [2, 0]}, ladir={"correct_per_problem": [4, 0]})),
        ("text", report(105, text_sft={"correct_per_problem": [4, 0]})),
        # a reused text SFT part is the first report's training, not this one's
        ("ladir", {**report(105, ladir={"correct_per_problem": [4, 4]}, text_sft={"correct_per_problem": [2, 0]}),
                   "settings": {**settings, "training_seed": 105, "text_sft_results": "both.json"}}),
    ]
    summary = recipe_replicates.summarize(reports)
    assert [t["training_seed"] for t in summary["text_sft"]["trainings"]] == [5, 105]
    assert [t["training_seed"] for t in summary["ladir"]["trainings"]] == [5, 105]
    # text SFT pass@1 25 and 50, LaDiR 50 and 100: means 37.5 and 75, standard deviations 17.7 and 35.4
    assert summary["text_sft"]["mean"]["pass@1"] == pytest.approx(37.5)
    assert summary["ladir"]["standard_deviation"]["pass@1"] == pytest.approx(50 / 2 ** 0.5)
    between = summary["ladir_minus_text_sft"]["between_trainings"]["pass@1"]
    assert between["mean"] == pytest.approx(37.5)
    assert between["standard_error"] == pytest.approx(((50 / 2 ** 0.5) ** 2 / 2 + (25 / 2 ** 0.5) ** 2 / 2) ** 0.5)
    # per problem, averaged over trainings: LaDiR 100 and 50, text SFT 75 and 0: differences 25 and 50
    over = summary["ladir_minus_text_sft"]["over_problems"]["pass@1"]
    assert over["mean"] == pytest.approx(37.5)
    assert over["standard_error"] == pytest.approx(12.5)
    # pass@4: text SFT 100/0 in both trainings; LaDiR 100/0 then 100/100
    assert summary["ladir_minus_text_sft"]["between_trainings"]["pass@4"]["mean"] == pytest.approx(25.0)

    # a report from before --training_seed trained LaDiR after text SFT, from the random state that left
    old_report = {"settings": settings, "text_sft": {"correct_per_problem": [0, 0]},
                  "ladir": {"correct_per_problem": [1, 1]}}
    once = recipe_replicates.summarize([("old", old_report)])
    assert [t["training_seed"] for t in once["ladir"]["trainings"]] == ["5, after text SFT"]
    # one training of each recipe: no spread between trainings to give a standard error
    assert once["ladir_minus_text_sft"]["between_trainings"]["pass@1"] == {"mean": 25.0, "standard_error": None}

    reports.append(("other", report(7, ladir={"correct_per_problem": [0, 0]}) | {
        "settings": {**settings, "training_seed": 7, "budget_seconds": 600}}))
    with pytest.raises(ValueError, match="budget_seconds"):
        recipe_replicates.summarize(reports)
    # ...unless the caller says the budget may differ (a slower CPU given more time for the same steps): then pooled,
    # each training with the steps its report recorded, and the output says what was not compared
    reports[-1][1]["ladir_steps"] = {"vae": 2, "reasoner": 75}
    reports[1][1]["text_sft_steps"] = 70
    scaled = recipe_replicates.summarize(reports, not_compared={"budget_seconds"})
    assert [t["training_seed"] for t in scaled["ladir"]["trainings"]] == [5, 105, 7]
    assert scaled["ladir"]["trainings"][-1]["steps"] == {"vae": 2, "reasoner": 75}
    assert [t.get("steps") for t in scaled["text_sft"]["trainings"]] == [None, 70]
    assert scaled["settings_not_compared"] == ["budget_seconds"]
    with pytest.raises(ValueError, match="no report has that setting"):
        recipe_replicates.summarize(reports, not_compared={"budget_secs"})
    reports.pop()

    # LaDiR trained with another stop readout: not pooled with reports from before the flag (a stop head)...
    new_stop = ("new_stop", {"settings": {**settings, "training_seed": 205, "stop_readout": "answer_token",
                                          "text_sft_results": "both.json"},
                             "ladir": {"correct_per_problem": [3, 1]}})
    with pytest.raises(ValueError, match="stop_readout='answer_token' where both has 'head'"):
        recipe_replicates.summarize([*reports[:2], new_stop])
    # ...unless the older side-by-side report gives its text SFT part only; a text-SFT-only report is compared on the
    # problems and text SFT's flags, not on LaDiR's
    pooled = recipe_replicates.summarize([*reports[:2], new_stop], text_sft_only={"both"})
    assert [t["training_seed"] for t in pooled["text_sft"]["trainings"]] == [5, 105]
    assert [t["training_seed"] for t in pooled["ladir"]["trainings"]] == [205]
    other_problems = ("text", report(105, text_sft={"correct_per_problem": [4, 0]}))
    other_problems[1]["settings"]["num_samples"] = 8
    with pytest.raises(ValueError, match="num_samples"):
        recipe_replicates.summarize([reports[0], other_problems, new_stop], text_sft_only={"both"})


def test_diversity_guidance_pairs_each_scale_with_the_first_and_with_text_sft(tmp_path):
    model_dir = save_tiny_token_posterior_model(tmp_path / "ladir")
    common = ["--model_path", str(model_dir), "--num_problems", "3", "--num_samples", "4", "--scales", "0", "8"]
    result = run_benchmark("diversity_guidance.py", *common, "--num_train_examples", "16", "--output",
                           str(tmp_path / "tuning.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first, guided = json.loads((tmp_path / "tuning.json").read_text())["results"]
    assert [first["diversity_guidance_scale"], guided["diversity_guidance_scale"]] == [0.0, 8.0]
    assert "minus_first_scale" not in first
    for k in (1, 4):  # the paired difference is the difference of the two pass@k, in points
        expected = 100 * (guided["pass_at_k"][str(k)] - first["pass_at_k"][str(k)])
        assert guided["minus_first_scale"][f"pass@{k}"]["mean"] == pytest.approx(expected)
    # 4 latents of a problem are one guidance group: the push spreads them apart
    assert guided["latent_diversity"] > first["latent_diversity"]

    # on the test split, against a ladir_quality report's text SFT on the same 3 problems (1, 0 and 4 of 4 right)
    report = tmp_path / "ladir_quality.json"
    report.write_text(json.dumps({"text_sft": {"correct_per_problem": [1, 0, 4]}}))
    result = run_benchmark("diversity_guidance.py", *common, "--split", "test", "--reference", str(report),
                           "--output", str(tmp_path / "test.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in json.loads((tmp_path / "test.json").read_text())["results"]:
        text_sft_pass_at_1 = (1 / 4 + 0 + 1) / 3
        expected = 100 * (row["pass_at_k"]["1"] - text_sft_pass_at_1)
        assert row["minus_text_sft"]["pass@1"]["mean"] == pytest.approx(expected)
    # a reference on other problems is refused
    report.write_text(json.dumps({"text_sft": {"correct_per_problem": [1, 0]}}))
    result = run_benchmark("diversity_guidance.py", *common, "--split", "test", "--reference", str(report),
                           cwd=tmp_path)
    assert result.returncode != 0 and "--num_problems" in result.stderr
