"""The paper's Figure 1, measured here: LaDi-RL vs GRPO from one base model, one data set and one rollout budget.

    python benchmarks/reproduce.py                        # CPU preset: SmolLM2-135M, chain_sum (docs/reproduction.md)
    python benchmarks/reproduce.py --preset gpu           # Qwen2.5-0.5B-Instruct, 256 problems, on one GPU
    python benchmarks/reproduce.py --preset tiny          # a tiny random model, seconds: checks the script end to end
    python benchmarks/reproduce.py --preset gpu --print_config   # the settings a preset resolves to, then exit

Arm A (tokens):  base -> text SFT (TRL `SFTTrainer`: the reasoning as text, then `#### N`) -> TRL `GRPOTrainer`.
Arm B (latents): base -> LaDiR stages (VAE, then reasoner) -> `LaDiRLTrainer`, once per `--latent_policy_parameters`.

What is matched:
* the two supervised starts get the same wall-clock budget (`--sft_budget_seconds` each; the LaDiR recipe splits it
  between its VAE and reasoner stages, as benchmarks/ladir_quality.py does);
* the two RL stages get the same rollout budget: the same prompts per step, the same steps, and the same number of
  scored answers per prompt (GRPO samples `N x M` completions per prompt; LaDi-RL `N` latents, each decoded `M` times);
* every model is evaluated on the same held-out problems with the same number of samples per problem
  (`--num_samples`), pass@k for k = 1..num_samples with the unbiased estimator; a LaDiR model's samples are one answer
  per latent by default (`--eval_decodes_per_latent`), so that they are independent, as the estimator assumes.

Over RL training it records, per step: the mean reward, the share of prompts whose answers all scored the same
(`frac_reward_zero_std`: no gradient), GRPO's token entropy, and LaDi-RL's latent diversity and distinct answers per
prompt. Writes `<output_dir>/reproduce.json` and a Figure-1-style `<output_dir>/reproduce.png` (pass@1 bars, pass@k
curves).
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from ladir_quality import (  # benchmarks/ladir_quality.py: the two supervised recipes
    add_ladir_recipe_arguments,
    train_ladir,
    train_text_sft_start,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import GRPOConfig, GRPOTrainer

from trl_ladi import LaDiRLConfig, LaDiRLTrainer, LaDiRModel
from trl_ladi.baselines import WallClockBudgetCallback
from trl_ladi.data import load_math_dataset
from trl_ladi.default_model import default_model_path
from trl_ladi.evaluation import (
    causal_lm_generate_fn,
    evaluate_pass_at_k,
    format_pass_at_k_table,
    ladir_generate_fn,
)
from trl_ladi.rewards import math_accuracy_reward
from trl_ladi.rewards.math import extract_final_answer

# The LaDiR recipe of the main job: one latent slot per sentence token, written by the exact posterior of the LM's
# slot priors (velocity_parameterization="token_posterior"). Its reasoner reads a fixed codebook, not the VAE's
# encoder or decoder, so the VAE stage gets 1% of the budget (a few steps: it sets the codebook, the latent scale and
# the reasoner's input map) and the reasoner the rest (docs/reproduction.md, run 4).
LADIR_RECIPE = dict(
    token_aligned_latents=True, latent_tokens_per_block=16, velocity_parameterization="token_posterior",
    token_readout_temperature=0.7, initial_noise_scale=1.0, vae_decoder_lora_rank=16, vae_fraction=0.01,
    vae_learning_rate=2e-3, reasoner_learning_rate=1e-3, initial_latent_logvar=-4.0, latent_noise_std=0.3,
    token_substitution_prob=0.0, num_denoise_steps=6,
)

PRESETS = {
    # 2 CPU cores: sized from the measured costs in docs/reproduction.md. LaDi-RL samples 8 latents x 1 decode: the
    # decodes of a chain_sum latent agreed in every RL step of run 4, so a second decode scores a copy. The RL
    # learning rates are run 6's picks on training-split problems (tune_rl_learning_rates.py).
    "cpu": dict(
        model_name_or_path=None, num_train_examples=2048, num_test_examples=64, num_samples=16,
        sft_budget_seconds=480, rl_steps=20, prompts_per_step=2, num_latents=8, num_decodes_per_latent=1,
        grpo_learning_rate=1.25e-6, ladirl_learning_rate=1.25e-4, max_new_tokens=48, eval_batch_size=8,
    ),
    # one GPU (written for an H200, not run yet): a 0.5B model, 256 held-out problems; RL learning rates: TRL's
    # default for GRPO, the CPU preset's pick for LaDi-RL (tune both with tune_rl_learning_rates.py before a report)
    "gpu": dict(
        model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct", num_train_examples=8192, num_test_examples=256,
        num_samples=16, sft_budget_seconds=1200, rl_steps=100, prompts_per_step=16, num_latents=8,
        num_decodes_per_latent=4, grpo_learning_rate=1e-6, ladirl_learning_rate=1.25e-4, max_new_tokens=128,
        eval_batch_size=32, batch_size=32, lora_rank=64, reasoner_learning_rate=5e-4,
        latent_tokens_per_block=24,  # Qwen2.5 writes numbers digit by digit: longer sentences than SmolLM2's
    ),
    # a tiny random model: the whole pipeline in seconds (the CI smoke test)
    "tiny": dict(
        model_name_or_path="tiny", num_train_examples=16, num_test_examples=4, num_samples=4, sft_budget_seconds=0.1,
        rl_steps=1, prompts_per_step=2, num_latents=2, num_decodes_per_latent=2, grpo_learning_rate=1e-5,
        ladirl_learning_rate=1e-3, max_new_tokens=4, eval_batch_size=4, batch_size=4, latent_dim=8,
        latent_tokens_per_block=8, lora_rank=4, max_blocks=2, num_denoise_steps=2,
    ),
}


def parse_args(argv=None):
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    preset = preset_parser.parse_known_args(argv)[0].preset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="Defaults for the flags below.")
    parser.add_argument("--print_config", action="store_true", help="Print the resolved settings and exit.")
    parser.add_argument("--model_name_or_path", help="Base causal LM; 'tiny' builds a tiny random Llama.")
    parser.add_argument("--dataset_name", default="chain_sum")
    parser.add_argument("--num_train_examples", type=int)
    parser.add_argument("--num_test_examples", type=int, help="Held-out problems every model is evaluated on.")
    parser.add_argument("--num_samples", type=int, help="Answers per problem; pass@k for k = 1..num_samples.")
    parser.add_argument("--eval_decodes_per_latent", type=int, default=1,
                        help="Answers per sampled latent in the evaluation (1: independent samples, as pass@k's "
                             "estimator assumes; a chain_sum latent's decodes agree, docs/reproduction.md).")
    parser.add_argument("--eval_batch_size", type=int, help="Problems sampled at once.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/reproduce")
    parser.add_argument("--start_dir",
                        help="The --output_dir of an earlier run: take its two supervised starts (text-sft/, ladir/) "
                             "instead of training them, e.g. to rerun RL at other settings. Its settings must match.")
    parser.add_argument("--reevaluate_starts", action="store_true",
                        help="With --start_dir: evaluate base, text SFT and LaDiR again. By default their pass@k is "
                             "taken from that run when it was evaluated with the same settings (the same models, "
                             "problems and seed give the same samples).")
    # the supervised starts
    parser.add_argument("--sft_budget_seconds", type=float, help="Wall-clock training time of each supervised start.")
    parser.add_argument("--text_sft_learning_rate", type=float, default=5e-5)
    parser.add_argument("--batch_size", type=int, default=8, help="Batch size of the supervised starts.")
    add_ladir_recipe_arguments(parser)
    parser.set_defaults(**LADIR_RECIPE)
    # RL, with the same rollout budget on both sides
    parser.add_argument("--rl_steps", type=int, help="Optimizer steps of GRPO and of each LaDi-RL run.")
    parser.add_argument("--prompts_per_step", type=int, help="Prompts per RL step (both arms).")
    parser.add_argument("--num_latents", type=int, help="N: latents per prompt (LaDi-RL).")
    parser.add_argument("--num_decodes_per_latent", type=int, help="M: answers per latent; GRPO samples N x M.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="Both arms score each step's prompts in this many micro-batches (one rollout, one "
                             "optimizer step): the same update in less memory. 8 prompts x 8 answers on the cpu preset "
                             "need 4 on a 24 GiB machine.")
    parser.add_argument("--grpo_learning_rate", type=float)
    parser.add_argument("--ladirl_learning_rate", type=float)
    parser.add_argument("--latent_kl_beta", type=float, default=0.0,
                        help="LaDi-RL's KL to the start's denoiser (`LaDiRLConfig.latent_kl_beta`): its trust region, "
                             "since one optimizer step per rollout batch leaves the clipped ratio at 1.")
    parser.add_argument("--latent_policy_parameters", nargs="+", default=["denoiser_adapter"],
                        help="One LaDi-RL run (and evaluated model) per value, all from the same LaDiR start "
                             "('velocity_head' needs --velocity_parameterization direct: a token posterior has no head).")
    parser.add_argument("--sde_noise_level", type=float, default=0.7)
    parser.add_argument("--eval_draw_slots_from_prior", action="store_true",
                        help="The LaDiR models' evaluation draws each slot's token from its prior (where the denoising "
                             "steps end as they get small) instead of taking the steps; RL's rollouts take them.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature of every model.")
    parser.add_argument("--max_new_tokens", type=int, help="Of the text models' worked solutions.")
    parser.add_argument("--max_answer_tokens", type=int, default=16, help="Of the LaDiR models' answers.")
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.eval_decodes_per_latent < 1 or args.num_samples % args.eval_decodes_per_latent:
        parser.error(f"--num_samples {args.num_samples} must be a multiple of --eval_decodes_per_latent "
                     f"{args.eval_decodes_per_latent} (LaDiR samples = latents x decodes per latent).")
    if args.latent_kl_beta < 0:  # fail before the starts' training, not after it
        parser.error(f"--latent_kl_beta must be >= 0, got {args.latent_kl_beta}.")
    if args.gradient_accumulation_steps < 1 or args.prompts_per_step % args.gradient_accumulation_steps:
        parser.error(f"--prompts_per_step {args.prompts_per_step} must be a multiple of --gradient_accumulation_steps "
                     f"{args.gradient_accumulation_steps} (each micro-batch holds whole prompts: a prompt's answers "
                     "are normalised together).")
    return args


def base_model_and_tokenizer(args):
    """The base model's folder and tokenizer; `tiny` saves a tiny random Llama and its word-level tokenizer."""
    if args.model_name_or_path == "tiny":
        from trl_ladi.testing import make_tokenizer, tiny_causal_lm

        tokenizer = make_tokenizer()
        path = os.path.join(args.output_dir, "tiny-base")
        tiny_causal_lm(tokenizer, seed=args.seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        path = args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return path, tokenizer


def common_training_args(args) -> dict:
    on_gpu = torch.cuda.is_available()
    return dict(logging_steps=1, save_strategy="no", report_to="none", use_cpu=not on_gpu, bf16=on_gpu, seed=args.seed)


def training_curve(trainer, keys) -> dict:
    """Per-step values of the logged metrics `keys` (those the trainer logged)."""
    steps = [entry for entry in trainer.state.log_history if "step" in entry and "train_runtime" not in entry]
    return {key: [entry.get(key) for entry in steps] for key in keys if any(key in entry for entry in steps)}


def rl_budget(args) -> dict:
    """The rollout budget both arms get."""
    answers_per_prompt = args.num_latents * args.num_decodes_per_latent
    return dict(prompts_per_step=args.prompts_per_step, steps=args.rl_steps, answers_per_prompt=answers_per_prompt,
                scored_answers=args.rl_steps * args.prompts_per_step * answers_per_prompt)


def evaluate(name, generate_fn, test, args, report, earlier=None):
    """pass@k of `generate_fn` on `test` into `report`; or, if `earlier` (a report of the same evaluation settings)
    has `name`, its result: evaluating a model again with the same seed gives the same samples."""
    if earlier is not None and name in earlier["models"]:
        result = earlier["models"][name]
        pass_at_k = {int(k): v for k, v in result["pass_at_k"].items()}  # JSON made the keys strings
        report["models"][name] = {**result, "pass_at_k": pass_at_k}
        print(f"{name}: pass@k taken from --start_dir (--reevaluate_starts to sample it again)", flush=True)
        return
    set_seed(args.seed)  # every model sees the same random stream
    start = time.perf_counter()
    result = evaluate_pass_at_k(
        generate_fn, test, math_accuracy_reward, ks=range(1, args.num_samples + 1), num_samples=args.num_samples,
        batch_size=args.eval_batch_size, answer_fn=lambda text: extract_final_answer(text) or text.strip(),
    )
    result.pop("per_problem")
    report["models"][name] = result
    report["timings"][f"eval {name}"] = time.perf_counter() - start
    print(f"{name}: pass@1 {100 * result['pass_at_k'][1]:.1f}%, pass@{args.num_samples} "
          f"{100 * result['pass_at_k'][args.num_samples]:.1f}%", flush=True)


def text_generate_fn(model, tokenizer, args):
    return causal_lm_generate_fn(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 batch_size=args.eval_batch_size)


def latent_generate_fn(model, tokenizer, args):
    return ladir_generate_fn(
        model.eval(), tokenizer, num_decodes_per_latent=args.eval_decodes_per_latent,
        num_denoise_steps=args.num_denoise_steps, sde_noise_level=args.sde_noise_level,
        draw_slots_from_prior=args.eval_draw_slots_from_prior,
        temperature=args.temperature, max_new_tokens=args.max_answer_tokens,
    )


def train_grpo(args, model, tokenizer, train, learning_rate: float, output_dir: str, callbacks=None, **overrides):
    """TRL `GRPOTrainer` on `model` (trained in place) with `N x M` completions per prompt; returns the trainer.
    `overrides`: other `GRPOConfig` fields."""
    answers_per_prompt = args.num_latents * args.num_decodes_per_latent
    grpo_args = GRPOConfig(
        output_dir=output_dir, max_steps=args.rl_steps,
        per_device_train_batch_size=args.prompts_per_step // args.gradient_accumulation_steps * answers_per_prompt,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_generations=answers_per_prompt,
        max_completion_length=args.max_new_tokens, temperature=args.temperature,
        learning_rate=learning_rate, beta=0.0, **{**common_training_args(args), **overrides},
    )
    trainer = GRPOTrainer(model=model, reward_funcs=math_accuracy_reward, args=grpo_args, train_dataset=train,
                          processing_class=tokenizer, callbacks=callbacks)
    trainer.train()
    return trainer


def train_ladirl(args, model, tokenizer, train, policy: str, learning_rate: float, output_dir: str, callbacks=None,
                 **overrides):
    """`LaDiRLTrainer` on `model` (trained in place) with `N` latents x `M` decodes per prompt; returns the trainer.
    `overrides`: other `LaDiRLConfig` fields."""
    rl_args = LaDiRLConfig(
        output_dir=output_dir, max_steps=args.rl_steps,
        per_device_train_batch_size=args.prompts_per_step // args.gradient_accumulation_steps * args.num_latents,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_generations=args.num_latents,
        num_decodes_per_latent=args.num_decodes_per_latent, max_completion_length=args.max_answer_tokens,
        temperature=args.temperature, num_denoise_steps=args.num_denoise_steps,
        sde_noise_level=args.sde_noise_level, train_timestep_fraction=0.5, learning_rate=learning_rate,
        latent_policy_parameters=policy, **{**common_training_args(args), **overrides},
    )
    trainer = LaDiRLTrainer(model=model, reward_funcs=math_accuracy_reward, args=rl_args, train_dataset=train,
                            processing_class=tokenizer, callbacks=callbacks)
    trainer.train()
    return trainer


GRPO_CURVES = ("reward", "frac_reward_zero_std", "entropy")
LADIRL_CURVES = ("reward", "frac_reward_zero_std", "latent_diversity", "distinct_answers_per_prompt")


# The settings that decide what the two supervised starts are: `--start_dir` reuses starts only when these match.
START_SETTINGS = (
    "model_name_or_path", "dataset_name", "num_train_examples", "seed", "sft_budget_seconds", "batch_size",
    "text_sft_learning_rate", "decay_learning_rate", "latent_dim", "lora_rank", "max_blocks", "causal_denoiser",
    "timestep_shift", "flow_timestep_shift", "max_steps_per_stage", "slot_token_weight", "stop_weight", "stop_readout",
    *(name for name in LADIR_RECIPE if name != "num_denoise_steps"),
)


def read_start_dir(start_dir: str) -> dict:
    """The report of the finished run in `start_dir`, after checking that the folder holds its two supervised starts."""
    report_path = os.path.join(start_dir, "reproduce.json")
    missing = [path for path in (report_path, *(os.path.join(start_dir, name, "config.json")
                                                for name in ("text-sft", "ladir"))) if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"--start_dir {start_dir}: missing {', '.join(missing)}. Give the --output_dir of a finished reproduce.py "
            "run (it saves text-sft/, ladir/ and reproduce.json there)."
        )
    with open(report_path) as f:
        return json.load(f)


def start_folders_and_tokenizer(start_dir: str):
    """The text SFT and LaDiR folders of the finished run in `start_dir`, and their tokenizer (left padding)."""
    sft_dir, ladir_dir = os.path.join(start_dir, "text-sft"), os.path.join(start_dir, "ladir")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return sft_dir, ladir_dir, tokenizer


# The settings that decide a model's evaluation samples, beside the model itself and START_SETTINGS.
EVAL_SETTINGS = (
    "num_test_examples", "num_samples", "eval_decodes_per_latent", "eval_batch_size", "temperature", "max_new_tokens",
    "max_answer_tokens", "sde_noise_level", "num_denoise_steps",
)


def check_start_settings(previous: dict, args):
    """Reusing starts must change nothing but the time: refuse them if they were trained with other settings."""
    mismatched = {name: (previous["settings"].get(name), getattr(args, name)) for name in START_SETTINGS
                  if previous["settings"].get(name) != getattr(args, name)}
    if mismatched:
        listed = "; ".join(f"--{name}: {old!r} there, {new!r} here" for name, (old, new) in mismatched.items())
        raise ValueError(
            f"--start_dir {args.start_dir} was trained with other settings ({listed}). Pass the same flags (and "
            "--preset) as that run, or drop --start_dir to train new starts."
        )


def token_arm(args, base, tokenizer, train, test, report, earlier=None):
    """Arm A: text SFT, then GRPO with N x M completions per prompt (`earlier`: see `evaluate`)."""
    if args.start_dir:
        sft_dir = os.path.join(args.start_dir, "text-sft")
    else:
        start = time.perf_counter()
        sft_dir = train_text_sft_start(
            args, base, tokenizer, train, WallClockBudgetCallback(args.sft_budget_seconds, args.decay_learning_rate)
        )
        report["timings"]["train text SFT"] = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    evaluate("text SFT", text_generate_fn(model, tokenizer, args), test, args, report, earlier)

    start = time.perf_counter()
    trainer = train_grpo(args, model, tokenizer, train, args.grpo_learning_rate, os.path.join(args.output_dir, "grpo"))
    report["timings"]["train GRPO"] = time.perf_counter() - start
    report["training"]["GRPO"] = training_curve(trainer, GRPO_CURVES)
    evaluate("GRPO", text_generate_fn(model.eval(), tokenizer, args), test, args, report)


def latent_arm(args, base, tokenizer, train, test, report, earlier=None):
    """Arm B: the LaDiR stages, then LaDi-RL with N latents x M decodes per prompt, once per policy choice."""
    if args.start_dir:
        ladir_dir = os.path.join(args.start_dir, "ladir")
        model = LaDiRModel.from_pretrained(ladir_dir)
    else:
        start = time.perf_counter()
        model, stage_steps = train_ladir(
            argparse.Namespace(**{**vars(args), "budget_seconds": args.sft_budget_seconds}), base, tokenizer, train
        )
        report["timings"]["train LaDiR"] = time.perf_counter() - start
        report["ladir_stage_steps"] = stage_steps
        ladir_dir = os.path.join(args.output_dir, "ladir")
        model.save_pretrained(ladir_dir)
    evaluate("LaDiR", latent_generate_fn(model, tokenizer, args), test, args, report, earlier)

    for policy in args.latent_policy_parameters:
        name = f"LaDi-RL ({policy})"
        if args.latent_kl_beta:
            name = f"LaDi-RL ({policy}, latent_kl_beta {args.latent_kl_beta:g})"
        model = LaDiRModel.from_pretrained(ladir_dir)  # every run starts from the same LaDiR model
        start = time.perf_counter()
        trainer = train_ladirl(args, model, tokenizer, train, policy, args.ladirl_learning_rate,
                               os.path.join(args.output_dir, f"ladirl-{policy}"), latent_kl_beta=args.latent_kl_beta)
        report["timings"][f"train {name}"] = time.perf_counter() - start
        curves = LADIRL_CURVES + (("latent_kl",) if args.latent_kl_beta else ())
        report["training"][name] = training_curve(trainer, curves)
        evaluate(name, latent_generate_fn(model, tokenizer, args), test, args, report)


def plot(report, path, title):
    """Figure 1's layout: pass@1 of every model as bars, and the pass@k curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    bars, curves = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    names = list(report["models"])
    pass_at_1 = [100 * report["models"][name]["pass_at_k"][1] for name in names]
    colors = [f"C{i}" for i in range(len(names))]
    bars.bar(range(len(names)), pass_at_1, color=colors)
    for x, value in enumerate(pass_at_1):
        bars.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    bars.set_xticks(range(len(names)), labels=names, rotation=30, ha="right", fontsize=8)
    bars.set_ylim(0, max(pass_at_1 + [1.0]) * 1.15)
    bars.set_ylabel("pass@1 (%)")
    bars.set_title("pass@1")
    for name, color in zip(names, colors):
        points = sorted(report["models"][name]["pass_at_k"].items())
        curves.plot([k for k, _ in points], [100 * v for _, v in points], marker="o", markersize=3, color=color,
                    label=name)
    curves.set_ylim(bottom=0)
    curves.set_xscale("log", base=2)
    ks = sorted(report["models"][names[0]]["pass_at_k"])
    curves.set_xticks(ks, labels=[str(k) for k in ks], fontsize=7)
    curves.set_xlabel("k")
    curves.set_ylabel("pass@k (%)")
    curves.set_title("pass@k")
    curves.grid(True, alpha=0.3)
    curves.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=150)


def main(argv=None):
    args = parse_args(argv)
    if args.print_config:
        print(json.dumps(vars(args), indent=2))
        return None
    previous = earlier_evaluations = None
    if args.start_dir:
        previous = read_start_dir(args.start_dir)
        check_start_settings(previous, args)
        if not args.reevaluate_starts and all(previous["settings"].get(name) == getattr(args, name)
                                              for name in EVAL_SETTINGS):
            earlier_evaluations = previous
    os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    started = time.perf_counter()
    base, tokenizer = base_model_and_tokenizer(args)
    options = dict(seed=args.seed, conversational=False, instruction=None)
    train = load_math_dataset(args.dataset_name, "train", args.num_train_examples, **options)
    test = load_math_dataset(args.dataset_name, "test", args.num_test_examples, **options)
    report = {"settings": {**vars(args), "output_dir": "<output_dir>",
                           "start_dir": args.start_dir and "<start_dir>"}, "rl_budget": rl_budget(args), "models": {},
              "training": {}, "timings": {}}
    if previous is not None:  # the starts' training, from the run that trained them
        report["start_dir"] = {"timings": {key: value for key, value in previous["timings"].items()
                                           if key in ("train text SFT", "train LaDiR")},
                               "ladir_stage_steps": previous.get("ladir_stage_steps"),
                               "evaluations_reused": earlier_evaluations is not None}

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    evaluate("base", text_generate_fn(base_model, tokenizer, args), test, args, report, earlier_evaluations)
    del base_model
    token_arm(args, base, tokenizer, train, test, report, earlier_evaluations)
    latent_arm(args, base, tokenizer, train, test, report, earlier_evaluations)
    report["timings"]["total"] = time.perf_counter() - started

    json_path = os.path.join(args.output_dir, "reproduce.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    png_path = os.path.join(args.output_dir, "reproduce.png")
    model_name = os.path.basename(str(base).rstrip("/"))
    plot(report, png_path, f"{model_name}, {args.dataset_name}: {len(test)} held-out problems, "
                           f"{args.num_samples} samples each; RL: {report['rl_budget']['scored_answers']} scored answers")
    print(format_pass_at_k_table(report["models"]))
    print(json.dumps(report["timings"], indent=2))
    print(f"Wrote {json_path} and {png_path}")
    return report


if __name__ == "__main__":
    main()
