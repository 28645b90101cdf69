"""Cost of one LaDi-RL training step next to one TRL GRPO step: same model, prompts, reward, answers per prompt.

Both trainers run in this one process on the same base model (SmolLM2-135M-Instruct from `default_model_path()` by
default, fp32, CPU), the same chain_sum prompts (one prompt per step, the same prompt for both at each step) and the
same reward (`math_accuracy_reward`):

* GRPO (TRL's `GRPOTrainer`): `G` sampled completions of up to `C` tokens per prompt.
* LaDi-RL (`LaDiRLTrainer`): `N` latent traces x `M` answers per trace (`N * M = G`), answers of up to `C` tokens.

The LaDiR model is a fresh `LaDiRModel.from_base(dir)`: its heads are untrained, which does not change what a step
costs (the same forwards run whatever the weights); its velocity head gets small random weights instead of zeros, so
that the logged `sampler_log_prob_gap` (sampler vs loss log-probabilities) compares two non-trivial computations. Its
stop head is set to always say "another block" so that every trace writes exactly `--blocks` latent blocks (an
untrained stop head would stop at an arbitrary block; a trained one stops on its own, chain_sum's worked solutions
have 2-3 steps).

Steps are interleaved (after `--warmup` untimed steps of each): GRPO, LaDi-RL, LaDi-RL, GRPO, ... (ABBA order), so
that the load of a shared machine falls on both alike. For each step: wall time (rollout + loss + backward +
optimizer step), answers scored per second, the peak resident memory during that step (sampled every 10 ms), and
the split rollout-generation / scoring / loss+update (the same wrappers on both trainers; LaDi-RL also logs its own
`time/denoising`, `time/decoding`, `time/scoring`). Timings are reported, never asserted.

    python benchmarks/bench_vs_grpo.py              # SmolLM2-135M (a few minutes on 2 CPU cores)
    python benchmarks/bench_vs_grpo.py --tiny       # smoke run on a random 2-layer Llama (seconds)

On a GPU pass `--device cuda --bf16` (TRL's mixed precision: float32 weights, bf16 compute); each step then also
records the peak GPU memory it allocated (`torch.cuda.max_memory_allocated`). `benchmarks/gpu_step.py` runs this
for real-size models as part of its GPU check.

`--natural SFT_DIR LADIR_DIR` compares each method on its natural task instead (e.g. the `text-sft` and `ladir`
folders that benchmarks/reproduce.py writes): GRPO from the text-SFT model writing its worked solution (up to
`--grpo_max_completion_length` tokens, 128), LaDi-RL from the trained LaDiR model with its own stop head and short
answers (`--max_completion_length`, 16 here), plain chain_sum prompts as both were trained on.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from machine import load_average, machine_info  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# ------------------------------------------------------------------ machine and memory


def current_rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssMonitor(threading.Thread):
    """Samples the resident set size every `interval` seconds; `reset()` starts a new peak window."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = current_rss_bytes()
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def reset(self) -> int:
        self.peak = current_rss_bytes()
        return self.peak

    def read(self) -> int:
        self.peak = max(self.peak, current_rss_bytes())
        return self.peak

    def stop(self):
        self._stop_event.set()


# ------------------------------------------------------------------ models


def save_tiny_llama(workdir: Path, seed: int) -> Path:
    """A random 2-layer Llama and the tiny word-level tokenizer of trl_ladi/testing.py, saved in `workdir/tiny-llama`."""
    from trl_ladi.testing import make_tokenizer, tiny_causal_lm

    tokenizer = make_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=seed, hidden_size=64)
    path = workdir / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def set_cost_probe_heads(ladir):
    """A fresh LaDiR model's heads for timing: a velocity field that is not zero (a fresh head's is), so that the
    sampler/loss log-prob gap compares non-trivial numbers, and a stop head that always says "another block", so
    that every trace writes exactly `max_blocks` blocks."""
    from trl_ladi.modeling import ANSWER, CONTINUE

    for parameter in ladir.velocity_head.parameters():
        parameter.normal_(0, 0.05)
    ladir.stop_head.weight.zero_()
    ladir.stop_head.bias[CONTINUE], ladir.stop_head.bias[ANSWER] = 1.0, -1.0


def prepare_model_dir(args, workdir: Path) -> tuple[str, str]:
    """The base model directory and a short name for it."""
    if args.tiny:
        return str(save_tiny_llama(workdir, args.seed)), "tiny-llama"
    if args.model:
        return args.model, Path(args.model).name
    from trl_ladi.default_model import default_model_path

    return default_model_path(), "SmolLM2-135M-Instruct"


class Timer:
    """Wraps a trainer method and adds its wall time to `seconds` (read and cleared per step)."""

    def __init__(self, trainer, name: str):
        self.seconds = 0.0
        original = getattr(trainer, name)

        def timed(*positional, **keywords):
            start = time.perf_counter()
            try:
                return original(*positional, **keywords)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(trainer, name, timed)

    def pop(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def build_trainers(args, model_dir: str, workdir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from trl_ladi import LaDiRLConfig, LaDiRLTrainer, LaDiRModel
    from trl_ladi.data import load_math_dataset
    from trl_ladi.rewards import math_accuracy_reward

    num_steps = args.warmup + args.steps
    plain = dict(conversational=False, instruction=None) if args.natural else {}  # as reproduce.py trains them
    dataset = load_math_dataset("chain_sum", split="train", num_examples=max(32, num_steps), seed=args.seed, **plain)
    tokenizer = AutoTokenizer.from_pretrained(args.natural[0] if args.natural else model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    common = dict(
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        temperature=1.0,
        max_steps=num_steps,
        learning_rate=1e-6,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=args.seed,
        beta=0.0,
        dataloader_num_workers=0,
    )

    torch.manual_seed(args.seed)
    grpo_model = AutoModelForCausalLM.from_pretrained(args.natural[0] if args.natural else model_dir, dtype=torch.float32)
    grpo_args = GRPOConfig(
        output_dir=str(workdir / "grpo"),
        per_device_train_batch_size=args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.grpo_max_completion_length or args.max_completion_length,
        gradient_checkpointing=args.grpo_gradient_checkpointing,
        **common,
    )
    grpo = GRPOTrainer(
        model=grpo_model, reward_funcs=math_accuracy_reward, args=grpo_args, train_dataset=dataset,
        processing_class=tokenizer,
    )

    torch.manual_seed(args.seed)
    if args.natural:  # the trained model, stopping where its stop head says
        ladir = LaDiRModel.from_pretrained(args.natural[1])
    else:
        ladir_kwargs = dict(latent_dim=16) if args.tiny else {}
        ladir = LaDiRModel.from_base(model_dir, max_blocks=args.blocks, num_denoise_steps=args.denoise_steps,
                                     **ladir_kwargs)
        set_cost_probe_heads(ladir)
    ladirl_args = LaDiRLConfig(
        output_dir=str(workdir / "ladirl"),
        per_device_train_batch_size=args.num_latents,
        num_generations=args.num_latents,
        num_decodes_per_latent=args.num_decodes_per_latent,
        max_completion_length=args.max_completion_length,
        num_denoise_steps=args.denoise_steps,
        max_latent_blocks=None if args.natural else args.blocks,
        latent_policy_parameters=args.latent_policy_parameters,
        sde_noise_level=0.7,
        gradient_checkpointing=False,
        **common,
    )
    ladirl = LaDiRLTrainer(
        model=ladir, reward_funcs=math_accuracy_reward, args=ladirl_args, train_dataset=dataset,
        processing_class=tokenizer,
    )
    return grpo, ladirl


class Runner:
    """Drives one trainer step by step (the body of `Trainer.train`'s inner loop, without its bookkeeping)."""

    def __init__(self, name: str, trainer, answers_per_step: int, monitor: RssMonitor):
        self.name, self.trainer, self.answers_per_step, self.monitor = name, trainer, answers_per_step, monitor
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
        self.batches = iter(trainer.get_train_dataloader())
        self.rollout = Timer(trainer, "_generate_and_score_completions")
        self.scoring = Timer(trainer, "_calculate_rewards")
        self.records = []
        self.trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    def step(self, timed: bool):
        trainer = self.trainer
        batch = next(self.batches)
        trainer.model.train()
        trainer._metrics["train"].clear()
        self.rollout.pop(), self.scoring.pop()
        rss_before = self.monitor.reset()
        on_gpu = torch.cuda.is_available() and not self.trainer.args.use_cpu
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        rss_peak = self.monitor.read()
        rollout, scoring = self.rollout.pop(), self.scoring.pop()
        metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if values}
        record = {
            "timed": timed,
            "prompt": batch[0]["prompt"][-1]["content"].split("\n")[0] if isinstance(batch[0]["prompt"], list) else batch[0]["prompt"],
            "wall_seconds": wall,
            "answers_per_second": self.answers_per_step / wall,
            "generation_seconds": rollout - scoring,  # rollout minus scoring: sampling and bookkeeping
            "scoring_seconds": scoring,
            "loss_and_update_seconds": wall - rollout,  # loss forward, backward, optimizer step
            "rss_before_bytes": rss_before,
            "rss_peak_bytes": rss_peak,
            "mean_answer_tokens": metrics.get("completions/mean_length"),
            "reward": metrics.get("reward"),
        }
        if on_gpu:
            record["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        # sampler_log_prob_gap: |sampler's log-prob - the loss's recomputation|, the ratio check (docs/ladirl.md)
        for key in ("time/denoising", "time/decoding", "time/scoring", "latent_blocks/mean", "sampler_log_prob_gap"):
            if key in metrics:
                record[key] = metrics[key]
        self.records.append(record)
        gpu = f", peak GPU {record['gpu_peak_bytes'] / 2**30:.2f} GiB" if on_gpu else ""
        print(f"  {self.name:8s} {'timed ' if timed else 'warmup'} step: {wall:7.2f} s, "
              f"peak RSS {rss_peak / 2**30:.2f} GiB{gpu}, mean answer {record['mean_answer_tokens']} tokens", flush=True)


def summarize(records: list) -> dict:
    timed = [r for r in records if r["timed"]]

    def stat(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        if not values:
            return None
        return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values),
                "max": max(values)}

    keys = ["wall_seconds", "answers_per_second", "generation_seconds", "scoring_seconds",
            "loss_and_update_seconds", "rss_peak_bytes", "mean_answer_tokens", "time/denoising", "time/decoding",
            "time/scoring", "latent_blocks/mean", "gpu_peak_bytes", "sampler_log_prob_gap"]
    summary = {key: stat(key) for key in keys}
    summary["rss_peak_bytes_max"] = max(r["rss_peak_bytes"] for r in records)
    summary["rss_growth_bytes_max"] = max(r["rss_peak_bytes"] - r["rss_before_bytes"] for r in timed)
    return {key: value for key, value in summary.items() if value is not None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="quick smoke run on a random tiny Llama")
    parser.add_argument("--num_generations", type=int, default=8, help="GRPO: completions G per prompt")
    parser.add_argument("--num_latents", type=int, default=4, help="LaDi-RL: latent traces N per prompt")
    parser.add_argument("--num_decodes_per_latent", type=int, default=2, help="LaDi-RL: answers M per latent")
    parser.add_argument("--max_completion_length", type=int, default=None,
                        help="C, for both (64); with --natural LaDi-RL's answers only (16)")
    parser.add_argument("--blocks", type=int, default=3, help="LaDi-RL: latent blocks per trace")
    parser.add_argument("--denoise_steps", type=int, default=None,
                        help="LaDi-RL: denoising steps K per block (10; with --natural 6, as the main job)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each trainer first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each trainer")
    parser.add_argument("--natural", nargs=2, metavar=("SFT_DIR", "LADIR_DIR"), default=None,
                        help="each method on its natural task: GRPO from this text-SFT model, LaDi-RL from this "
                             "trained LaDiR model (see the module docstring)")
    parser.add_argument("--grpo_max_completion_length", type=int, default=None,
                        help="GRPO's completion limit (default: --max_completion_length; 128 with --natural)")
    parser.add_argument("--latent_policy_parameters", default="velocity_head",
                        help="what LaDi-RL trains: velocity_head, denoiser_adapter or reasoner")
    parser.add_argument("--grpo_gradient_checkpointing", action="store_true",
                        help="GRPO with gradient checkpointing (TRL's default; off here by default, as for LaDi-RL)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both trainers run")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision for both trainers (GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file (default: benchmarks/results/vs_grpo_<model>.json)")
    args = parser.parse_args()
    natural_defaults = dict(max_completion_length=16, denoise_steps=6, grpo_max_completion_length=128)
    other_defaults = dict(max_completion_length=64, denoise_steps=10)
    for name, value in (natural_defaults if args.natural else other_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    if args.num_latents * args.num_decodes_per_latent != args.num_generations:
        parser.error("choose N * M = G so that both trainers score the same number of answers per prompt")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    print(f"load average at start: {load_start}", flush=True)
    monitor = RssMonitor()
    monitor.start()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir, model_name = prepare_model_dir(args, workdir)
        rss_empty = current_rss_bytes()
        grpo, ladirl = build_trainers(args, model_dir, workdir)
        rss_loaded = current_rss_bytes()
        runners = [Runner("GRPO", grpo, args.num_generations, monitor),
                   Runner("LaDi-RL", ladirl, args.num_latents * args.num_decodes_per_latent, monitor)]
        for _ in range(args.warmup):
            for runner in runners:
                runner.step(timed=False)
        for index in range(args.steps):
            order = runners if index % 2 == 0 else runners[::-1]  # ABBA: neither always goes first
            for runner in order:
                runner.step(timed=True)
    monitor.stop()
    load_end = load_average()
    print(f"load average at end: {load_end}", flush=True)

    grpo_runner, ladirl_runner = runners
    summaries = {"grpo": summarize(grpo_runner.records), "ladirl": summarize(ladirl_runner.records)}
    ratios = {}
    for key in ("wall_seconds", "answers_per_second", "generation_seconds", "loss_and_update_seconds",
                "rss_peak_bytes", "mean_answer_tokens", "gpu_peak_bytes"):
        if key in summaries["grpo"] and key in summaries["ladirl"] and summaries["grpo"][key]["mean"]:
            ratios[key] = summaries["ladirl"][key]["mean"] / summaries["grpo"][key]["mean"]
    ratios["seconds_per_answer"] = 1 / ratios["answers_per_second"]
    ratios["rss_growth_bytes_max"] = summaries["ladirl"]["rss_growth_bytes_max"] / summaries["grpo"]["rss_growth_bytes_max"]

    result = {
        "benchmark": "bench_vs_grpo",
        "date": started.isoformat(timespec="seconds"),
        "model": model_name,
        "model_dir": Path(model_dir).name,  # a folder name: a path of this machine means nothing elsewhere
        "settings": {
            **{key: value for key, value in vars(args).items() if key not in ("output", "natural")},
            "natural": [Path(folder).name for folder in args.natural] if args.natural else None,
            "answers_per_prompt": args.num_generations,
            "prompts_per_step": 1,
            "dataset": "chain_sum (trl_ladi.data.load_math_dataset), "
            + ("plain prompts" if args.natural else "conversational"),
            "reward": "trl_ladi.rewards.math_accuracy_reward",
            "dtype": "bf16 mixed precision (float32 weights)" if args.bf16 else "float32",
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "beta": 0.0,
            "grpo_gradient_checkpointing": args.grpo_gradient_checkpointing,
            "ladirl": {
                "trained_parameters": f"LaDiRLConfig.latent_policy_parameters='{args.latent_policy_parameters}'",
                "train_timestep_fraction": 1.0,
                "sde_noise_level": 0.7,
                "stop_head": "the trained model's own" if args.natural else
                "forced to continue: every trace has exactly `blocks` latent blocks",
                "weights": "trained LaDiR model (--natural)" if args.natural else
                "fresh LaDiRModel.from_base (untrained heads, velocity head N(0, 0.05); the cost of a step does not "
                "depend on them)",
            },
            "grpo_weights": "text-SFT model (--natural)" if args.natural else "the base model",
            "trainable_parameters": {"grpo": grpo_runner.trainable, "ladirl": ladirl_runner.trainable},
            "order": "warmup steps of each, then timed steps interleaved ABBA",
        },
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "rss_bytes": {"before_models": rss_empty, "both_trainers_built": rss_loaded,
                      "process_high_water_mark": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "summary": summaries,
        "ratio_ladirl_over_grpo": ratios,
        "steps": {"grpo": grpo_runner.records, "ladirl": ladirl_runner.records},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{'tiny' if args.tiny else model_name}{'_natural' if args.natural else ''}"
    output = Path(args.output) if args.output else RESULTS / f"vs_grpo_{name}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")

    g, l = summaries["grpo"], summaries["ladirl"]
    gib = 2**30
    rows = [
        ("step wall time (s)", g["wall_seconds"]["mean"], l["wall_seconds"]["mean"], ratios["wall_seconds"]),
        ("answers scored / s", g["answers_per_second"]["mean"], l["answers_per_second"]["mean"],
         ratios["answers_per_second"]),
        ("  generation (s)", g["generation_seconds"]["mean"], l["generation_seconds"]["mean"],
         ratios["generation_seconds"]),
        ("  scoring (s)", g["scoring_seconds"]["mean"], l["scoring_seconds"]["mean"], None),
        ("  loss + update (s)", g["loss_and_update_seconds"]["mean"], l["loss_and_update_seconds"]["mean"],
         ratios["loss_and_update_seconds"]),
        ("peak RSS in step (GiB)", g["rss_peak_bytes"]["mean"] / gib, l["rss_peak_bytes"]["mean"] / gib,
         ratios["rss_peak_bytes"]),
        ("RSS growth in step (GiB)", g["rss_growth_bytes_max"] / gib, l["rss_growth_bytes_max"] / gib,
         ratios["rss_growth_bytes_max"]),
        ("mean answer length (tok)", g["mean_answer_tokens"]["mean"], l["mean_answer_tokens"]["mean"],
         ratios["mean_answer_tokens"]),
    ]
    if "gpu_peak_bytes" in ratios:
        rows.insert(5, ("peak GPU memory (GiB)", g["gpu_peak_bytes"]["mean"] / gib, l["gpu_peak_bytes"]["mean"] / gib,
                        ratios["gpu_peak_bytes"]))
    if args.natural:
        shape = (f"GRPO from text SFT, C={args.grpo_max_completion_length}; LaDi-RL from LaDiR, answers <= "
                 f"{args.max_completion_length}, {l['latent_blocks/mean']['mean']:.2f} blocks (own stop head) x "
                 f"K={args.denoise_steps}, {args.latent_policy_parameters}")
    else:
        shape = f"C={args.max_completion_length}, {args.blocks} blocks x K={args.denoise_steps}"
    print(f"\n{model_name}: G={args.num_generations} vs N={args.num_latents} x M={args.num_decodes_per_latent}, "
          f"{shape}, {args.steps} timed steps each (means)")
    print(f"{'':26s} {'GRPO':>10s} {'LaDi-RL':>10s} {'LaDi/GRPO':>10s}")
    for name, grpo_value, ladirl_value, ratio in rows:
        ratio_text = f"{ratio:10.2f}" if ratio is not None else f"{'':10s}"
        print(f"{name:26s} {grpo_value:10.3f} {ladirl_value:10.3f} {ratio_text}")
    print(f"LaDi-RL logged split (s): denoising {l['time/denoising']['mean']:.3f}, decoding "
          f"{l['time/decoding']['mean']:.3f}, scoring {l['time/scoring']['mean']:.3f}")
    if "sampler_log_prob_gap" in l:
        print(f"LaDi-RL sampler_log_prob_gap (nats per denoising step; the first PPO ratio is within exp(+-gap) of 1): "
              f"mean {l['sampler_log_prob_gap']['mean']:.2e}, max {l['sampler_log_prob_gap']['max']:.2e}")
    print(f"load average: start {load_start}, end {load_end}; written {output}")


if __name__ == "__main__":
    main()
