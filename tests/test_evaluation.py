import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from trl_ladi.evaluation import (
    GenerationResult,
    causal_lm_generate_fn,
    evaluate_pass_at_k,
    ladir_generate_fn,
    pass_at_k,
    plot_pass_at_k,
    select_problems_with_a_gradient,
)
from trl_ladi.rewards import math_accuracy_reward
from trl_ladi.rewards.math import extract_final_answer

from accelerate_launch import accelerate_launch_command  # tests/accelerate_launch.py


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (2, 1, 1, 0.5),
        (2, 1, 2, 1.0),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 1, 0.3),
        (8, 0, 8, 0.0),
        (8, 1, 8, 1.0),
    ],
)
def test_pass_at_k_hand_checked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-9)
    assert 0.0 < pass_at_k(5000, 3, 10) < 1.0


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)


PROBLEMS = [
    {"prompt": "q0", "answer": "1"},
    {"prompt": [{"role": "user", "content": "q1"}], "answer": "2"},
    {"prompt": "q2", "answer": "3"},
]
# Per problem, four answers: 1, 0 and 3 of them correct.
ANSWERS = {
    "q0": ["#### 1", "#### 5", "#### 5", "#### 6"],
    "q1": ["#### 7", "#### 7", "#### 7", "#### 7"],
    "q2": ["#### 3", "#### 3", "#### 3", "#### 9"],
}


def fake_generate(prompts, num_samples):
    keys = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    latents = [torch.arange(num_samples, dtype=torch.float).repeat_interleave(2).view(num_samples, 2) for _ in keys]
    return GenerationResult(texts=[ANSWERS[key][:num_samples] for key in keys], latents=latents)


def test_evaluate_pass_at_k_with_a_fake_generator():
    seen_completions = []

    def reward(completions, **kwargs):
        seen_completions.append(completions)
        return math_accuracy_reward(completions, **kwargs)

    result = evaluate_pass_at_k(
        fake_generate, PROBLEMS, reward, ks=(1, 2, 4), num_samples=4, batch_size=2, show_progress=False,
        answer_fn=extract_final_answer,
    )
    expected = {k: (pass_at_k(4, 1, k) + pass_at_k(4, 0, k) + pass_at_k(4, 3, k)) / 3 for k in (1, 2, 4)}
    assert result["pass_at_k"] == pytest.approx(expected)
    assert result["pass_at_k"][1] == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert [p["c"] for p in result["per_problem"]] == [1, 0, 3]
    assert [p["distinct_answers"] for p in result["per_problem"]] == [3, 1, 2]
    assert result["distinct_answers_mean"] == pytest.approx(2.0)
    assert result["frac_problems_mixed"] == pytest.approx(2 / 3)  # q1 has no right answer: no RL gradient
    # latents (0,0), (1,1), (2,2), (3,3): mean pairwise distance sqrt(2) * (1+2+3+1+2+1) / 6
    assert result["latent_diversity_mean"] == pytest.approx(math.sqrt(2) * 10 / 6)
    assert result["per_problem"][0]["rewards"] == [1.0, 0.0, 0.0, 0.0]
    # The conversational prompt's answers were scored as conversational completions, as TRL passes them.
    assert seen_completions[1][0] == [{"role": "assistant", "content": "#### 7"}]
    json.loads(json.dumps(result))


def test_unjudgeable_problems_are_left_out():
    problems = [{"prompt": "q0", "answer": "1"}, {"prompt": "q2", "answer": None}]
    result = evaluate_pass_at_k(fake_generate, problems, math_accuracy_reward, ks=(1,), num_samples=4,
                                show_progress=False)
    assert result["num_judged"] == 1
    assert result["pass_at_k"][1] == pytest.approx(0.25)
    assert result["frac_problems_mixed"] == 1.0  # of the judged problems only
    assert result["per_problem"][1]["rewards"] == [None] * 4 and result["per_problem"][1]["pass_at_k"] is None


def test_select_problems_with_a_gradient_keeps_the_mixed_ones():
    dataset = Dataset.from_list([{"prompt": "q0", "answer": "1"}, {"prompt": "q1", "answer": "2"},
                                 {"prompt": "q2", "answer": "3"}])
    # 4 answers: q0 1 right, q1 none, q2 3 -> q0 and q2 give a gradient
    kept, screen = select_problems_with_a_gradient(fake_generate, dataset, math_accuracy_reward, num_samples=4,
                                                   batch_size=2, show_progress=False)
    assert isinstance(kept, Dataset) and kept["prompt"] == ["q0", "q2"] and kept["answer"] == ["1", "3"]
    assert screen["kept_indices"] == [0, 2] and [p["c"] for p in screen["per_problem"]] == [1, 0, 3]
    # 3 answers: q2's first three are all right, so only q0 is mixed; a list of dicts stays a list
    kept, screen = select_problems_with_a_gradient(fake_generate, list(dataset), math_accuracy_reward, num_samples=3,
                                                   show_progress=False)
    assert kept == [{"prompt": "q0", "answer": "1"}] and screen["kept_indices"] == [0]
    # an unjudgeable problem is never kept
    kept, _ = select_problems_with_a_gradient(fake_generate, [{"prompt": "q0", "answer": None}],
                                              math_accuracy_reward, num_samples=4, show_progress=False)
    assert kept == []


def test_evaluate_pass_at_k_bad_input():
    with pytest.raises(ValueError, match="num_samples=4"):
        evaluate_pass_at_k(fake_generate, PROBLEMS, math_accuracy_reward, ks=(8,), num_samples=4)
    with pytest.raises(ValueError, match="`prompt` column"):
        evaluate_pass_at_k(fake_generate, [{"question": "q0"}], math_accuracy_reward, ks=(1,), num_samples=1)
    short = lambda prompts, n: GenerationResult(texts=[["#### 1"]] * len(prompts))  # noqa: E731
    with pytest.raises(ValueError, match="must return 4 texts"):
        evaluate_pass_at_k(short, PROBLEMS, math_accuracy_reward, ks=(1,), num_samples=4, show_progress=False)


class FakeLaDiRPipeline:
    """Stands in for `LaDiRPipeline`: its `sample_answers` contract, recording the calls in `calls`."""

    calls = []

    def __init__(self, model, tokenizer):
        pass

    def sample_answers(self, prompts, num_latents, num_decodes_per_latent, **kwargs):
        self.calls.append((len(prompts), num_latents, num_decodes_per_latent, kwargs))
        texts = [f"p{p} l{l} d{d}" for p in range(len(prompts)) for l in range(num_latents)
                 for d in range(num_decodes_per_latent)]
        latents = torch.arange(len(prompts) * num_latents, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 2, 3, 4)
        return SimpleNamespace(texts=texts, latents=latents)


def test_ladir_generate_fn_reshapes_prompt_major(monkeypatch):
    model = FakeLaDiRPipeline
    monkeypatch.setattr(model, "calls", [])
    monkeypatch.setattr("trl_ladi.pipeline.LaDiRPipeline", model)
    result = ladir_generate_fn(model, tokenizer=None, temperature=0.7)(["a", "b"], 4)
    assert model.calls == [(2, 4, 1, {"temperature": 0.7})]
    assert result.texts[1] == ["p1 l0 d0", "p1 l1 d0", "p1 l2 d0", "p1 l3 d0"]
    assert [lat.shape for lat in result.latents] == [(4, 2, 3, 4)] * 2
    assert result.latents[1][:, 0, 0, 0].tolist() == [4.0, 5.0, 6.0, 7.0]

    result = ladir_generate_fn(model, None, num_decodes_per_latent=2)(["a", "b"], 4)
    assert model.calls[-1][:3] == (2, 2, 2)
    assert result.texts[1] == ["p1 l0 d0", "p1 l0 d1", "p1 l1 d0", "p1 l1 d1"]
    assert result.latents[1][:, 0, 0, 0].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="multiple of num_decodes_per_latent=2"):
        ladir_generate_fn(model, None, num_decodes_per_latent=2)(["a"], 3)


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    from trl_ladi.testing import make_tokenizer
    from trl_ladi.testing import tiny_causal_lm as build_tiny_causal_lm

    tokenizer = make_tokenizer()
    model = build_tiny_causal_lm(tokenizer, seed=0)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def test_causal_lm_generate_fn(tiny_causal_lm):
    model, tokenizer, _ = tiny_causal_lm
    generate = causal_lm_generate_fn(model, tokenizer, max_new_tokens=5, batch_size=2)
    prompts = ["the answer is", [{"role": "user", "content": "what is 2 plus 3 ?"}], "1 + 1 ="]
    result = generate(prompts, 3)
    assert [len(texts) for texts in result.texts] == [3, 3, 3]
    assert all(isinstance(text, str) for texts in result.texts for text in texts)
    assert result.latents is None


def test_causal_lm_generate_fn_pads_on_the_left(tiny_causal_lm):
    """A prompt sampled alone or next to a longer one gets the same answer: padding does not change it."""
    model, tokenizer, _ = tiny_causal_lm
    generate = causal_lm_generate_fn(model, tokenizer, max_new_tokens=4, temperature=1e-4, batch_size=2)
    short_prompt, long_prompt = "the answer is", "what is 2 plus 3 ? then add 4 plus 5 so we get"
    assert generate([short_prompt, long_prompt], 1).texts[0] == generate([short_prompt], 1).texts[0]


def test_cli_writes_json_and_png(tiny_causal_lm, tmp_path, capsys):
    import matplotlib.image

    from trl_ladi.cli import main

    _, _, model_path = tiny_causal_lm
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i} plus 1 ?", "answer": str(i + 1)}) + "\n"
                            for i in range(3)))
    out = tmp_path / "eval"
    exit_code = main([
        "eval", "--model", str(model_path), str(model_path), "--name", "base", "again", "--dataset", str(data),
        "--reward", "math", "--num_samples", "4", "--ks", "1", "2", "4", "--max_new_tokens", "4",
        "--output_dir", str(out), "--seed", "1",
    ])
    assert exit_code == 0
    report = json.loads((out / "pass_at_k.json").read_text())
    assert set(report["results"]) == {"base", "again"}
    for result in report["results"].values():
        assert set(result["pass_at_k"]) == {"1", "2", "4"}
        assert all(0.0 <= v <= 1.0 for v in result["pass_at_k"].values())
        assert len(result["per_problem"]) == 3 and all(len(p["answers"]) == 4 for p in result["per_problem"])
    # The same seed for every model: the two copies of one model sample the same answers.
    assert report["results"]["base"]["per_problem"] == report["results"]["again"]["per_problem"]
    png = out / "pass_at_k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).ndim == 3
    table = capsys.readouterr().out
    assert "pass@1" in table and "base" in table and "again" in table


def test_cli_samples_a_ladir_model_with_the_sampler_flags(tmp_path):
    """`trl-ladi eval` passes --sde_noise_level / --num_denoise_steps / --num_decodes_per_latent /
    --draw_slots_from_prior to a LaDiR model's sampler: the same flags and seed give the same latents, another noise
    level or step count other latents, and with two decodes per latent the greedy answers come in identical pairs."""
    from trl_ladi.cli import main
    from trl_ladi.testing import make_tokenizer, tiny_ladir_model

    tokenizer = make_tokenizer()
    model = tiny_ladir_model(tokenizer, seed=0, latent_tokens_per_block=2, latent_dim=8, encoder_lora_rank=4,
                             reasoner_lora_rank=4, max_blocks=2, num_denoise_steps=3)
    torch.nn.init.normal_(model.velocity_head.linear.weight, std=0.1)  # zero-initialised: give it some velocity
    model_path = tmp_path / "ladir"
    model.save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i} plus 1 ?", "answer": str(i + 1)}) + "\n"
                            for i in range(2)))

    def evaluate(name, *flags):
        out = tmp_path / name
        assert main(["eval", "--model", str(model_path), "--dataset", str(data), "--num_samples", "4", "--ks", "1",
                     "4", "--max_new_tokens", "3", "--output_dir", str(out), "--seed", "3", *flags]) == 0
        report = json.loads((out / "pass_at_k.json").read_text())
        return report["config"], report["results"]["ladir"]

    config, sde = evaluate("sde", "--sde_noise_level", "0.7", "--num_denoise_steps", "2")
    assert (config["sde_noise_level"], config["num_denoise_steps"], config["num_decodes_per_latent"]) == (0.7, 2, 1)
    _, sde_again = evaluate("sde_again", "--sde_noise_level", "0.7", "--num_denoise_steps", "2")
    _, ode = evaluate("ode", "--sde_noise_level", "0", "--num_denoise_steps", "2")
    _, more_steps = evaluate("more_steps", "--sde_noise_level", "0.7", "--num_denoise_steps", "5")
    _, two_decodes = evaluate("two_decodes", "--num_decodes_per_latent", "2", "--temperature", "0")
    assert sde_again["latent_diversity_mean"] == sde["latent_diversity_mean"]
    assert ode["latent_diversity_mean"] != sde["latent_diversity_mean"]
    assert more_steps["latent_diversity_mean"] != sde["latent_diversity_mean"]
    with pytest.raises(ValueError, match="draw_slots_from_prior=True needs a 'token_posterior' model"):
        evaluate("slots_from_prior", "--draw_slots_from_prior")  # the flag reaches the sampler, which checks it
    # greedy answers, two per latent: answers 0-1 read one latent, 2-3 another
    for problem in two_decodes["per_problem"]:
        answers = problem["answers"]
        assert len(answers) == 4 and answers[0] == answers[1] and answers[2] == answers[3]


def test_cli_bad_dataset(tiny_causal_lm):
    from trl_ladi.cli import main

    with pytest.raises(ValueError, match="neither a file, a directory"):
        main(["eval", "--model", str(tiny_causal_lm[2]), "--dataset", "no_such_dataset"])


def test_plot_pass_at_k(tmp_path):
    import matplotlib.image

    results = {"token-level": {"pass_at_k": {1: 0.2, 2: 0.3, 4: 0.4}}, "LaDi-RL": {"pass_at_k": {"1": 0.3, "4": 0.6}}}
    path = plot_pass_at_k(results, str(tmp_path / "curves.png"))
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_evaluation_split_across_two_processes_gives_the_numbers_of_one(tmp_path):
    """16 problems in 6 batches of 3 (the last one short): two CPU processes take alternate batches, gather, and
    every sampled answer and pass@k equals the one-process run's."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "evaluate_tiny.py")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    runs = {}
    for name, command in (
        ("one", [sys.executable, script, str(tmp_path / "one")]),
        ("two", [*accelerate_launch_command("ddp"), script, str(tmp_path / "two")]),
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert runs["one"]["processes"] == 1 and runs["two"]["processes"] == 2
    one, two = runs["one"]["per_problem"], runs["two"]["per_problem"]
    assert [p["index"] for p in two] == list(range(16))
    assert [p["answers"] for p in two] == [p["answers"] for p in one]
    assert len({answer for p in one for answer in p["answers"]}) > 4  # real, varied samples
    assert runs["two"]["pass_at_k"] == runs["one"]["pass_at_k"]
