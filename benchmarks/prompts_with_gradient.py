"""How many of the main job's RL prompts can give a gradient: the spread of a LaDiR model's answers per training problem.

    python benchmarks/prompts_with_gradient.py --ladir_model_path outputs/ladirl-math/ladir
    python benchmarks/prompts_with_gradient.py --ladir_model_path outputs/ladirl-math/ladir --token_readout_temperature 1.0

A LaDi-RL group (one prompt, N latents) gives a gradient only when its latents' utilities differ: some right, some
wrong. The share of prompts that do is `1 - frac_reward_zero_std`, which the main job logs from its RL steps' prompts
(8 over its 8 steps; 16 at the earlier 2 prompts a step): too few to tell 40% from 60%. This script measures the same
share on more problems before any RL: it samples `--num_latents` latents (one answer each) for each of the first `--num_problems` problems of the
main job's training split, with the RL rollouts' sampler settings (examples/math.py's defaults), and counts the
problems whose first n answers are all wrong, all right, or mixed, for n = 4, 8, ... up to `--num_latents`. Two
decodes of one chain_sum latent gave the same answer in every RL step measured (`decode_agreement` 1,
docs/quickstart.md), so N latents x M decodes spread like N latents.

Writes `<output_dir>/prompts_with_gradient.json`: the shares per n, pass@k, and every problem's prompt, answer and
rewards (group the problems by difficulty from there).
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from transformers import AutoTokenizer

from trl_ladi import LaDiRModel
from trl_ladi.cpu_threads import use_available_cores
from trl_ladi.data import MATH_TASKS, load_math_dataset
from trl_ladi.evaluation import evaluate_pass_at_k, ladir_generate_fn
from trl_ladi.rewards import math_accuracy_reward
from trl_ladi.rewards.math import extract_final_answer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ladir_model_path", required=True, help="A saved LaDiR model with its tokenizer.")
    parser.add_argument("--dataset_name", default="chain_sum", choices=MATH_TASKS)
    parser.add_argument("--num_train_examples", type=int, default=256,
                        help="The main job's training split size (its problems depend on it and on --seed).")
    parser.add_argument("--seed", type=int, default=42, help="The main job's seed (LaDiRLConfig's default).")
    parser.add_argument("--num_problems", type=int, default=48, help="Training problems to sample (the first ones).")
    parser.add_argument("--num_latents", type=int, default=16, help="Latents per problem, one answer each.")
    # the RL rollouts' sampler in examples/math.py
    parser.add_argument("--num_denoise_steps", type=int, default=6)
    parser.add_argument("--sde_noise_level", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.7, help="The answer decoder's temperature.")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--token_readout_temperature", type=float,
                        help="Override the model's slot temperature (a token posterior's latents sample at it).")
    parser.add_argument("--batch_size", type=int, default=8, help="Problems sampled at once.")
    parser.add_argument("--output_dir", help="Default: <ladir_model_path>/prompts-with-gradient.")
    args = parser.parse_args(argv)
    if args.num_latents < 4 or args.num_latents % 4:
        parser.error(f"--num_latents must be a multiple of 4 (the shares are counted for n = 4, 8, ...), got "
                     f"{args.num_latents}.")
    return args


def outcome_shares(per_problem_rewards: list[list[float]], num_latents: int) -> dict:
    """For the first `num_latents` answers of each problem: the share of problems with none, some (a gradient) or all
    of them right."""
    correct = [sum(reward >= 1.0 for reward in rewards[:num_latents]) for rewards in per_problem_rewards]
    return {
        "mixed": sum(0 < c < num_latents for c in correct) / len(correct),
        "all_wrong": sum(c == 0 for c in correct) / len(correct),
        "all_right": sum(c == num_latents for c in correct) / len(correct),
    }


def main(argv=None):
    args = parse_args(argv)
    use_available_cores()
    model = LaDiRModel.from_pretrained(args.ladir_model_path).eval()
    if args.token_readout_temperature is not None:
        model.config.token_readout_temperature = args.token_readout_temperature
    tokenizer = AutoTokenizer.from_pretrained(args.ladir_model_path, padding_side="left")
    train = load_math_dataset(args.dataset_name, "train", args.num_train_examples, seed=args.seed,
                              conversational=False, instruction=None)
    problems = train.select(range(min(args.num_problems, len(train))))
    generate_fn = ladir_generate_fn(
        model, tokenizer, num_decodes_per_latent=1, num_denoise_steps=args.num_denoise_steps,
        sde_noise_level=args.sde_noise_level, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
    )
    start = time.perf_counter()
    result = evaluate_pass_at_k(
        generate_fn, problems, math_accuracy_reward, ks=[1, 4, args.num_latents], num_samples=args.num_latents,
        batch_size=args.batch_size, answer_fn=extract_final_answer, seed=args.seed,
    )
    seconds = time.perf_counter() - start
    judged = [problem for problem in result["per_problem"] if problem["judged"]]
    rewards = [problem["rewards"] for problem in judged]
    shares = {n: outcome_shares(rewards, n) for n in range(4, args.num_latents + 1, 4)}

    print(f"{len(judged)} training problems, pass@1 {100 * result['pass_at_k'][1]:.1f}%, {seconds:.0f} s")
    print("latents per prompt   mixed (a gradient)   all wrong   all right")
    for n, share in shares.items():
        print(f"{n:>18}   {100 * share['mixed']:>17.1f}%   {100 * share['all_wrong']:>8.1f}%   "
              f"{100 * share['all_right']:>8.1f}%")

    output_dir = args.output_dir or os.path.join(args.ladir_model_path, "prompts-with-gradient")
    os.makedirs(output_dir, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("ladir_model_path", "output_dir")}
    report = {
        "settings": settings,
        "seconds": seconds,
        "pass_at_k": result["pass_at_k"],
        "shares_by_latents_per_prompt": shares,
        "problems": [
            {"prompt": problems[p["index"]]["prompt"], "answer": problems[p["index"]]["answer"], "rewards": p["rewards"]}
            for p in judged
        ],
    }
    path = os.path.join(output_dir, "prompts_with_gradient.json")
    with open(path, "w") as report_file:
        json.dump(report, report_file, indent=1)
    print(f"Wrote {path}")
    return report


if __name__ == "__main__":
    main()
