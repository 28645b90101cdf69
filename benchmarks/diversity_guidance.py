"""Latent diversity, distinct answers and pass@k of a saved LaDiR model with diversity guidance off and on.

    python benchmarks/diversity_guidance.py --model_path outputs/ladirl-math/ladir --scales 0 2 4 8

Every setting samples the same chain_sum problems with the same seed, at the RL rollouts' sampler settings (SDE,
one answer per latent, so that the answers differ through their latents only), and the `num_samples` latents of a
problem are one group of the guidance. Each setting is compared with the first (scale 0 by default) problem by
problem: the mean difference of pass@k and its standard error over problems.

Choose the scale on `--split tuning`: problems of the training split's generator that its first
`--num_train_examples` rows do not hold (a model trained by `ladir_quality.py` at the same `--data_seed` did not
see them). Then report on `--split test` (the problems `ladir_quality.py` scores), where `--reference` pairs each
setting with the text-SFT model of a `ladir_quality.py` report on the same problems. Writes `--output` (JSON).
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from transformers import AutoTokenizer  # noqa: E402

from ladir_quality import paired_difference, without_per_problem  # noqa: E402  (sibling scripts)
from tune_rl_learning_rates import validation_split  # noqa: E402
from trl_ladi import LaDiRModel  # noqa: E402
from trl_ladi.data import load_math_dataset  # noqa: E402
from trl_ladi.evaluation import evaluate_pass_at_k, ladir_generate_fn  # noqa: E402
from trl_ladi.rewards import math_accuracy_reward  # noqa: E402
from trl_ladi.rewards.math import extract_final_answer  # noqa: E402


def load_problems(args):
    """The test split's first `num_problems`, or `num_problems` of the training split's generator that the first
    `num_train_examples` (the model's training rows) do not hold."""
    if args.split == "test":
        return load_math_dataset(args.dataset_name, "test", args.num_problems, seed=args.data_seed,
                                 conversational=False, instruction=None)
    settings = argparse.Namespace(seed=args.data_seed, dataset_name=args.dataset_name,
                                  num_train_examples=args.num_train_examples)
    return validation_split(settings, args.num_problems)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="A saved LaDiR model folder with its tokenizer.")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 2.0, 4.0, 8.0])
    parser.add_argument("--dataset_name", default="chain_sum")
    parser.add_argument("--split", choices=["tuning", "test"], default="tuning")
    parser.add_argument("--num_problems", type=int, default=128)
    parser.add_argument("--data_seed", type=int, default=0, help="`ladir_quality.py --seed` of the model's data.")
    parser.add_argument("--num_train_examples", type=int, default=2048, help="Training rows the model saw (tuning).")
    parser.add_argument("--reference", default=None,
                        help="A ladir_quality.py JSON on the same test problems: pair every setting with its text SFT.")
    parser.add_argument("--num_samples", type=int, default=8, help="Latents per problem, one answer each.")
    parser.add_argument("--num_denoise_steps", type=int, default=None, help="Steps per block or slot (default: the model's).")
    parser.add_argument("--sde_noise_level", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/diversity_guidance.json")
    args = parser.parse_args()

    model = LaDiRModel.from_pretrained(args.model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path, padding_side="left")
    problems = load_problems(args)
    reference = None
    if args.reference:
        if args.split != "test":
            parser.error("--reference pairs with a report's test problems: use it with --split test.")
        with open(args.reference) as f:
            reference = json.load(f)["text_sft"]
        if len(reference["correct_per_problem"]) != len(problems):
            parser.error(f"--reference scored {len(reference['correct_per_problem'])} problems, this run "
                         f"{len(problems)}: pass the report's --num_test_examples as --num_problems.")
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.num_samples]
    answer_fn = lambda text: extract_final_answer(text) or text.strip()  # noqa: E731
    results = []
    for scale in args.scales:
        start = time.perf_counter()
        generate_fn = ladir_generate_fn(
            model, tokenizer, num_decodes_per_latent=1, num_denoise_steps=args.num_denoise_steps,
            sde_noise_level=args.sde_noise_level, temperature=args.temperature, max_new_tokens=16,
            diversity_guidance_scale=scale,
        )
        evaluation = without_per_problem(evaluate_pass_at_k(
            generate_fn, problems, math_accuracy_reward, ks=ks, num_samples=args.num_samples, answer_fn=answer_fn,
            seed=args.seed,
        ))
        row = {
            "diversity_guidance_scale": scale,
            "latent_diversity": evaluation["latent_diversity_mean"],
            "distinct_answers": evaluation["distinct_answers_mean"],
            "pass_at_k": evaluation["pass_at_k"],
            "seconds": round(time.perf_counter() - start, 1),
            "correct_per_problem": evaluation["correct_per_problem"],
        }
        if results:
            row["minus_first_scale"] = paired_difference(evaluation, results[0], ks, args.num_samples)
        if reference is not None:
            row["minus_text_sft"] = paired_difference(evaluation, reference, ks, args.num_samples)
        print(json.dumps({key: value for key, value in row.items() if key != "correct_per_problem"}))
        results.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
