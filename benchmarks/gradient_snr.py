"""How much of each arm's policy gradient is signal: GRPO and LaDi-RL from the same `reproduce.py` starts.

    python benchmarks/gradient_snr.py --start_dir R --num_batches 16     # R: the --output_dir of a reproduce.py run
    python benchmarks/gradient_snr.py --start_dir R --num_problems 8     # prompts from 8 fixed problems only

Each arm draws `--num_batches` independent rollout batches with the run's RL budget (the same prompts per step and
scored answers per prompt as `reproduce.py`) at its start's weights: the learning rate is 0, so every batch comes from
the same policy. The gradient of the RL loss of each batch is recorded before clipping. Writing a batch gradient as
g_i = mu + noise_i, with mu the expected gradient,

    E[g_i . g_j] = |mu|^2  (i != j),      E[|g_i|^2] = |mu|^2 + tr(Sigma),

so `signal_fraction` = mean_{i != j} g_i . g_j / mean_i |g_i|^2 estimates |mu|^2 / E|g|^2: the share of one batch's
squared gradient norm that points where the expected gradient does (1: no noise; 0: no signal; negative values are
estimates of 0). The mean of k batches has |mu|^2 / (|mu|^2 + tr(Sigma) / k), so (1 - f) / f batches give the signal
and the noise equal weight (`batches_for_equal_signal_and_noise`). Batches in which every prompt's answers all scored
the same have no gradient (zero advantages): they are counted and left out. The estimate's standard error is a
jackknife over batches.

Writes `<output_dir>/gradient_snr.json` (default output_dir: `<start_dir>/gradient-snr`).
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from reproduce import (
    read_start_dir,
    start_folders_and_tokenizer,
    train_grpo,
    train_ladirl,
)
from rl_on_seen_problems import fixed_problems
from transformers import AutoModelForCausalLM, TrainerCallback, set_seed

from trl_ladi import LaDiRModel
from trl_ladi.data import load_math_dataset


class GradientRecorder(TrainerCallback):
    """Keeps a bfloat16 copy of each optimizer step's gradient (all trained parameters, flattened), or None when the
    batch gave no gradient."""

    def __init__(self):
        self.gradients = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        parts = [parameter.grad.detach().flatten() for parameter in model.parameters()
                 if parameter.requires_grad and parameter.grad is not None]
        gradient = torch.cat(parts).float() if parts else None
        nonzero = gradient is not None and bool(gradient.abs().sum() > 0)
        self.gradients.append(gradient.to(torch.bfloat16).cpu() if nonzero else None)


def signal_fraction(gradients: list) -> dict:
    """`signal_fraction` (see the module docstring) of the non-empty `gradients`, with a jackknife standard error."""
    kept = [gradient for gradient in gradients if gradient is not None]
    result = {"num_batches": len(gradients), "num_batches_with_gradient": len(kept),
              "num_parameters": kept[0].numel() if kept else None}
    if len(kept) < 3:
        return {**result, "signal_fraction": None}
    # Gram matrix in float64, one row at a time (a batch gradient of the full model has 135M entries)
    gram = torch.zeros(len(kept), len(kept), dtype=torch.float64)
    for i, row in enumerate(kept):
        row = row.double()
        for j in range(i, len(kept)):
            gram[i, j] = gram[j, i] = torch.dot(row, kept[j].double())

    def estimate(indices):
        sub = gram[indices][:, indices]
        off_diagonal = (sub.sum() - sub.diagonal().sum()) / (len(indices) * (len(indices) - 1))
        return (off_diagonal / sub.diagonal().mean()).item()

    everyone = list(range(len(kept)))
    fraction = estimate(everyone)
    leave_one_out = torch.tensor([estimate([j for j in everyone if j != i]) for i in everyone])
    n = len(kept)
    standard_error = ((n - 1) / n * (leave_one_out - leave_one_out.mean()).pow(2).sum()).sqrt().item()
    norms = gram.diagonal().sqrt()
    cosines = gram / (norms[:, None] * norms[None, :])
    off_diagonal_cosines = cosines[~torch.eye(n, dtype=torch.bool)]
    return {
        **result,
        "signal_fraction": fraction,
        "signal_fraction_standard_error": standard_error,
        "batches_for_equal_signal_and_noise": (1 - fraction) / fraction if fraction > 0 else None,
        "mean_pairwise_cosine": off_diagonal_cosines.mean().item(),
        "gradient_norm_mean": norms.mean().item(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start_dir", required=True, help="The --output_dir of a finished reproduce.py run.")
    parser.add_argument("--num_batches", type=int, default=16, help="Rollout batches (optimizer steps) per arm.")
    parser.add_argument("--num_latents", type=int, default=None,
                        help="Latents (LaDi-RL) and completions / num_decodes_per_latent (GRPO) per prompt; default: "
                             "the run's.")
    parser.add_argument("--prompts_per_step", type=int, default=None, help="Default: the run's.")
    parser.add_argument("--num_problems", type=int, default=None,
                        help="Draw the prompts from this many fixed training-split problems no stage trained on (those "
                             "rl_on_seen_problems.py trains on) instead of the run's training problems: the gradient "
                             "of RL on a few problems.")
    parser.add_argument("--output_dir", help="Where the JSON goes (default: <start_dir>/gradient-snr).")
    args = parser.parse_args(argv)
    if args.num_batches < 3:
        parser.error("--num_batches must be at least 3 (the estimate needs pairs, its error a jackknife)")
    previous = read_start_dir(args.start_dir)
    settings = argparse.Namespace(**{**previous["settings"], "rl_steps": args.num_batches,
                                     "gradient_accumulation_steps": 1})  # one gradient per rollout batch
    settings.num_latents = args.num_latents or settings.num_latents
    settings.prompts_per_step = args.prompts_per_step or settings.prompts_per_step
    output_dir = args.output_dir or os.path.join(args.start_dir, "gradient-snr")
    os.makedirs(output_dir, exist_ok=True)
    if args.num_problems:
        _, train = fixed_problems(settings, args.num_problems, args.num_batches)
    else:
        options = dict(seed=settings.seed, conversational=False, instruction=None)
        train = load_math_dataset(settings.dataset_name, "train", settings.num_train_examples, **options)
    sft_dir, ladir_dir, tokenizer = start_folders_and_tokenizer(args.start_dir)
    answers_per_prompt = settings.num_latents * settings.num_decodes_per_latent
    report = {"settings": {**vars(args), "start_dir": "<start_dir>", "output_dir": "<output_dir>"},
              "rl_budget": {"prompts_per_step": settings.prompts_per_step, "answers_per_prompt": answers_per_prompt},
              "prompts_from": f"{args.num_problems} fixed problems" if args.num_problems else "the training problems",
              "arms": {}, "timings": {}}
    # learning rate 0: every batch comes from the start's policy; max_grad_norm 0: no clipping, the raw batch gradient
    arms = {
        "GRPO (text SFT start, all weights)": lambda recorder: train_grpo(
            settings, AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32), tokenizer, train, 0.0,
            os.path.join(output_dir, "grpo"), callbacks=[recorder], max_grad_norm=0.0),
    }
    for policy in settings.latent_policy_parameters:
        arms[f"LaDi-RL (LaDiR start, {policy})"] = lambda recorder, policy=policy: train_ladirl(
            settings, LaDiRModel.from_pretrained(ladir_dir), tokenizer, train, policy, 0.0,
            os.path.join(output_dir, f"ladirl-{policy}"), callbacks=[recorder], max_grad_norm=0.0)
    for name, run in arms.items():
        set_seed(settings.seed)  # both arms draw the same prompts
        recorder = GradientRecorder()
        start = time.perf_counter()
        run(recorder)
        report["timings"][name] = time.perf_counter() - start
        report["arms"][name] = signal_fraction(recorder.gradients)
        print(name, json.dumps(report["arms"][name]), flush=True)
    path = os.path.join(output_dir, "gradient_snr.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"Wrote {path}")
    return report


if __name__ == "__main__":
    main()
