"""pass@k evaluation of token-level and latent-diffusion (LaDiR) models, its plot, and the `trl-ladi eval` command.

    from trl_ladi.evaluation import causal_lm_generate_fn, evaluate_pass_at_k
    from trl_ladi.rewards import math_accuracy_reward

    result = evaluate_pass_at_k(causal_lm_generate_fn(model, tokenizer), dataset, math_accuracy_reward, ks=(1, 4, 16),
                                num_samples=16)
    result["pass_at_k"]  # {1: 0.41, 4: 0.63, 16: 0.78}
"""

import argparse
import json
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import set_seed


__all__ = [
    "GenerationResult",
    "add_eval_arguments",
    "causal_lm_generate_fn",
    "eval_command",
    "evaluate_pass_at_k",
    "format_pass_at_k_table",
    "ladir_generate_fn",
    "pass_at_k",
    "plot_pass_at_k",
    "select_problems_with_a_gradient",
]

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from `n` samples of which `c` are correct (Chen et al., 2021).

    Equals `1 - C(n - c, k) / C(n, k)`, computed as a product so that it stays exact for large `n`.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}; sample at least k answers per problem.")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class GenerationResult:
    """What a `generate_fn(prompts, num_samples)` returns.

    Attributes:
        texts: Per prompt, its `num_samples` answers.
        latents: Per prompt, a `(num_latents, ...)` tensor of the latents the answers were decoded from (one row per
            answer when each latent is decoded once), or `None` for token-level models.
    """

    texts: list[list[str]]
    latents: list[torch.Tensor] | None = None


def causal_lm_generate_fn(model, tokenizer, max_new_tokens: int = 256, temperature: float = 1.0, batch_size: int = 8):
    """A `generate_fn` sampling a plain transformers causal LM (the token-level baseline).

    Prompts are tokenized exactly as the LaDiR models read them (`trl_ladi.modeling.tokenize_prompts`: conversations
    through the chat template with a generation prompt, plain prompts as they are, without added special tokens), so
    both sides of a pass@k comparison see the same tokens. `batch_size` prompts are sampled at once, `num_samples`
    sequences each.
    """
    from trl_ladi.modeling import tokenize_prompts

    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set `tokenizer.pad_token` before sampling.")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(prompts: list, num_samples: int) -> GenerationResult:
        model.eval()
        texts = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            # Left padding: generation continues from the right end of every row.
            input_ids, attention_mask = tokenize_prompts(
                tokenizer, batch, device=model.device, pad_token_id=pad_token_id
            )
            length = input_ids.shape[1]
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=pad_token_id,
            )
            decoded = tokenizer.batch_decode(sequences[:, length:], skip_special_tokens=True)
            texts.extend(decoded[i * num_samples : (i + 1) * num_samples] for i in range(len(batch)))
        return GenerationResult(texts=texts)

    return generate


def ladir_generate_fn(model, tokenizer, num_decodes_per_latent: int = 1, **sampling_kwargs):
    """A `generate_fn` sampling a LaDiR model: `num_samples // num_decodes_per_latent` latents per prompt, each
    decoded `num_decodes_per_latent` times. `sampling_kwargs` go to `LaDiRPipeline.sample_answers` (e.g.
    `max_new_tokens`, `temperature`, `sde_noise_level`)."""
    from trl_ladi.pipeline import LaDiRPipeline

    pipeline = LaDiRPipeline(model, tokenizer)

    def generate(prompts: list, num_samples: int) -> GenerationResult:
        if num_samples % num_decodes_per_latent:
            raise ValueError(
                f"num_samples={num_samples} is not a multiple of num_decodes_per_latent={num_decodes_per_latent}; "
                "choose num_samples = num_latents * num_decodes_per_latent."
            )
        num_latents = num_samples // num_decodes_per_latent
        out = pipeline.sample_answers(
            prompts,
            num_latents=num_latents,
            num_decodes_per_latent=num_decodes_per_latent,
            **sampling_kwargs,
        )
        texts = [list(out.texts[i * num_samples : (i + 1) * num_samples]) for i in range(len(prompts))]
        latents = [out.latents[i * num_latents : (i + 1) * num_latents] for i in range(len(prompts))]
        return GenerationResult(texts=texts, latents=latents)

    return generate


def _mean_pairwise_distance(latents: torch.Tensor) -> float | None:
    """Mean L2 distance over all pairs of latent rows; `None` with fewer than two."""
    if latents.shape[0] < 2:
        return None
    return torch.pdist(latents.detach().flatten(1).double().cpu()).mean().item()


def _reward_inputs(row: dict, answers: list[str]) -> dict:
    """The reward function's arguments, as TRL builds them: `prompts`, `completions` (conversational when the prompt
    is) and every other dataset column, repeated once per answer."""
    prompt = row["prompt"]
    conversational = not isinstance(prompt, str)
    completions = [[{"role": "assistant", "content": a}] for a in answers] if conversational else list(answers)
    columns = {name: [value] * len(answers) for name, value in row.items() if name != "prompt"}
    return {"prompts": [prompt] * len(answers), "completions": completions, **columns}


def evaluate_pass_at_k(
    generate_fn: Callable[[list, int], GenerationResult],
    dataset,
    reward_func: Callable,
    ks: Sequence[int] = (1, 2, 4, 8),
    num_samples: int = 8,
    batch_size: int = 8,
    show_progress: bool = True,
    answer_fn: Callable[[str], str | None] | None = None,
    seed: int | None = None,
    split_across_processes: bool = False,
) -> dict:
    """Samples `num_samples` answers per problem, scores them, and estimates pass@k.

    Args:
        generate_fn: `generate_fn(prompts, num_samples) -> GenerationResult` (see `causal_lm_generate_fn` and
            `ladir_generate_fn`).
        dataset: A `datasets.Dataset` or a list of dicts with a `prompt` column and the columns `reward_func` needs.
        reward_func: A TRL reward function; an answer is correct when its reward is at least 1.0. A `None` reward
            (unjudgeable) leaves the whole problem out of the pass@k averages.
        ks: The k values; each must be at most `num_samples`.
        num_samples: Answers sampled per problem (n).
        batch_size: Prompts given to `generate_fn` at once.
        show_progress: Show a tqdm progress bar.
        answer_fn: Maps an answer text to what counts as "the same answer" for `distinct_answers` (e.g.
            `rewards.math.extract_final_answer`); by default the stripped text.
        seed: When given, the random generators are seeded with `seed + b` before batch `b`, so every batch's samples
            are the same however the batches are run (one process or several).
        split_across_processes: Every process of a distributed run (`accelerate launch`) calls this function, samples
            every `num_processes`-th batch, and all of them get the whole result (gathered). With a `seed` the numbers
            are those of one process. `generate_fn` must use this process's copy of the model.

    Returns:
        A JSON-serialisable dict: `pass_at_k` ({k: mean over judged problems}), `num_problems`, `num_judged`,
        `num_samples`, `distinct_answers_mean`, `latent_diversity_mean` (`None` without latents),
        `frac_problems_mixed` (the share of judged problems with some but not all of their samples right: the share of
        prompts whose RL group of `num_samples` independent answers or latents would give a gradient, i.e.
        1 - `frac_reward_zero_std`), and `per_problem` (index, n, c, answers, rewards, pass_at_k, distinct_answers,
        latent_diversity).
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1 or ks[-1] > num_samples:
        raise ValueError(f"Every k must be between 1 and num_samples={num_samples}, got ks={ks}; raise num_samples.")
    rows = [dict(row) for row in dataset]
    if rows and "prompt" not in rows[0]:
        raise ValueError(f"The dataset needs a `prompt` column; it has the columns {sorted(rows[0])}.")
    answer_fn = answer_fn or str.strip

    starts = list(range(0, len(rows), batch_size))
    state = PartialState() if split_across_processes else None
    if state is not None:  # batch b goes to process b mod P
        starts = starts[state.process_index :: state.num_processes]
        show_progress = show_progress and state.is_main_process
    per_problem = []
    with tqdm(total=sum(len(rows[s : s + batch_size]) for s in starts), desc="pass@k", disable=not show_progress) as progress:
        for start in starts:
            batch = rows[start : start + batch_size]
            if seed is not None:
                set_seed(seed + start // batch_size)
            generation = generate_fn([row["prompt"] for row in batch], num_samples)
            if len(generation.texts) != len(batch) or any(len(t) != num_samples for t in generation.texts):
                raise ValueError(
                    f"generate_fn must return {num_samples} texts for each of the {len(batch)} prompts, got "
                    f"{[len(t) for t in generation.texts]}."
                )
            for offset, (row, answers) in enumerate(zip(batch, generation.texts)):
                rewards = list(reward_func(**_reward_inputs(row, answers)))
                judged = all(r is not None and not math.isnan(r) for r in rewards)
                correct = sum(1 for r in rewards if judged and r >= 1.0)
                latents = generation.latents[offset] if generation.latents is not None else None
                per_problem.append(
                    {
                        "index": start + offset,
                        "n": num_samples,
                        "c": correct,
                        "judged": judged,
                        "answers": answers,
                        "rewards": [None if r is None or math.isnan(r) else float(r) for r in rewards],
                        "pass_at_k": {k: pass_at_k(num_samples, correct, k) for k in ks} if judged else None,
                        "distinct_answers": len({answer_fn(a) for a in answers}),
                        "latent_diversity": _mean_pairwise_distance(latents) if latents is not None else None,
                    }
                )
            progress.update(len(batch))
    if state is not None and state.num_processes > 1:
        per_problem = sorted(gather_object(per_problem), key=lambda problem: problem["index"])

    judged_problems = [p for p in per_problem if p["judged"]]
    diversities = [p["latent_diversity"] for p in per_problem if p["latent_diversity"] is not None]
    return {
        "pass_at_k": {
            k: (sum(p["pass_at_k"][k] for p in judged_problems) / len(judged_problems) if judged_problems else None)
            for k in ks
        },
        "num_problems": len(per_problem),
        "num_judged": len(judged_problems),
        "num_samples": num_samples,
        "distinct_answers_mean": (
            sum(p["distinct_answers"] for p in per_problem) / len(per_problem) if per_problem else None
        ),
        "latent_diversity_mean": sum(diversities) / len(diversities) if diversities else None,
        "frac_problems_mixed": (
            sum(0 < p["c"] < p["n"] for p in judged_problems) / len(judged_problems) if judged_problems else None
        ),
        "per_problem": per_problem,
    }


def select_problems_with_a_gradient(generate_fn: Callable[[list, int], GenerationResult], dataset, reward_func: Callable,
                                    num_samples: int = 8, **eval_kwargs):
    """The problems of `dataset` whose `num_samples` sampled answers do not all score alike, and the screening result.

    A GRPO / LaDi-RL group whose rewards are all equal has zero advantage everywhere, so a prompt the model always
    or never solves gives no gradient (`frac_reward_zero_std`). Screening the training problems with the policy's own
    sampler before RL and keeping the others spends the rollouts where they can teach (offline difficulty filtering;
    DAPO's dynamic sampling does it online). The screen is one draw: a kept problem can still come out all alike in
    RL, a dropped one could have been mixed.

    Args:
        generate_fn: As for `evaluate_pass_at_k`; it should sample as the RL rollouts sample.
        dataset: As for `evaluate_pass_at_k`.
        reward_func: As for `evaluate_pass_at_k`: the reward the RL stage uses.
        num_samples: Answers sampled per problem (one per latent for a LaDiR `generate_fn`).
        eval_kwargs: Passed to `evaluate_pass_at_k` (`batch_size`, `seed`, `split_across_processes`, ...).

    Returns:
        `(kept, screen)`: `dataset` restricted to the kept problems (a `datasets.Dataset` stays one, keeping its
        order), and `evaluate_pass_at_k`'s result with `kept_indices` added.
    """
    screen = evaluate_pass_at_k(generate_fn, dataset, reward_func, ks=[1], num_samples=num_samples, **eval_kwargs)
    kept_indices = [
        problem["index"] for problem in screen["per_problem"]
        if problem["judged"] and min(problem["rewards"]) < max(problem["rewards"])
    ]
    screen["kept_indices"] = kept_indices
    if hasattr(dataset, "select"):
        return dataset.select(kept_indices), screen
    return [dataset[index] for index in kept_indices], screen


def format_pass_at_k_table(results: dict[str, dict]) -> str:
    """A plain-text table of pass@k, one row per model, one column per k (in %; `-` where a model has no value).

    `results` maps a model's label to an `evaluate_pass_at_k` result (its keys may be ints, or strings after a JSON
    round trip).
    """
    values = {name: {int(k): v for k, v in result["pass_at_k"].items()} for name, result in results.items()}
    ks = sorted({k for row in values.values() for k in row})
    width = max(len("model"), *(len(name) for name in results))
    lines = [f"{'model':<{width}}  " + "  ".join(f"{f'pass@{k}':>8}" for k in ks)]
    for name, row in values.items():
        cells = [row.get(k) for k in ks]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{'-':>8}" if v is None else f"{100 * v:>7.1f}%" for v in cells))
    return "\n".join(lines)


def plot_pass_at_k(results: dict[str, dict], path: str, title: str | None = None) -> str:
    """Draws the pass@k curves of one or more models (k on a log2 axis, pass@k in %) into a PNG at `path`.

    `results` maps a model's label to an `evaluate_pass_at_k` result (its keys may be ints, or strings after a JSON
    round trip). Uses matplotlib's Agg canvas directly, so the global backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    all_ks = set()
    for name, result in results.items():
        points = sorted((int(k), v) for k, v in result["pass_at_k"].items() if v is not None)
        all_ks.update(k for k, _ in points)
        axes.plot([k for k, _ in points], [100 * v for _, v in points], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(all_ks), labels=[str(k) for k in sorted(all_ks)])
    axes.set_xlabel("k")
    axes.set_ylabel("pass@k (%)")
    axes.set_title(textwrap.fill(title or "pass@k", width=60), fontsize="medium")  # long titles wrap, not cut
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    return path


def add_eval_arguments(parser: argparse.ArgumentParser):
    """The arguments of `trl-ladi eval`."""
    parser.add_argument("--model", nargs="+", required=True, help="LaDiR model or causal LM directories.")
    parser.add_argument("--name", nargs="+", help="A label per model (default: the directory names).")
    parser.add_argument(
        "--dataset",
        required=True,
        help="A data file (json, jsonl, csv, parquet), a `datasets.save_to_disk` folder (its test split), a Hub "
        "dataset when online, or a built-in math task (chain_sum, basic_arithmetic, gsm_symbolic).",
    )
    parser.add_argument("--reward", choices=("math", "code"), default="math")
    parser.add_argument("--num_samples", type=int, default=8, help="Answers sampled per problem (n).")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--num_examples", type=int, help="Evaluate the first N problems only.")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts sampled at once.")
    from trl_ladi.trainers.ladirl_config import LaDiRLConfig

    ladir = parser.add_argument_group("LaDiR models' sampler (causal LMs ignore these)")
    ladir.add_argument(
        "--sde_noise_level", type=float, default=LaDiRLConfig.sde_noise_level,
        help="Noise level of the denoising steps; the default is LaDiRLConfig's, with which LaDi-RL's rollouts and "
        "examples/math.py's evaluation sample; 0 is the deterministic sampler, which draws colder than the model's "
        "prior (docs/sft.md).",
    )
    ladir.add_argument("--num_denoise_steps", type=int, default=None, help="Steps per block (default: the model's).")
    ladir.add_argument(
        "--draw_slots_from_prior", action="store_true",
        help="A token-posterior model draws each slot's token from its prior: where its denoising steps end as they get "
        "small, in one step (docs/sft.md). The RL rollouts take the steps.",
    )
    ladir.add_argument(
        "--num_decodes_per_latent", type=int, default=1,
        help="Answers decoded from each sampled latent; 1 keeps the samples independent, as pass@k assumes.",
    )
    parser.add_argument("--output_dir", default="outputs/eval", help="Where pass_at_k.json and pass_at_k.png go.")
    parser.add_argument("--seed", type=int, default=0)


def _load_dataset(name_or_path: str, num_examples: int | None):
    """The evaluation problems: a built-in math task's test split, or the test split of any dataset
    `trl_ladi.data.load_user_dataset` reads (a data file counts as one split)."""
    from trl_ladi.data import MATH_TASKS, load_math_dataset, load_user_dataset

    if name_or_path in MATH_TASKS:
        return load_math_dataset(name_or_path, split="test", num_examples=num_examples)
    dataset = load_user_dataset(name_or_path, split="test")
    if num_examples is not None:
        dataset = dataset.select(range(min(num_examples, len(dataset))))
    return dataset


def _load_generate_fn(path: str, args) -> Callable:
    """A generate_fn for the model at `path`: LaDiR if its config says `model_type: ladir`, else a causal LM."""
    from transformers import AutoTokenizer

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--model {path!r} is not a model directory (no config.json).")
    with open(config_path) as config_file:
        model_type = json.load(config_file).get("model_type")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path)
    from trl_ladi.modeling import LaDiRModel, load_causal_lm

    if model_type == "ladir":
        model = LaDiRModel.from_pretrained(path).to(device).eval()
        return ladir_generate_fn(
            model,
            tokenizer,
            num_decodes_per_latent=args.num_decodes_per_latent,
            num_denoise_steps=args.num_denoise_steps,
            sde_noise_level=args.sde_noise_level,
            draw_slots_from_prior=args.draw_slots_from_prior,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
    model = load_causal_lm(path).to(device).eval()
    return causal_lm_generate_fn(
        model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=args.batch_size
    )


def eval_command(args) -> int:
    """`trl-ladi eval`: pass@k of each model on one dataset; writes pass_at_k.json and pass_at_k.png."""
    from transformers import set_seed

    from trl_ladi.rewards import code_execution_reward, math_accuracy_reward
    from trl_ladi.rewards.math import extract_final_answer

    names = args.name or [os.path.basename(os.path.normpath(path)) for path in args.model]
    if len(names) != len(args.model):
        raise ValueError(f"Got {len(args.model)} --model paths but {len(names)} --name labels; give one per model.")
    dataset = _load_dataset(args.dataset, args.num_examples)
    reward_func, answer_fn = {
        "math": (math_accuracy_reward, extract_final_answer),
        "code": (code_execution_reward, None),
    }[args.reward]

    from trl_ladi.cpu_memory import keep_freed_memory

    keep_freed_memory()  # on a CPU: reuse the memory a batch frees instead of mapping it afresh
    results = {}
    for name, path in zip(names, args.model):
        set_seed(args.seed)  # every model sees the same random stream
        results[name] = evaluate_pass_at_k(
            _load_generate_fn(path, args),
            dataset,
            reward_func,
            ks=args.ks,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            answer_fn=answer_fn,
        )

    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "pass_at_k.json")
    with open(json_path, "w") as json_file:
        config = {key: value for key, value in vars(args).items() if key != "run"}
        json.dump({"config": config, "results": results}, json_file, indent=2)
    png_path = os.path.join(args.output_dir, "pass_at_k.png")
    plot_pass_at_k(results, png_path, title=f"pass@k on {args.dataset}")

    print(format_pass_at_k_table(results))
    print(f"Wrote {json_path} and {png_path}")
    return 0
