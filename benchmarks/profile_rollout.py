"""Where a LaDi-RL rollout spends its time: `LaDiRPipeline.sample`, call by call and under `torch.profiler`.

1. Cold start: the wall time of the first `sample` call in the process and of the next ones, which do the same work
   (same shapes, same number of blocks), split into denoising and answer decoding.
2. A warm call under `torch.profiler`: the time in each of the model's step methods (`prefill`,
   `denoising_velocity`, `append_block`, `answer_step`, wrapped in `record_function` here) and the top operators.
3. Answer decoding against `transformers`' `generate`: the same rows and number of new tokens (no early stop), after a
   prefix of the same length (the prompt and the latent blocks for LaDiR; as many prompt tokens for `generate`),
   both sampling at temperature 1; time per answer token, the prefix's prefill left out.
4. Rows that stop early: the denoising time when the first half of the rows choose the answer after the first block
   (their stop logits are overwritten here) against every row writing every block, and the LM positions fed.

The LaDiR model is a fresh one from the base model (velocity head given random weights so that latents move; the stop
head forced), unless `--model_dir` gives a trained one. Times are reported, never asserted.

    python benchmarks/profile_rollout.py            # SmolLM2-135M, 8 rows, prompt 64 tokens, 3 blocks x K = 6
    python benchmarks/profile_rollout.py --tiny     # smoke run on a random 2-layer Llama (seconds)
"""

import argparse
import contextlib
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch
from machine import load_average, machine_info  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STEP_METHODS = ("prefill", "denoising_velocity", "append_block", "answer_step")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="A random 2-layer Llama and the test tokenizer.")
    parser.add_argument("--model_dir", default=None, help="A trained LaDiR model (default: fresh from SmolLM2-135M).")
    parser.add_argument("--rows", type=int, default=8, help="Latent traces sampled per call.")
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--denoise_steps", type=int, default=6)
    parser.add_argument("--answer_tokens", type=int, default=8, help="Answer tokens decoded per row (no early stop, >= 2).")
    parser.add_argument("--calls", type=int, default=4, help="Timed `sample` calls (the first is the cold one).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    return parser.parse_args()


def build_model(args, workdir: Path):
    from transformers import AutoTokenizer

    from trl_ladi import LaDiRModel
    from trl_ladi.modeling import ANSWER, CONTINUE

    torch.manual_seed(args.seed)
    if args.model_dir:
        model = LaDiRModel.from_pretrained(args.model_dir)
        return model.eval(), AutoTokenizer.from_pretrained(args.model_dir), args.model_dir
    if args.tiny:
        from trl_ladi.testing import make_tokenizer, tiny_causal_lm

        tokenizer = make_tokenizer()
        base_dir = workdir / "tiny-llama"
        tiny_causal_lm(tokenizer, seed=args.seed, hidden_size=64).save_pretrained(base_dir)
        kwargs = dict(latent_dim=16)
    else:
        from trl_ladi.default_model import default_model_path

        base_dir = default_model_path()
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        kwargs = {}
    model = LaDiRModel.from_base(str(base_dir), max_blocks=args.blocks, num_denoise_steps=args.denoise_steps, **kwargs)
    with torch.no_grad():
        model.velocity_head.linear.weight.normal_(std=0.02)  # zero at first: latents would not move
        model.stop_head.weight.zero_()  # always "another block"
        model.stop_head.bias[CONTINUE], model.stop_head.bias[ANSWER] = 1.0, -1.0
    return model.eval(), tokenizer, str(base_dir)


@contextlib.contextmanager
def labelled_step_methods(model):
    """Wrap the model's step methods in `record_function` ranges (and count their calls), for the profile."""
    counts = {name: 0 for name in STEP_METHODS}
    originals = {name: getattr(model, name) for name in STEP_METHODS}

    def wrap(name, method):
        def labelled(*positional, **keywords):
            counts[name] += 1
            with torch.profiler.record_function(f"LaDiRModel.{name}"):
                return method(*positional, **keywords)

        return labelled

    for name, method in originals.items():
        setattr(model, name, wrap(name, method))
    try:
        yield counts
    finally:
        for name in STEP_METHODS:
            delattr(model, name)  # the instance attribute goes; the class method is back


def sample_once(pipeline, prompt_ids, prompt_mask, args, generator_seed):
    generator = torch.Generator().manual_seed(generator_seed)
    start = time.perf_counter()
    samples = pipeline.sample(
        prompt_ids, prompt_mask, num_latents=1, sde_noise_level=0.7, max_blocks=args.blocks,
        num_denoise_steps=args.denoise_steps, max_new_tokens=args.answer_tokens, temperature=1.0,
        eos_token_ids=[], generator=generator,
    )
    return {
        "wall_s": time.perf_counter() - start,
        "denoise_s": samples.trace.denoise_seconds,
        "decode_s": samples.decode_seconds,
        "blocks": int(samples.trace.num_blocks.max()),
        "lm_positions": samples.trace.num_lm_tokens,
    }


def profile_warm_call(pipeline, prompt_ids, prompt_mask, args) -> dict:
    time_embeddings = []
    hook = pipeline.model.timestep_embedding.register_forward_hook(lambda *_: time_embeddings.append(1))
    with labelled_step_methods(pipeline.model) as counts, torch.profiler.profile() as profiler:
        sample_once(pipeline, prompt_ids, prompt_mask, args, generator_seed=args.seed)
    hook.remove()
    averages = profiler.key_averages()
    total_us = sum(event.self_cpu_time_total for event in averages)
    phases = {
        name: {"calls": counts[name], "cpu_s": next(e.cpu_time_total for e in averages if e.key == f"LaDiRModel.{name}") / 1e6}
        for name in STEP_METHODS if counts[name]
    }
    operators = sorted((e for e in averages if not e.key.startswith("LaDiRModel.")), key=lambda e: -e.self_cpu_time_total)
    top = [{"operator": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count,
            "share": e.self_cpu_time_total / total_us} for e in operators[:12]]
    # one per denoising step (input token and adaLN share it) and one per appended block
    return {"total_cpu_s": total_us / 1e6, "phases": phases, "top_operators": top,
            "timestep_embedding_calls": len(time_embeddings)}


def decode_vs_generate(model, pipeline, prompt_ids, prompt_mask, args) -> dict:
    """Time per answer token of `decode_answers` after the sampled blocks, against `generate` after a prompt as long.

    `decode_answers` starts from the cached context; `generate` also reads its prompt, so its per-token time is taken
    as (time for T new tokens - time for 1) / (T - 1), which leaves the prompt's prefill out."""
    context = model.prefill(prompt_ids, prompt_mask)
    pipeline.sample_latents(context, num_denoise_steps=args.denoise_steps, max_blocks=args.blocks)
    prefix_length = context.key_is_real.shape[1]
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    pipeline.decode_answers(context, max_new_tokens=args.answer_tokens, temperature=1.0, generator=generator)
    ladir_per_token = (time.perf_counter() - start) / args.answer_tokens

    vocab_size = model.config.text_config.vocab_size
    input_ids = torch.randint(vocab_size, (prompt_ids.shape[0], prefix_length))

    def generate_seconds(new_tokens):
        start = time.perf_counter()
        model.language_model.generate(
            input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
            top_k=0, top_p=1.0, pad_token_id=0,
        )
        return time.perf_counter() - start

    generate_seconds(args.answer_tokens)  # warm-up
    generate_per_token = (generate_seconds(args.answer_tokens) - generate_seconds(1)) / (args.answer_tokens - 1)
    return {"prefix_tokens": prefix_length, "answer_tokens": args.answer_tokens,
            "ladir_decode_s_per_token": ladir_per_token, "generate_s_per_token": generate_per_token,
            "ladir_over_generate": ladir_per_token / generate_per_token}


@contextlib.contextmanager
def first_half_stops_after_one_block(model):
    """The first half of the rows say "answer" at their first block; the others keep the stop head's choice."""
    from trl_ladi.modeling import ANSWER

    append_block = model.append_block

    def forced(context, latents, is_real):
        stop_logits = append_block(context, latents, is_real)
        if context.num_blocks == 1:
            stop_logits[: context.rows // 2, ANSWER] = stop_logits.max() + 1.0
        return stop_logits

    model.append_block = forced
    try:
        yield
    finally:
        del model.append_block


def early_stops(model, pipeline, prompt_ids, prompt_mask, args) -> dict:
    """Denoising time and LM positions with every row writing every block, and with half the rows stopping at one."""
    result = {}
    for name, forcing in (("every_row_every_block", None), ("half_stop_after_one_block", first_half_stops_after_one_block)):
        times = []
        for repeat in range(2):
            with forcing(model) if forcing else contextlib.nullcontext():
                context = model.prefill(prompt_ids, prompt_mask)
                start = time.perf_counter()
                trace = pipeline.sample_latents(context, num_denoise_steps=args.denoise_steps, max_blocks=args.blocks,
                                                sde_noise_level=0.7)
                times.append(time.perf_counter() - start)
        result[name] = {"denoise_s": min(times), "blocks_written": int(trace.block_mask.sum()),
                        "lm_positions": context.num_lm_tokens}
    result["time_ratio"] = result["half_stop_after_one_block"]["denoise_s"] / result["every_row_every_block"]["denoise_s"]
    return result


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    from trl_ladi import LaDiRPipeline

    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer, source = build_model(args, Path(workdir))
        pipeline = LaDiRPipeline(model, tokenizer)
        vocab_size = model.config.text_config.vocab_size
        prompt_ids = torch.randint(vocab_size, (args.rows, args.prompt_tokens))
        prompt_mask = torch.ones_like(prompt_ids)

        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine_info(), "load_average_start": load_average(), "model": Path(source).name,
                  "settings": {k: v for k, v in vars(args).items() if k != "output"}}
        calls = [sample_once(pipeline, prompt_ids, prompt_mask, args, generator_seed=args.seed + i) for i in range(args.calls)]
        report["calls"] = calls
        report["first_over_warm"] = calls[0]["wall_s"] / min(call["wall_s"] for call in calls[1:])
        report["profile"] = profile_warm_call(pipeline, prompt_ids, prompt_mask, args)
        report["decode_vs_generate"] = decode_vs_generate(model, pipeline, prompt_ids, prompt_mask, args)
        report["early_stops"] = early_stops(model, pipeline, prompt_ids, prompt_mask, args)
        report["load_average_end"] = load_average()

    name = "tiny" if args.tiny else Path(source).name
    output = Path(args.output) if args.output else RESULTS / f"profile_rollout_{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    for index, call in enumerate(calls):
        print(f"call {index + 1}: {call['wall_s']:.2f} s (denoise {call['denoise_s']:.2f}, decode {call['decode_s']:.2f})")
    print(f"first / fastest warm call: {report['first_over_warm']:.2f}")
    for name, phase in report["profile"]["phases"].items():
        print(f"{name}: {phase['calls']} calls, {phase['cpu_s']:.2f} s")
    for entry in report["profile"]["top_operators"][:8]:
        print(f"  {entry['operator']}: {entry['self_cpu_s']:.2f} s ({entry['share']:.0%}, {entry['calls']} calls)")
    print("decode vs generate (s per token):", json.dumps(report["decode_vs_generate"]))
    print("early stops:", json.dumps(report["early_stops"]))
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
