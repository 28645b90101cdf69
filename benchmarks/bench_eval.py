"""What a pass@k evaluation costs: a trained LaDiR model's sampler, and a text model's `generate` on the same problems.

Each model answers the same held-out problems with `trl_ladi.evaluation.evaluate_pass_at_k` (8 prompts a batch, as
`benchmarks/ladir_quality.py` evaluates), from the same seed. Recorded per model: the wall time of each batch, the
seconds per answer, pass@k, and a SHA-256 of every answer's text, so that two runs of the script (one with
`PYTHONPATH` at an older checkout) can be compared: the same digest means the same answers, and the times then
compare the same work. For the LaDiR model, also the time inside each of its sampler's parts: `prefill`, the slot
priors (`next_slot_prior`) or denoising velocities (`denoising_velocity`), the token posterior's steps
(`posterior_velocity`, no forward), `append_block` and `answer_step`. Times are reported, never asserted.

    python benchmarks/bench_eval.py --ladir_model_dir LADIR [--text_model_dir TEXT]   # 16 chain_sum problems x 8
    python benchmarks/bench_eval.py --tiny        # smoke run on random 2-layer models (seconds)
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from machine import load_average, machine_info  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SAMPLER_PARTS = ("prefill", "next_slot_prior", "denoising_velocity", "posterior_velocity", "append_block", "answer_step")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ladir_model_dir", default=None, help="A trained LaDiR model (LaDiRModel.save_pretrained).")
    parser.add_argument("--text_model_dir", default=None, help="A causal LM to time beside it (e.g. a text SFT model).")
    parser.add_argument("--tiny", action="store_true", help="Random 2-layer models and the test tokenizer.")
    parser.add_argument("--dataset_name", default="chain_sum")
    parser.add_argument("--num_problems", type=int, default=16, help="Held-out problems of the test split.")
    parser.add_argument("--seed", type=int, default=5, help="Seed of the problems and of the samples.")
    parser.add_argument("--num_samples", type=int, default=8, help="Answers per problem (one latent each).")
    parser.add_argument("--num_denoise_steps", type=int, default=8)
    parser.add_argument("--sde_noise_level", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Text model: tokens per answer, at most.")
    parser.add_argument("--answer_tokens", type=int, default=16, help="LaDiR: answer tokens after the latents, at most.")
    parser.add_argument("--output", default=None)
    return parser.parse_args()


@contextlib.contextmanager
def timed_parts(model):
    """Accumulate the wall time of each of the sampler's parts that `model` has (an instance attribute per method,
    removed afterwards)."""
    seconds, calls = defaultdict(float), defaultdict(int)
    names = [name for name in SAMPLER_PARTS if hasattr(model, name)]

    def wrap(name, method):
        def timed(*positional, **keywords):
            start = time.perf_counter()
            try:
                return method(*positional, **keywords)
            finally:
                seconds[name] += time.perf_counter() - start
                calls[name] += 1

        return timed

    for name in names:
        setattr(model, name, wrap(name, getattr(model, name)))
    try:
        yield seconds, calls
    finally:
        for name in names:
            delattr(model, name)


def evaluate(generate_fn, problems, args) -> dict:
    """pass@k of `generate_fn` on `problems`, with the wall time of each batch and a digest of every answer."""
    from transformers import set_seed

    from trl_ladi.evaluation import evaluate_pass_at_k
    from trl_ladi.rewards.math import extract_final_answer, math_accuracy_reward

    batch_seconds, answers = [], []

    def timed_generate(prompts, num_samples):
        start = time.perf_counter()
        result = generate_fn(prompts, num_samples)
        batch_seconds.append(time.perf_counter() - start)
        answers.extend(text for texts in result.texts for text in texts)
        return result

    set_seed(args.seed)
    start = time.perf_counter()
    result = evaluate_pass_at_k(
        timed_generate, problems, math_accuracy_reward, ks=[k for k in (1, 2, 4, 8, 16) if k <= args.num_samples],
        num_samples=args.num_samples, show_progress=False, answer_fn=lambda text: extract_final_answer(text) or text.strip(),
    )
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "batch_s": batch_seconds,
        "s_per_answer": wall / len(answers),
        "num_answers": len(answers),
        "pass_at_k": result["pass_at_k"],
        "answers_sha256": hashlib.sha256(json.dumps(answers).encode()).hexdigest(),
    }


def load_models(args, workdir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_ladi import LaDiRModel

    if args.tiny:
        from trl_ladi.testing import make_tokenizer, tiny_causal_lm

        tokenizer = make_tokenizer()
        text_model = tiny_causal_lm(tokenizer, seed=args.seed)
        text_model.save_pretrained(workdir / "base")
        ladir = LaDiRModel.from_base(str(workdir / "base"), latent_dim=8, latent_tokens_per_block=4, max_blocks=2,
                                     token_aligned_latents=True, velocity_parameterization="token_posterior")
        return ladir.eval(), tokenizer, text_model.eval(), tokenizer
    if not args.ladir_model_dir:
        raise SystemExit("Give --ladir_model_dir (a trained LaDiR model), or --tiny for a smoke run.")
    ladir = LaDiRModel.from_pretrained(args.ladir_model_dir).eval()
    ladir_tokenizer = AutoTokenizer.from_pretrained(args.ladir_model_dir, padding_side="left")
    text_model = text_tokenizer = None
    if args.text_model_dir:
        text_model = AutoModelForCausalLM.from_pretrained(args.text_model_dir, dtype=torch.float32).eval()
        text_tokenizer = AutoTokenizer.from_pretrained(args.text_model_dir, padding_side="left")
    for tokenizer in (ladir_tokenizer, text_tokenizer):
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return ladir, ladir_tokenizer, text_model, text_tokenizer


def main():
    args = parse_args()
    from trl_ladi.data import load_math_dataset
    from trl_ladi.evaluation import causal_lm_generate_fn, ladir_generate_fn

    with tempfile.TemporaryDirectory() as workdir:
        ladir, ladir_tokenizer, text_model, text_tokenizer = load_models(args, Path(workdir))
        problems = load_math_dataset(args.dataset_name, "test", args.num_problems, seed=args.seed,
                                     conversational=False, instruction=None)
        record = {
            "benchmark": "bench_eval",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "load_average_before": load_average(),
            "settings": {key: value for key, value in vars(args).items() if key != "output"},
            "models": {},
        }
        generate_fn = ladir_generate_fn(
            ladir, ladir_tokenizer, num_denoise_steps=args.num_denoise_steps, sde_noise_level=args.sde_noise_level,
            temperature=args.temperature, max_new_tokens=args.answer_tokens,
        )
        with timed_parts(ladir) as (seconds, calls):
            record["models"]["LaDiR"] = evaluate(generate_fn, problems, args)
        record["models"]["LaDiR"]["parts"] = {name: {"s": seconds[name], "calls": calls[name]} for name in seconds}
        if text_model is not None:
            generate_fn = causal_lm_generate_fn(text_model, text_tokenizer, max_new_tokens=args.max_new_tokens,
                                                temperature=args.temperature)
            record["models"]["text"] = evaluate(generate_fn, problems, args)
            record["ratio_ladir_over_text_wall"] = record["models"]["LaDiR"]["wall_s"] / record["models"]["text"]["wall_s"]
        record["load_average_after"] = load_average()

    name = "eval_tiny.json" if args.tiny else f"eval_{Path(args.ladir_model_dir).name}.json"
    output = Path(args.output) if args.output else RESULTS / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    for model_name, model in record["models"].items():
        print(f"{model_name}: {model['wall_s']:.1f} s for {model['num_answers']} answers "
              f"({model['s_per_answer']:.3f} s each), pass@k {model['pass_at_k']}, answers {model['answers_sha256'][:12]}")
    for part, value in record["models"]["LaDiR"]["parts"].items():
        print(f"  LaDiR {part}: {value['s']:.1f} s in {value['calls']} calls")
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
