"""Latent diversity, distinct answers and pass@k of a saved LaDiR model with diversity guidance off and on.

    python benchmarks/diversity_guidance.py --model_path outputs/ladirl-math/ladir --scales 0 0.5 1 2

Every setting samples the same held-out chain_sum problems with the same seed, at the RL rollouts' sampler settings
(SDE, `num_denoise_steps` steps, one answer per latent so that the answers differ through their latents only).
Writes `benchmarks/results/diversity_guidance.json`.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from transformers import AutoTokenizer

from trl_ladi import LaDiRModel
from trl_ladi.data import load_math_dataset
from trl_ladi.evaluation import evaluate_pass_at_k, ladir_generate_fn
from trl_ladi.rewards import math_accuracy_reward
from trl_ladi.rewards.math import extract_final_answer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="A saved LaDiR model folder with its tokenizer.")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--num_problems", type=int, default=32)
    parser.add_argument("--num_latents", type=int, default=8)
    parser.add_argument("--num_denoise_steps", type=int, default=6)
    parser.add_argument("--sde_noise_level", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "diversity_guidance.json"))
    args = parser.parse_args()

    model = LaDiRModel.from_pretrained(args.model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path, padding_side="left")
    problems = load_math_dataset("chain_sum", "test", args.num_problems, conversational=False, instruction=None)
    results = []
    for scale in args.scales:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        generate_fn = ladir_generate_fn(
            model, tokenizer, num_decodes_per_latent=1, num_denoise_steps=args.num_denoise_steps,
            sde_noise_level=args.sde_noise_level, temperature=args.temperature, max_new_tokens=16,
            diversity_guidance_scale=scale,
        )
        evaluation = evaluate_pass_at_k(
            generate_fn, problems, math_accuracy_reward, ks=[1, args.num_latents], num_samples=args.num_latents,
            answer_fn=lambda text: extract_final_answer(text) or text.strip(), show_progress=False,
        )
        row = {
            "diversity_guidance_scale": scale,
            "latent_diversity": evaluation["latent_diversity_mean"],
            "distinct_answers": evaluation["distinct_answers_mean"],
            "pass_at_k": evaluation["pass_at_k"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row))
        results.append(row)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
