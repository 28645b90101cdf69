"""`examples/math.py` end to end: on a tiny Llama (fast), from a saved LaDiR model, and on the real default (slow)."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

from trl_ladi.testing import make_tokenizer, tiny_causal_lm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY_SIZES = [
    "--num_train_examples", "16", "--num_test_examples", "4", "--latent_dim", "8", "--latent_tokens_per_block", "2",
    "--lora_rank", "4", "--max_blocks", "3", "--vae_steps", "2", "--reasoner_steps", "2", "--sft_batch_size", "4",
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
    "--num_decodes_per_latent", "2", "--max_completion_length", "4", "--num_denoise_steps", "2",
    "--eval_num_samples", "4", "--eval_ks", "1", "2", "4",
]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name, argv):
    module = load_example(name)
    script_args, training_args = module.make_parser().parse_args_and_config(args=argv)
    return module.main(script_args, training_args)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    tokenizer = make_tokenizer()
    path = tmp_path_factory.mktemp("tiny-base")
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def check_pass_at_k_file(output_dir, names, ks=(1, 2, 4)):
    record = json.loads((Path(output_dir) / "pass_at_k.json").read_text())
    assert list(record["results"]) == names
    for result in record["results"].values():
        assert sorted(int(k) for k in result["pass_at_k"]) == list(ks)
        assert all(0.0 <= value <= 1.0 for value in result["pass_at_k"].values())
    assert (Path(output_dir) / "pass_at_k.png").stat().st_size > 0
    return record


@pytest.fixture(scope="module")
def tiny_run(tiny_base, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("math-run")
    return output_dir, tiny_base


def test_math_example_runs_every_stage_on_a_tiny_model(tiny_run, capsys):
    output_dir, base = tiny_run
    results = run_example("math", ["--model_name_or_path", base, "--output_dir", str(output_dir), *TINY_SIZES])

    printed = capsys.readouterr().out
    assert f"LaDiR model (before RL): {output_dir / 'ladir'}" in printed
    assert f"LaDi-RL model: {output_dir}" in printed
    assert "pass@1" in printed and "LaDi-RL (after RL)" in printed
    record = check_pass_at_k_file(output_dir, ["LaDiR (before RL)", "LaDi-RL (after RL)"])
    assert record["results"] == json.loads(json.dumps(results))
    # the share of test problems an RL group of 4 latents would get a gradient from, counted from the samples
    mixed = [
        sum(0 < problem["c"] < 4 for problem in result["per_problem"]) / len(result["per_problem"])
        for result in record["results"].values()
    ]
    assert [result["frac_problems_mixed"] for result in record["results"].values()] == pytest.approx(mixed)
    assert (
        f"some but not all of their 4 samples right: LaDiR (before RL) {100 * mixed[0]:.0f}%, "
        f"LaDi-RL (after RL) {100 * mixed[1]:.0f}%"
    ) in printed
    assert set(record["timings"]) == {"ladir_stages_s", "eval_before_s", "ladirl_s", "eval_after_s", "total_s"}
    for model_dir in (output_dir / "ladir", output_dir):
        assert json.loads((model_dir / "config.json").read_text())["model_type"] == "ladir"
        assert (model_dir / "tokenizer_config.json").is_file()


def test_math_example_starts_rl_from_a_saved_ladir_model(tiny_run, tmp_path, capsys):
    ladir_dir = tiny_run[0] / "ladir"
    if not ladir_dir.is_dir():
        pytest.skip("needs the LaDiR model of test_math_example_runs_every_stage_on_a_tiny_model")
    run_example("math", ["--ladir_model_path", str(ladir_dir), "--output_dir", str(tmp_path), *TINY_SIZES])

    printed = capsys.readouterr().out
    assert "LaDiR vae stage" not in printed and not (tmp_path / "ladir").exists()  # the stages were skipped
    assert f"LaDiR model (before RL): {ladir_dir}" in printed
    record = check_pass_at_k_file(tmp_path, ["LaDiR (before RL)", "LaDi-RL (after RL)"])
    assert "ladir_stages_s" not in record["timings"]


def test_math_example_pushes_model_tokenizer_and_card(tiny_run, tmp_path, monkeypatch):
    ladir_dir = tiny_run[0] / "ladir"
    if not ladir_dir.is_dir():
        pytest.skip("needs the LaDiR model of test_math_example_runs_every_stage_on_a_tiny_model")
    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, *, repo_id, folder_path, **kwargs: shutil.copytree(folder_path, uploaded)
    )
    output_dir = tmp_path / "run"
    run_example("math", [
        "--ladir_model_path", str(ladir_dir), "--output_dir", str(output_dir), "--push_to_hub",
        "--hub_model_id", "someone/tiny-ladirl", *TINY_SIZES,
    ])

    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(uploaded))
    readme = (uploaded / "README.md").read_text()
    pass_at_1 = json.loads((output_dir / "pass_at_k.json").read_text())["results"]["LaDi-RL (after RL)"]["pass_at_k"]["1"]
    assert "| metric | LaDiR (before RL) | LaDi-RL (after RL) |" in readme
    assert "| pass@1 |" in readme and f"{pass_at_1:.4g} |" in readme
    assert "| max_steps | 2 |" in readme and 'LaDiRModel.from_pretrained("someone/tiny-ladirl")' in readme


def test_math_example_sizes_token_aligned_blocks_to_the_longest_training_sentence(tiny_base, tmp_path, capsys):
    long_sentence = " + ".join(["1"] * 10) + " = 10"  # 21 tokens of the tiny word-level tokenizer
    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join(
        json.dumps({"prompt": f"{i} + 1", "solution": f"{long_sentence}\n{i} + 1 = {i + 1}\n#### {i + 1}"})
        for i in range(40)
    ))
    flag = TINY_SIZES.index("--latent_tokens_per_block")
    sizes = TINY_SIZES[:flag] + TINY_SIZES[flag + 2:]  # the example picks the block size
    run_example("math", ["--model_name_or_path", tiny_base, "--dataset_name", str(data), "--output_dir",
                         str(tmp_path / "run"), *sizes])

    assert "latent_tokens_per_block: 21 (the longest training sentence has 21 tokens)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "ladir" / "config.json").read_text())["latent_tokens_per_block"] == 21


@pytest.mark.parametrize("name", ["math", "code"])
def test_example_help_formats_and_lists_its_flags(name):
    # argparse %-formats each help string: a bare "%" in one made `--help` raise
    help_text = load_example(name).make_parser().format_help()
    for flag in ("--latent_tokens_per_block", "--stop_weight", "--num_decodes_per_latent", "--learning_rate"):
        assert flag in help_text


def test_math_example_names_missing_dataset_columns(tiny_base, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"{i} + 1", "answer": str(i + 1)}) for i in range(40)))
    with pytest.raises(ValueError, match=r"missing column\(s\) 'prompt'.*rename_column"):
        run_example("math", ["--model_name_or_path", tiny_base, "--dataset_name", str(data), *TINY_SIZES])


@pytest.mark.slow
def test_math_example_default_model_small_sizes(tmp_path):
    """The real default (SmolLM2-135M-Instruct, chain_sum) through every stage with small sizes (a few minutes)."""
    sizes = [
        "--num_train_examples", "32", "--num_test_examples", "4", "--vae_steps", "3", "--reasoner_steps", "3",
        "--max_steps", "1", "--eval_num_samples", "4", "--eval_ks", "1", "4",
    ]
    run_example("math", ["--output_dir", str(tmp_path), *sizes])
    check_pass_at_k_file(tmp_path, ["LaDiR (before RL)", "LaDi-RL (after RL)"], ks=(1, 4))


def test_math_example_trains_token_aligned_latents_with_a_decoder_adapter(tiny_base, tmp_path, capsys):
    run_example("math", [
        "--model_name_or_path", tiny_base, "--output_dir", str(tmp_path), *TINY_SIZES, "--latent_tokens_per_block", "8",
        "--token_aligned_latents", "True", "--vae_decoder_lora_rank", "4", "--token_substitution_prob", "0",
    ])

    config = json.loads((tmp_path / "ladir" / "config.json").read_text())
    assert config["token_aligned_latents"] is True and config["vae_decoder_lora_rank"] == 4
    assert config["latent_tokens_per_block"] == 8 and config["latent_scaling_factor"] != 1.0
    check_pass_at_k_file(tmp_path, ["LaDiR (before RL)", "LaDi-RL (after RL)"])


def test_math_example_screens_rl_problems_and_trains_only_on_mixed_ones(tiny_run, tmp_path, capsys):
    ladir_dir = tiny_run[0] / "ladir"
    if not ladir_dir.is_dir():
        pytest.skip("needs the LaDiR model of test_math_example_runs_every_stage_on_a_tiny_model")
    module = load_example("math")
    argv = ["--ladir_model_path", str(ladir_dir), "--output_dir", str(tmp_path), *TINY_SIZES,
            "--rl_screening_samples", "2", "--rl_screening_problems", "8", "--max_steps", "6"]
    script_args, training_args = module.make_parser().parse_args_and_config(args=argv)
    train, test = module.load_math_data(script_args, training_args.seed)
    rl_calls = []

    def odd_answers_are_mixed(prompts, completions, answer, **kwargs):
        """Answers alternate right / wrong on problems with an odd answer; all wrong on the others."""
        if len(prompts) == 8:  # an RL step: 1 prompt x 4 latents x 2 decodes (screening scores 2, evaluation 4)
            rl_calls.append(set(prompts))
        return [float(int(a) % 2 == 1 and i % 2 == 0) for i, a in enumerate(answer)]

    module.run(script_args, training_args, train, test, odd_answers_are_mixed)

    kept = [row["prompt"] for row in train.select(range(8)) if int(row["answer"]) % 2 == 1]
    assert 0 < len(kept) < 8  # the fixed seed's problems: the check below can tell kept from dropped
    assert f"RL problems: {len(kept)} of 8 screened training problems" in capsys.readouterr().out
    # 6 steps, every one on a kept problem (drawn from all 16 training problems, 6 steps would hit a dropped one)
    assert len(rl_calls) == 6 and all(prompts <= set(kept) for prompts in rl_calls)
    assert "rl_screening_s" in json.loads((tmp_path / "pass_at_k.json").read_text())["timings"]

    with pytest.raises(ValueError, match=r"Screening kept 0 of 8 training problems.*--rl_screening_problems"):
        module.run(script_args, training_args, train, test, lambda completions, **kwargs: [0.0] * len(completions))

    # one answer per problem cannot be mixed: refused before any stage runs (the evaluation would call the reward)
    def must_not_be_called(**kwargs):
        pytest.fail("answers were sampled and scored before the screening settings were refused")

    one_answer_args, one_answer_training_args = module.make_parser().parse_args_and_config(
        args=[*argv, "--rl_screening_samples", "1", "--output_dir", str(tmp_path / "one-answer")]
    )
    with pytest.raises(ValueError, match=r"--rl_screening_samples 1 .*at least 2 answers per problem"):
        module.run(one_answer_args, one_answer_training_args, train, test, must_not_be_called)


def test_math_example_same_seed_gives_the_same_ladir_model(tiny_base, tmp_path):
    """The new embeddings and LoRA weights are drawn before any trainer seeds torch; the example seeds them."""
    module = load_example("math")
    weights = []
    for run in ("first", "second"):
        torch.manual_seed(len(weights))  # whatever ran before must not matter
        script_args, training_args = module.make_parser().parse_args_and_config(
            args=["--model_name_or_path", tiny_base, "--output_dir", str(tmp_path / run), *TINY_SIZES]
        )
        train, _ = module.load_math_data(script_args, training_args.seed)
        ladir_dir = module.train_ladir(script_args, training_args, train)
        weights.append(load_file(os.path.join(ladir_dir, "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_math_example_stop_weight_reaches_the_reasoner_stage(tiny_base, tmp_path, monkeypatch):
    module = load_example("math")
    seen = {}

    class RecordingTrainer(module.LaDiRSFTTrainer):
        def train(self, *args, **kwargs):
            seen[self.args.stage] = self.args.stop_weight
            return super().train(*args, **kwargs)

    monkeypatch.setattr(module, "LaDiRSFTTrainer", RecordingTrainer)
    script_args, training_args = module.make_parser().parse_args_and_config(
        args=["--model_name_or_path", tiny_base, "--output_dir", str(tmp_path), *TINY_SIZES, "--stop_weight", "5.5"]
    )
    train, _ = module.load_math_data(script_args, training_args.seed)
    module.train_ladir(script_args, training_args, train)
    assert seen == {"vae": 5.5, "reasoner": 5.5}


def test_math_example_answer_token_stop_readout_lets_the_lm_head_decide(tiny_base, tmp_path):
    module = load_example("math")
    script_args, training_args = module.make_parser().parse_args_and_config(
        args=["--model_name_or_path", tiny_base, "--output_dir", str(tmp_path), *TINY_SIZES,
              "--stop_readout", "answer_token"]
    )
    train, _ = module.load_math_data(script_args, training_args.seed)
    ladir_dir = module.train_ladir(script_args, training_args, train)

    tokenizer = make_tokenizer()
    config = json.loads((Path(ladir_dir) / "config.json").read_text())
    assert config["stop_token_id"] == tokenizer.convert_tokens_to_ids("####")
    assert not any(name.startswith("stop_head.") for name in load_file(os.path.join(ladir_dir, "model.safetensors")))
