"""What the key/value cache saves when denoising latent blocks: `LaDiRPipeline.sample` against an uncached reference.

* cached (`LaDiRPipeline.sample`, over the model's cached step methods): the prompt is prefilled once; each
  denoising step feeds only the `L + 2` positions of the noisy block against the cache (cut back afterwards); a
  finished block is appended once (`L + 3` positions) and its `<eot>` gives the stop decision.
* uncached reference (here): every denoising step runs `model._packed_forward` over the prompt + the finished
  blocks + the noisy block, i.e. recomputes the whole prefix each step. The stop decision of block `b` comes from
  the first forward of block `b + 1` (its clean blocks are in that forward), and one last forward gives the last
  block's.

Both use deterministic Euler steps (`sde_noise_level=0`) from the same initial noise, so they must produce the same
latents: the largest difference is reported as a check. The velocity head is given random weights (it starts at
zero, which would leave the latents unchanged) and the stop head always says "another block", so every row writes
exactly `--blocks` blocks; neither changes the cost. Measured: wall time of the denoising part (`trace.denoise_seconds`:
prefill + steps + appended blocks; the answer decode is limited to one token and not counted) and the LM positions
fed (`trace.num_lm_tokens` minus the one decoded token per row; the uncached count is summed per forward).
Timings are reported, never asserted.

    python benchmarks/bench_denoise_cache.py           # SmolLM2-135M, batch 8, prompt 128 tokens, K=10, 3 blocks
    python benchmarks/bench_denoise_cache.py --tiny    # smoke run on a random 2-layer Llama
"""

import argparse
import datetime
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from machine import load_average, machine_info  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def build_model(args, workdir: Path):
    from transformers import AutoTokenizer

    from trl_ladi import LaDiRModel
    from trl_ladi.modeling import ANSWER, CONTINUE

    if args.tiny:
        from trl_ladi.testing import make_tokenizer, tiny_causal_lm

        tokenizer = make_tokenizer()
        base = tiny_causal_lm(tokenizer, seed=args.seed, hidden_size=64)
        model_dir, name = workdir / "tiny-llama", "tiny-llama"
        base.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        model_dir = str(model_dir)
    elif args.model:
        model_dir, name = args.model, Path(args.model).name
    else:
        from trl_ladi.default_model import default_model_path

        model_dir, name = default_model_path(), "SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(args.seed)
    model = LaDiRModel.from_base(model_dir, latent_dim=16 if args.tiny else 128).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.velocity_head.linear.weight, std=0.1)  # zero-initialised: make z move
        model.stop_head.weight.zero_()
        model.stop_head.bias[CONTINUE], model.stop_head.bias[ANSWER] = 1.0, -1.0
    return model, tokenizer, name


def make_prompts(tokenizer, batch: int, length: int, seed: int, vocab_size: int) -> torch.Tensor:
    """`batch` prompts of exactly `length` tokens: chain_sum questions run together, each row from another start.
    (Ids the model has no embedding for, which only the tiny word-level tokenizer produces, become its unk id.)"""
    from trl_ladi.data import load_math_dataset

    dataset = load_math_dataset("chain_sum", split="train", num_examples=64, seed=seed, conversational=False)
    rows = []
    for row in range(batch):
        ids = []
        index = row * 7
        while len(ids) < length:
            ids += tokenizer(dataset[index % len(dataset)]["prompt"] + "\n", add_special_tokens=False)["input_ids"]
            index += 1
        unknown = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
        rows.append([i if i < vocab_size else unknown for i in ids[:length]])
    return torch.tensor(rows)


@torch.no_grad()
def uncached_denoise(model, prompt_ids, prompt_mask, num_steps, num_blocks, generator):
    """The reference: every step recomputes prompt + finished blocks + the noisy block with `_packed_forward`."""
    from trl_ladi import sampling

    config = model.config
    rows, prompt_length = prompt_ids.shape
    num_latent_tokens, latent_dim = config.latent_tokens_per_block, config.latent_dim
    layout = model.block_layout
    timesteps = sampling.flow_matching_timesteps(num_steps, config.timestep_shift)
    clean, stop_logits, fed = [], None, 0
    start = time.perf_counter()
    for block in range(num_blocks):
        z = config.initial_noise_scale * torch.randn(rows, num_latent_tokens, latent_dim, generator=generator)
        for step in range(num_steps):
            t, t_next = timesteps[step].expand(rows), timesteps[step + 1].expand(rows)
            if clean:
                latents, block_mask = torch.stack(clean, 1), torch.ones(rows, block, dtype=torch.bool)
            else:  # `_packed_forward` needs a clean block: a masked-out placeholder (nothing attends to it)
                latents = torch.zeros(rows, 1, num_latent_tokens, latent_dim)
                block_mask = torch.zeros(rows, 1, dtype=torch.bool)
            outputs = model._packed_forward(
                prompt_ids, prompt_mask, latents, block_mask,
                noisy_latents=z[:, None], noisy_timesteps=t[:, None],
                noisy_block_index=torch.full((rows, 1), block, dtype=torch.long),
            )
            fed += rows * (prompt_length + latents.shape[1] * layout.width + layout.noisy_width)
            if step == 0 and block > 0:
                stop_logits = outputs["stop_logits"][:, -1]  # the previous block's decision
            z = sampling.sde_step(z, outputs["velocity"][:, 0], t, t_next, 0.0).sample
        clean.append(z)
    outputs = model._packed_forward(prompt_ids, prompt_mask, torch.stack(clean, 1), torch.ones(rows, num_blocks, dtype=torch.bool))
    fed += rows * (prompt_length + num_blocks * layout.width)
    stop_logits = outputs["stop_logits"][:, -1]
    seconds = time.perf_counter() - start
    return torch.stack(clean, 1), fed, seconds, stop_logits


@torch.no_grad()
def cached_denoise(model, prompt_ids, prompt_mask, num_steps, num_blocks, seed, eos_token_id, pad_token_id):
    from trl_ladi import LaDiRPipeline

    generator = torch.Generator().manual_seed(seed)
    samples = LaDiRPipeline(model).sample(
        prompt_ids, prompt_mask, num_latents=1, num_denoise_steps=num_steps, sde_noise_level=0.0,
        max_blocks=num_blocks, num_decodes_per_latent=1, max_new_tokens=1, eos_token_ids=[eos_token_id],
        pad_token_id=pad_token_id, generator=generator,
    )
    trace = samples.trace
    decode_tokens = prompt_ids.shape[0]  # one decoded token per row
    return trace.latents, trace.num_lm_tokens - decode_tokens, trace.denoise_seconds, int(trace.num_blocks.min())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="quick smoke run on a random tiny Llama")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--denoise_steps", type=int, default=10, help="K")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file (default: benchmarks/results/denoise_cache_<model>.json)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    print(f"load average at start: {load_start}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, model_name = build_model(args, Path(tmp))
    prompt_ids = make_prompts(
        tokenizer, args.batch, args.prompt_tokens, args.seed, model.language_model.get_input_embeddings().num_embeddings)
    prompt_mask = torch.ones_like(prompt_ids)
    config = model.config
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    # warm-up (one block, two steps), then cached, uncached, cached
    cached_denoise(model, prompt_ids, prompt_mask, 2, 1, args.seed, eos, pad)
    runs = {"cached": [], "uncached": []}
    cached_latents, cached_tokens, seconds, blocks_written = cached_denoise(
        model, prompt_ids, prompt_mask, args.denoise_steps, args.blocks, args.seed, eos, pad)
    runs["cached"].append(seconds)
    print(f"  cached:   {seconds:8.2f} s, {cached_tokens} LM positions fed", flush=True)
    uncached_latents, uncached_tokens, seconds, _ = uncached_denoise(
        model, prompt_ids, prompt_mask, args.denoise_steps, args.blocks, torch.Generator().manual_seed(args.seed))
    runs["uncached"].append(seconds)
    print(f"  uncached: {seconds:8.2f} s, {uncached_tokens} LM positions fed", flush=True)
    _, _, seconds, _ = cached_denoise(model, prompt_ids, prompt_mask, args.denoise_steps, args.blocks, args.seed, eos, pad)
    runs["cached"].append(seconds)
    print(f"  cached:   {seconds:8.2f} s", flush=True)
    load_end = load_average()
    print(f"load average at end: {load_end}", flush=True)

    max_difference = (cached_latents - uncached_latents).abs().max().item()
    latent_scale = uncached_latents.abs().max().item()
    cached_seconds = sum(runs["cached"]) / len(runs["cached"])
    uncached_seconds = runs["uncached"][0]
    layout = model.block_layout
    expected_cached = args.batch * (
        args.prompt_tokens + args.blocks * (args.denoise_steps * layout.noisy_width + layout.width))
    result = {
        "benchmark": "bench_denoise_cache",
        "date": started.isoformat(timespec="seconds"),
        "model": model_name,
        "settings": {
            "batch": args.batch,
            "prompt_tokens": args.prompt_tokens,
            "denoise_steps": args.denoise_steps,
            "blocks": args.blocks,
            "blocks_written": blocks_written,
            "latent_tokens_per_block": config.latent_tokens_per_block,
            "latent_dim": config.latent_dim,
            "sde_noise_level": 0.0,
            "dtype": "float32",
            "device": "cpu",
            "attention": model.language_model.config._attn_implementation,
            "timed": "prefill + denoising steps + appended clean blocks (trace.denoise_seconds for the cached "
                     "sampler); the answer decode is excluded",
            "order": "warm-up, cached, uncached, cached (the cached time is the mean of its two runs)",
            "seed": args.seed,
        },
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "cached": {"seconds": runs["cached"], "lm_positions_fed": cached_tokens,
                   "lm_positions_fed_expected": expected_cached},
        "uncached": {"seconds": runs["uncached"], "lm_positions_fed": uncached_tokens},
        "ratio_uncached_over_cached": {"seconds": uncached_seconds / cached_seconds,
                                       "lm_positions_fed": uncached_tokens / cached_tokens},
        "check": {"max_abs_latent_difference": max_difference, "max_abs_latent": latent_scale},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = Path(args.output) if args.output else RESULTS / f"denoise_cache_{'tiny' if args.tiny else model_name}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{model_name}: batch {args.batch}, prompt {args.prompt_tokens} tokens, {args.blocks} blocks x K="
          f"{args.denoise_steps} steps, L={config.latent_tokens_per_block}")
    print(f"{'':22s} {'cached':>12s} {'uncached':>12s} {'uncached/cached':>16s}")
    print(f"{'wall time (s)':22s} {cached_seconds:12.3f} {uncached_seconds:12.3f} "
          f"{uncached_seconds / cached_seconds:16.2f}")
    print(f"{'LM positions fed':22s} {cached_tokens:12d} {uncached_tokens:12d} {uncached_tokens / cached_tokens:16.2f}")
    print(f"latents agree to {max_difference:.2e} (largest |z| {latent_scale:.2f}); load average: start {load_start}, "
          f"end {load_end}; written {output}")


if __name__ == "__main__":
    main()
