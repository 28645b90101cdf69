"""What the LaDi-RL loss costs, forward and backward, on one fixed rollout, and what memory has to do with it.

One rollout of `--prompts` prompts x `--latents` latents (the main job's step: 2 x 8) is sampled once; the loss is
then computed and back-propagated `--repeats` times at each of three settings of the advantages:

- every trace with an advantage (all are scored),
- half of them (one prompt's latents all scored alike: advantage 0; the loss does not feed those traces),
- none (one trace is still fed, so that every process runs a forward and a backward).

Two switches give the settings this benchmark was written to compare: `--posterior_chunk_mb 0` computes the token
posterior in one pass over the batch (before: a (..., V) tensor of hundreds of MB per operation, all kept for the
backward), and `--keep_freed_memory off` leaves glibc's malloc at its defaults (`TRL_LADI_KEEP_FREED_MEMORY=0`), which
hand freed memory back to the system at once. Times and the peak resident memory are reported, never asserted.

    python benchmarks/bench_loss_memory.py --model_dir outputs/ladirl-math/ladir     # the main job's LaDiR start
    python benchmarks/bench_loss_memory.py --model_dir ... --posterior_chunk_mb 0 --keep_freed_memory off
    python benchmarks/bench_loss_memory.py --tiny                                   # smoke run (seconds)
"""

import argparse
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None, help="A trained token-posterior LaDiR model (with its tokenizer).")
    parser.add_argument("--tiny", action="store_true", help="A random 2-layer token-posterior model (smoke run).")
    parser.add_argument("--prompts", type=int, default=2, help="Prompts in the rollout (main job: 2).")
    parser.add_argument("--latents", type=int, default=8, help="Latents per prompt, N (main job: 8).")
    parser.add_argument("--decodes", type=int, default=2, help="Answers per latent, M (main job: 2).")
    parser.add_argument("--repeats", type=int, default=2, help="Times each setting is computed (the first is cold).")
    parser.add_argument("--posterior_chunk_mb", type=float, default=None,
                        help="trl_ladi.sampling.POSTERIOR_CHUNK_BYTES in MiB; 0: one pass. Default: the package's.")
    parser.add_argument("--keep_freed_memory", choices=["on", "off"], default="on",
                        help="off: glibc's malloc defaults (TRL_LADI_KEEP_FREED_MEMORY=0).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if (args.model_dir is None) == (not args.tiny):
        parser.error("give --model_dir (a trained LaDiR model) or --tiny")
    return args


def main():
    args = parse_args()
    if args.keep_freed_memory == "off":
        os.environ["TRL_LADI_KEEP_FREED_MEMORY"] = "0"  # read when the trainer is built
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trl_ladi import LaDiRLConfig, LaDiRLTrainer, LaDiRModel
    from trl_ladi import sampling
    from trl_ladi.cpu_memory import keep_freed_memory
    from trl_ladi.data import load_math_dataset
    from trl_ladi.rewards import math_accuracy_reward

    sys.path.insert(0, str(Path(__file__).parent))
    from machine import load_average, machine_info  # benchmarks/machine.py

    if args.posterior_chunk_mb is not None:
        sampling.POSTERIOR_CHUNK_BYTES = int(args.posterior_chunk_mb * 2**20) if args.posterior_chunk_mb > 0 else 2**62
    torch.manual_seed(args.seed)
    workdir = tempfile.mkdtemp(prefix="bench_loss_memory_")
    if args.tiny:
        from trl_ladi.testing import make_tokenizer, spread_latent_codebook, tiny_ladir_model

        tokenizer = make_tokenizer()
        model = tiny_ladir_model(tokenizer, seed=args.seed, latent_tokens_per_block=3, latent_dim=8, max_blocks=2,
                                 num_denoise_steps=4, token_aligned_latents=True,
                                 velocity_parameterization="token_posterior")
        spread_latent_codebook(model)
        rows = [{"prompt": f"{index} + {index} =", "answer": str(2 * index)} for index in range(args.prompts)]
    else:
        model = LaDiRModel.from_pretrained(args.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
        problems = load_math_dataset("chain_sum", "train", args.prompts, seed=args.seed, conversational=False,
                                     instruction=None)
        rows = [{"prompt": row["prompt"], "answer": row["answer"]} for row in problems]
    config = LaDiRLConfig(
        output_dir=workdir, use_cpu=not torch.cuda.is_available(), bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=args.prompts * args.latents, num_generations=args.latents,
        num_decodes_per_latent=args.decodes, max_completion_length=16, temperature=0.7, num_denoise_steps=6,
        initial_noise_scale=model.config.initial_noise_scale, train_timestep_fraction=0.5,
        latent_policy_parameters="denoiser_adapter",
        max_steps=1, seed=args.seed,
    )
    trainer = LaDiRLTrainer(model=model, reward_funcs=math_accuracy_reward, args=config,
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    start = time.perf_counter()
    batch = trainer._generate_and_score_completions([row for row in rows for _ in range(args.latents)])
    rollout_s = time.perf_counter() - start

    traces = args.prompts * args.latents
    half = traces // 2
    advantages = {
        "every_trace": torch.linspace(-1, 1, traces),
        "half_the_traces": torch.cat([torch.zeros(half), torch.linspace(-1, 1, traces - half)]),
        "no_trace": torch.zeros(traces),
    }
    timings = []
    for repeat in range(args.repeats):
        for setting, values in advantages.items():
            trainer.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = trainer._compute_loss(trainer.model, dict(batch, advantages=values))
            forward_s = time.perf_counter() - start
            loss.backward()
            backward_s = time.perf_counter() - start - forward_s
            timings.append({"repeat": repeat, "advantages": setting, "traces_with_advantage": int(values.ne(0).sum()),
                            "forward_s": round(forward_s, 3), "backward_s": round(backward_s, 3)})
            print(f"repeat {repeat}, {setting}: forward {forward_s:.1f} s, backward {backward_s:.1f} s", flush=True)
            del loss
    record = {
        "benchmark": "bench_loss_memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_after": load_average(),
        "model": "tiny" if args.tiny else os.path.basename(os.path.normpath(args.model_dir)),
        "settings": {
            "prompts": args.prompts, "latents": args.latents, "decodes": args.decodes,
            "blocks_per_trace": batch["block_mask"].sum(1).tolist(),
            "posterior_chunk_bytes": sampling.POSTERIOR_CHUNK_BYTES,
            "keep_freed_memory": args.keep_freed_memory, "glibc_thresholds_raised": keep_freed_memory(),
            "torch_threads": torch.get_num_threads(),
        },
        "rollout_s": round(rollout_s, 3),
        "timings": timings,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    output = Path(args.output) if args.output else RESULTS / "bench_loss_memory.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
