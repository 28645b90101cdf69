"""The RL learning rates of reproduce.py's two arms, chosen on training-split problems that no stage trained on.

    python benchmarks/reproduce.py --output_dir outputs/reproduce      # trains the two starts (and compares them)
    python benchmarks/tune_rl_learning_rates.py --start_dir outputs/reproduce \\
        --grpo_learning_rates 1.25e-6 5e-6 2e-5 --ladirl_learning_rates 1.25e-4 5e-4 2e-3
    python benchmarks/reproduce.py --start_dir outputs/reproduce --output_dir outputs/reproduce-tuned \\
        --grpo_learning_rate <picked> --ladirl_learning_rate <picked>   # RL again from the same starts

For every learning rate: TRL's GRPO from the earlier run's text-SFT start and LaDi-RL (each of its
`--latent_policy_parameters`) from its LaDiR start, with that run's settings (rollout budget, steps, N x M, noise);
then every RL model, and the two starts as the reference, is evaluated on `--num_validation_examples` problems of the
*training* split that are not among the `num_train_examples` rows the stages trained on. The test problems that
reproduce.py reports on are never read. Per arm, the rate with the highest validation pass@1 is picked (a tie goes to
the higher pass@num_samples). Writes `<output_dir>/tune_rl_learning_rates.json`.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from reproduce import (  # benchmarks/reproduce.py: the two arms' RL stages and their evaluation
    GRPO_CURVES,
    LADIRL_CURVES,
    evaluate,
    latent_generate_fn,
    read_start_dir,
    start_folders_and_tokenizer,
    text_generate_fn,
    train_grpo,
    train_ladirl,
    training_curve,
)
from transformers import AutoModelForCausalLM, set_seed

from trl_ladi import LaDiRModel
from trl_ladi.data import load_math_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start_dir", required=True, help="The --output_dir of a finished reproduce.py run.")
    parser.add_argument("--grpo_learning_rates", type=float, nargs="+", required=True)
    parser.add_argument("--ladirl_learning_rates", type=float, nargs="+", required=True)
    parser.add_argument("--num_validation_examples", type=int, default=64,
                        help="Training-split problems no stage trained on, every model evaluated on them.")
    parser.add_argument("--num_samples", type=int, default=8, help="Answers per validation problem (pass@1..n).")
    parser.add_argument("--output_dir", help="Where the RL runs and the JSON go (default: <start_dir>/tune-rl).")
    args = parser.parse_args(argv)
    if min(args.grpo_learning_rates + args.ladirl_learning_rates) <= 0:
        parser.error("learning rates must be positive")
    return args


def validation_split(settings: argparse.Namespace, num_examples: int):
    """`num_examples` training-split problems outside the first `num_train_examples` (the ones every stage trains on),
    drawn by the same generator, so that they never overlap the test split either."""
    options = dict(seed=settings.seed, conversational=False, instruction=None)
    train = load_math_dataset(settings.dataset_name, "train", settings.num_train_examples, **options)
    seen = set(train["prompt"])
    more = load_math_dataset(settings.dataset_name, "train", settings.num_train_examples + 2 * num_examples, **options)
    unseen = [index for index, prompt in enumerate(more["prompt"]) if prompt not in seen][:num_examples]
    if len(unseen) < num_examples:
        raise ValueError(f"only {len(unseen)} training-split problems are left out of training; ask for fewer.")
    return train, more.select(unseen)


def pick(results: dict, num_samples: int) -> float:
    """The learning rate with the highest pass@1 (ties: the higher pass@num_samples)."""
    return max(results, key=lambda rate: (results[rate]["pass_at_k"][1], results[rate]["pass_at_k"][num_samples]))


def train_and_evaluate_rl(name, train_fn, make_model, generate_fn, curves, *, settings, tokenizer, problems, output_dir,
                          report):
    """RL from a fresh `make_model()` with `train_fn(model, folder)`, then pass@k on `problems`: its time, training
    `curves` and pass@k go into `report` under `name`."""
    set_seed(settings.seed)  # every rate sees the same prompts and random stream
    model = make_model()
    start = time.perf_counter()
    trainer = train_fn(model, os.path.join(output_dir, name.replace(" ", "_")))
    report["timings"][f"train {name}"] = time.perf_counter() - start
    report["training"][name] = training_curve(trainer, curves)
    evaluate(name, generate_fn(model.eval(), tokenizer, settings), problems, settings, report)


def main(argv=None):
    args = parse_args(argv)
    previous = read_start_dir(args.start_dir)
    settings = argparse.Namespace(**{"gradient_accumulation_steps": 1,  # runs made before reproduce.py had the flag
                                     **previous["settings"], "num_samples": args.num_samples,
                                     "eval_decodes_per_latent": 1})
    output_dir = args.output_dir or os.path.join(args.start_dir, "tune-rl")
    os.makedirs(output_dir, exist_ok=True)
    train, validation = validation_split(settings, args.num_validation_examples)
    sft_dir, ladir_dir, tokenizer = start_folders_and_tokenizer(args.start_dir)
    report = {"settings": {**vars(args), "start_dir": "<start_dir>", "output_dir": "<output_dir>"},
              "run_settings": {**previous["settings"], "output_dir": "<output_dir>"},
              "validation": {"num_problems": len(validation), "num_samples": args.num_samples},
              "models": {}, "training": {}, "timings": {}}
    started = time.perf_counter()

    def train_and_evaluate(name, train_fn, make_model, generate_fn, curves):
        train_and_evaluate_rl(name, train_fn, make_model, generate_fn, curves, settings=settings, tokenizer=tokenizer,
                              problems=validation, output_dir=output_dir, report=report)

    def text_sft_model():
        return AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)

    evaluate("text SFT", text_generate_fn(text_sft_model(), tokenizer, settings), validation, settings, report)
    evaluate("LaDiR", latent_generate_fn(LaDiRModel.from_pretrained(ladir_dir), tokenizer, settings), validation,
             settings, report)
    picked = {}
    for rate in args.grpo_learning_rates:
        train_and_evaluate(
            f"GRPO lr {rate:g}", lambda model, folder: train_grpo(settings, model, tokenizer, train, rate, folder),
            text_sft_model, text_generate_fn, GRPO_CURVES,
        )
    picked["grpo_learning_rate"] = pick(
        {rate: report["models"][f"GRPO lr {rate:g}"] for rate in args.grpo_learning_rates}, args.num_samples)
    for policy in settings.latent_policy_parameters:
        for rate in args.ladirl_learning_rates:
            train_and_evaluate(
                f"LaDi-RL ({policy}) lr {rate:g}",
                lambda model, folder: train_ladirl(settings, model, tokenizer, train, policy, rate, folder),
                lambda: LaDiRModel.from_pretrained(ladir_dir), latent_generate_fn, LADIRL_CURVES,
            )
        picked[f"ladirl_learning_rate ({policy})"] = pick(
            {rate: report["models"][f"LaDi-RL ({policy}) lr {rate:g}"] for rate in args.ladirl_learning_rates},
            args.num_samples)
    report["picked"] = picked
    report["timings"]["total"] = time.perf_counter() - started

    path = os.path.join(output_dir, "tune_rl_learning_rates.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"validation pass@1 / pass@{args.num_samples} ({len(validation)} training-split problems):")
    for name, result in report["models"].items():
        print(f"  {name:40s} {100 * result['pass_at_k'][1]:5.1f} / {100 * result['pass_at_k'][args.num_samples]:5.1f}")
    print("picked:", json.dumps(picked), f"\nWrote {path}")
    return report


if __name__ == "__main__":
    main()
