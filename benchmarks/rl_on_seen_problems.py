"""Can each RL arm raise the pass rate of the problems it trains on? GRPO and LaDi-RL from `reproduce.py`'s starts.

    python benchmarks/rl_on_seen_problems.py --start_dir R --grpo_learning_rates 5e-6 --ladirl_learning_rates 5e-4
    python benchmarks/rl_on_seen_problems.py --start_dir R --ladirl_learning_rates 2.5e-4 --latent_kl_betas 0 1e-2

The weakest test of a policy gradient: RL on a few fixed problems only (`--num_problems` training-split problems no
stage trained on, never the test problems), each seen `steps x prompts_per_step / num_problems` times, with the run's
rollout budget per step; then the pass rate of those same problems, before and after, from `--num_samples` answers
each (the same seed, so the same random stream). A policy that cannot raise its reward here cannot on new problems.

Writes `<output_dir>/rl_on_seen_problems.json` (default output_dir: `<start_dir>/rl-on-seen-problems`).
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from datasets import concatenate_datasets
from reproduce import (  # benchmarks/reproduce.py
    GRPO_CURVES,
    LADIRL_CURVES,
    evaluate,
    latent_generate_fn,
    read_start_dir,
    start_folders_and_tokenizer,
    text_generate_fn,
    train_grpo,
    train_ladirl,
)
from transformers import AutoModelForCausalLM
from tune_rl_learning_rates import train_and_evaluate_rl, validation_split

from trl_ladi import LaDiRModel


def fixed_problems(settings: argparse.Namespace, num_problems: int, num_steps: int):
    """The first `num_problems` training-split problems no stage trained on, and a training set of them alone with
    enough copies for `num_steps` steps of `settings.prompts_per_step` prompts (GRPO's sampler shuffles them)."""
    _, problems = validation_split(settings, num_problems)
    copies = num_steps * settings.prompts_per_step // num_problems + 2
    return problems, concatenate_datasets([problems] * copies)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start_dir", required=True, help="The --output_dir of a finished reproduce.py run.")
    parser.add_argument("--grpo_learning_rates", type=float, nargs="*", default=[])
    parser.add_argument("--ladirl_learning_rates", type=float, nargs="*", default=[])
    parser.add_argument("--latent_kl_betas", type=float, nargs="+", default=[0.0],
                        help="LaDi-RL's `latent_kl_beta` (KL to the start's denoiser, summed over a block's numbers): "
                        "each LaDi-RL learning rate is run with each of these.")
    parser.add_argument("--num_problems", type=int, default=8, help="The fixed problems RL trains on.")
    parser.add_argument("--steps", type=int, default=24, help="RL steps (each of the run's prompts per step).")
    parser.add_argument("--num_samples", type=int, default=32, help="Answers per problem for the pass rates.")
    parser.add_argument("--output_dir",
                        help="Where the RL runs and the JSON go (default: <start_dir>/rl-on-seen-problems).")
    args = parser.parse_args(argv)
    if not args.grpo_learning_rates and not args.ladirl_learning_rates:
        parser.error("give --grpo_learning_rates and/or --ladirl_learning_rates")
    if min(args.grpo_learning_rates + args.ladirl_learning_rates) <= 0:
        parser.error("learning rates must be positive")
    if min(args.latent_kl_betas) < 0:
        parser.error("--latent_kl_betas must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    previous = read_start_dir(args.start_dir)
    settings = argparse.Namespace(**{"gradient_accumulation_steps": 1,  # runs made before reproduce.py had the flag
                                     **previous["settings"], "num_samples": args.num_samples, "rl_steps": args.steps,
                                     "eval_decodes_per_latent": 1})
    output_dir = args.output_dir or os.path.join(args.start_dir, "rl-on-seen-problems")
    os.makedirs(output_dir, exist_ok=True)
    problems, train = fixed_problems(settings, args.num_problems, args.steps)
    sft_dir, ladir_dir, tokenizer = start_folders_and_tokenizer(args.start_dir)
    report = {"settings": {**vars(args), "start_dir": "<start_dir>", "output_dir": "<output_dir>"},
              "problems": {"num_problems": len(problems), "times_each_is_trained_on":
                           args.steps * settings.prompts_per_step / len(problems), "num_samples": args.num_samples},
              "models": {}, "training": {}, "timings": {}}
    started = time.perf_counter()

    # one run per (arm, learning rate, LaDi-RL's KL weight): (start, run name, make_model, train_fn, generate_fn, curves)
    runs = []
    for rate in args.grpo_learning_rates:
        runs.append(("text SFT", f"GRPO lr {rate:g}",
                     lambda: AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32),
                     lambda model, folder, rate=rate: train_grpo(settings, model, tokenizer, train, rate, folder),
                     text_generate_fn, GRPO_CURVES))
    for policy in settings.latent_policy_parameters:
        for rate in args.ladirl_learning_rates:
            for beta in args.latent_kl_betas:
                runs.append(("LaDiR", f"LaDi-RL ({policy}) lr {rate:g}" + (f" latent_kl_beta {beta:g}" if beta else ""),
                             lambda: LaDiRModel.from_pretrained(ladir_dir),
                             lambda model, folder, policy=policy, rate=rate, beta=beta: train_ladirl(
                                 settings, model, tokenizer, train, policy, rate, folder, latent_kl_beta=beta),
                             latent_generate_fn, LADIRL_CURVES + (("latent_kl",) if beta else ())))
    for start_name, run_name, make_model, train_fn, generate_fn, curves in runs:
        if start_name not in report["models"]:
            evaluate(start_name, generate_fn(make_model().eval(), tokenizer, settings), problems, settings, report)
        train_and_evaluate_rl(run_name, train_fn, make_model, generate_fn, curves, settings=settings,
                              tokenizer=tokenizer, problems=problems, output_dir=output_dir, report=report)
    report["timings"]["total"] = time.perf_counter() - started

    path = os.path.join(output_dir, "rl_on_seen_problems.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"pass@1 / pass@{args.num_samples} on the {len(problems)} problems RL trained on:")
    for name, result in report["models"].items():
        print(f"  {name:40s} {100 * result['pass_at_k'][1]:5.1f} / {100 * result['pass_at_k'][args.num_samples]:5.1f}")
    print(f"Wrote {path}")
    return report


if __name__ == "__main__":
    main()
