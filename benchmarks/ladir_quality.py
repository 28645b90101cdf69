"""Where a LaDiR model loses accuracy, against text SFT of the same base model at the same wall-clock budget.

    python benchmarks/ladir_quality.py                       # SmolLM2-135M, chain_sum, 5 minutes per recipe
    python benchmarks/ladir_quality.py --budget_seconds 600 --initial_latent_logvar -4 --latent_noise_std 0
    python benchmarks/ladir_quality.py --text_sft_results benchmarks/results/ladir_quality.json   # reuse (d)
    python benchmarks/ladir_quality.py --training_seed 105 --recipes text_sft   # text SFT trained again, same problems

Both recipes train from the same base model on the same training problems for `--budget_seconds` of wall-clock time
each, one after the other in this process (the LaDiR recipe splits its budget between the VAE and the reasoner
stage); after a 10-step warm-up their learning rates fall linearly with the time spent, to 0 at the end of the budget
(`--no-decay_learning_rate`: constant; `--ladir_step_budget` and `--text_sft_step_budget`: a recipe takes set numbers
of steps instead, to repeat another machine's training; the report records each recipe's steps). Each recipe's
training starts from `--training_seed` (default `--seed`: the problems and the evaluation's samples), so one recipe
trains the same way with or without the other before it, and a second `--training_seed` measures how much one
training of a recipe moves its scores on the same problems (`recipe_replicates.py` pools such reports). Then, on
`--num_test_examples` held-out problems:

(a) VAE: greedy reconstruction of the held-out reasoning sentences from their latent means (exact match, and the share
    of target tokens the greedy decode gets right at their position);
(a2) a token posterior: the same sentences as the codebook rows its reasoner reads, read back by nearest row (its
    latents skip the VAE decoder, so (a) is off its path);
(b) oracle latents: answer accuracy (greedy) when the reasoner reads the encoder's latents of the true reasoning;
    with token-aligned latents also the denoiser's one-step reading of each true block from noise level t;
(b3) a token posterior: the reasoner's greedy next-slot prediction from the true prefix (its training task), as
    token accuracy and sentences exact;
(c) the LaDiR model with latents it samples itself (SDE, as the RL rollouts sample): pass@1..k;
(c2) a token posterior: the share of sampled traces whose blocks are all the true sentences, the answer accuracy of
    those and of the others, and the block where the others first go wrong (`--no-block_breakdown` skips it);
(d) the text-SFT model: pass@1..k with the same number of samples per problem;
(d2) its greedy next-token prediction from the true prefix, scored as (b3): where (b3) and (d2) agree, the two recipes
    learnt the sentences equally well and a pass@k gap comes from how they sample.

Writes `<output_dir>/ladir_quality.json` and `ladir_quality.png`.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig

from trl_ladi import LaDiRModel, LaDiRPipeline, LaDiRSFTConfig, LaDiRSFTTrainer
from trl_ladi.baselines import BudgetCallback, StepBudgetCallback, WallClockBudgetCallback, train_text_sft
from trl_ladi.data import load_math_dataset, split_reasoning_into_sentences
from trl_ladi.default_model import default_model_path
from trl_ladi.evaluation import (
    causal_lm_generate_fn,
    evaluate_pass_at_k,
    ladir_generate_fn,
    pass_at_k,
    plot_pass_at_k,
)
from trl_ladi.modeling import tokenize_prompts
from trl_ladi.rewards import math_accuracy_reward
from trl_ladi.rewards.math import extract_final_answer
from trl_ladi.trainers.sft_trainer import (
    DataCollatorForLatentReasoner,
    answer_start_token_id,
    encode_sentences,
    slot_token_ids,
)

ANSWER_TEMPLATE = "#### {answer}"


def add_ladir_recipe_arguments(parser):
    """The flags `train_ladir` reads (besides budget_seconds, batch_size, seed, output_dir); reproduce.py shares them."""
    group = parser.add_argument_group("LaDiR recipe")
    group.add_argument("--max_steps_per_stage", type=int, default=1_000_000,
                       help="Text SFT and each LaDiR stage also stop after this many optimizer steps (for quick "
                            "checks; the default is more than any budget here allows, so the budget stops them).")
    group.add_argument("--decay_learning_rate", action=argparse.BooleanOptionalAction, default=True,
                       help="The LaDiR stages and text SFT alike: after the warm-up the learning rate falls linearly "
                            "with the time spent, to 0 at the end of the budget (docs/sft.md: at a constant rate the "
                            "reasoner ends wherever its last noisy steps put it).")
    group.add_argument("--vae_fraction", type=float, default=0.5, help="Share of the LaDiR budget for the VAE.")
    group.add_argument("--ladir_step_budget", type=int, nargs=2, metavar=("VAE_STEPS", "REASONER_STEPS"),
                       help="Instead of the wall-clock budget, a budget of optimizer steps per LaDiR stage, the "
                            "learning rate falling with the steps taken as it does with the time spent: to repeat the "
                            "steps that the budget gave a training on a faster or slower machine (recipe_replicates.py "
                            "--not_compared budget_seconds ladir_step_budget pools the two).")
    group.add_argument("--latent_tokens_per_block", type=int, default=4)
    group.add_argument("--latent_dim", type=int, default=128)
    group.add_argument("--lora_rank", type=int, default=16)
    group.add_argument("--vae_decoder_lora_rank", type=int, default=0, help="0: the frozen base LM decodes latents.")
    group.add_argument("--token_aligned_latents", action=argparse.BooleanOptionalAction, default=False,
                       help="One latent token per sentence token.")
    group.add_argument("--velocity_parameterization", choices=["direct", "token_readout", "token_posterior"],
                       default="direct",
                       help="'token_readout' (with --token_aligned_latents): the LM's token head predicts each slot. "
                            "'token_posterior': the exact posterior of the LM's slot priors, slot by slot.")
    group.add_argument("--token_readout_temperature", type=float, default=1.0,
                       help="Temperature of the slot predictions (token_readout, token_posterior).")
    group.add_argument("--causal_denoiser", action="store_true",
                       help="(with token_readout) A noisy block attends causally; slot j's noisy latent is added where it "
                            "is read out.")
    group.add_argument("--max_blocks", type=int, default=4)
    group.add_argument("--vae_learning_rate", type=float, default=5e-4)
    group.add_argument("--reasoner_learning_rate", type=float, default=5e-4)
    group.add_argument("--slot_token_weight", type=float, default=LaDiRSFTConfig.slot_token_weight,
                       help="Weight of the reasoner's slot-token cross-entropy against its answer (1) and stop (2) "
                            "losses (token readout, token posterior).")
    group.add_argument("--stop_weight", type=float, default=LaDiRSFTConfig.stop_weight,
                       help="Weight of the stop head's cross-entropy (examples/math.py uses 4).")
    group.add_argument("--stop_readout", choices=["head", "answer_token"], default="head",
                       help="How the reasoner decides to answer: 'head', a new linear stop head (LaDiR); "
                            "'answer_token', the LM's token head predicting the answer's first token "
                            "(LaDiRConfig.stop_token_id).")
    group.add_argument("--initial_latent_logvar", type=float, default=None)
    group.add_argument("--latent_noise_std", type=float, default=0.3)
    group.add_argument("--token_substitution_prob", type=float, default=0.3)
    group.add_argument("--num_denoise_steps", type=int, default=6, help="Denoising steps per block when sampling.")
    group.add_argument("--timestep_shift", type=float, default=1.0, help="Shift of the sampler's schedule (diffusers).")
    group.add_argument("--flow_timestep_shift", type=float, default=1.0, help="Shift of the reasoner's training times.")
    group.add_argument("--initial_noise_scale", type=float, default=2.0, help="Std of the noise a block starts from.")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Base causal LM (default: embedded SmolLM2-135M).")
    parser.add_argument("--dataset_name", default="chain_sum")
    parser.add_argument("--num_train_examples", type=int, default=2048)
    parser.add_argument("--num_test_examples", type=int, default=256)
    parser.add_argument("--budget_seconds", type=float, default=300, help="Training wall-clock time of each recipe.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the problems and of the evaluation's samples.")
    parser.add_argument("--training_seed", type=int, default=None,
                        help="Seed of each recipe's training (data order, new weights); default: --seed. Another value "
                             "trains a recipe again on the same problems, to measure how much one training varies.")
    parser.add_argument("--recipes", nargs="+", choices=["text_sft", "ladir"], default=["text_sft", "ladir"],
                        help="Which recipes to train and score; a recipe left out has no part in the report (text "
                             "SFT's can still come from --text_sft_results).")
    parser.add_argument("--output_dir", default="outputs/ladir-quality")
    # text SFT (the reference): full fine-tuning, as in research/task-difficulty.md
    parser.add_argument("--text_sft_learning_rate", type=float, default=5e-5)
    parser.add_argument("--text_sft_step_budget", type=int, default=None, metavar="STEPS",
                        help="Instead of the wall-clock budget, a budget of optimizer steps for text SFT, spent as "
                             "--ladir_step_budget spends the LaDiR stages' (recipe_replicates.py --not_compared "
                             "budget_seconds text_sft_step_budget pools it with wall-clock trainings).")
    parser.add_argument("--text_sft_results", default=None,
                        help="A previous report's JSON on the same problems: reuse its text-SFT part, not trained again.")
    parser.add_argument("--batch_size", type=int, default=8)
    add_ladir_recipe_arguments(parser)
    # sampling, as the main job's rollouts
    parser.add_argument("--num_samples", type=int, default=8, help="Answers per problem for pass@k.")
    parser.add_argument("--num_decodes_per_latent", type=int, default=1,
                        help="Answers per sampled latent (1: independent samples, as pass@k's estimator assumes).")
    parser.add_argument("--sde_noise_level", type=float, default=0.7)
    parser.add_argument("--also_sde_noise_levels", type=float, nargs="*", default=[],
                        help="(c) again with the same model at these noise levels too (0: deterministic Euler), "
                             "under `ladir_by_sde_noise_level` in the JSON.")
    parser.add_argument("--also_draw_slots_from_prior", action="store_true",
                        help="(c) again with the same model, a token posterior's slots drawn from its prior (the end "
                             "point of its denoising steps, in one step), under `ladir_slots_from_prior` in the JSON.")
    parser.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=True,
                        help="(a), (a2), (b), (b2) and (b3) of the LaDiR model: --no-diagnostics leaves them out, "
                             "for a recipe trained again (with --no-block_breakdown too, only its pass@k is scored).")
    parser.add_argument("--block_breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="(c2) for a token posterior. It samples as many traces again as (c): "
                             "--no-block_breakdown halves the LaDiR evaluation's time.")
    parser.add_argument("--save_ladir_model", action="store_true",
                        help="Keep the trained LaDiR model in OUTPUT_DIR/ladir (LaDiRModel.from_pretrained reads it), "
                             "to sample it again later, e.g. with another sampler (benchmarks/diversity_guidance.py, "
                             "trl-ladi eval). Text SFT's model is always kept, in OUTPUT_DIR/text-sft.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Of the text-SFT model's worked solutions.")
    args = parser.parse_args()
    if args.training_seed is None:
        args.training_seed = args.seed
    return args


def train_text_sft_start(args, base, tokenizer, train, budget: BudgetCallback) -> str:
    """The text-SFT reference: every weight fine-tuned on the worked steps then `#### N` until `budget` (seconds of
    wall clock or optimizer steps) is spent, the rate decaying with it under `--decay_learning_rate`; returns its
    folder, `<output_dir>/text-sft`. reproduce.py trains its arm A start with it."""
    on_gpu = torch.cuda.is_available()
    return train_text_sft(
        base, train,
        SFTConfig(output_dir=os.path.join(args.output_dir, "text-sft"), max_steps=args.max_steps_per_stage,
                  learning_rate=args.text_sft_learning_rate, lr_scheduler_type="constant_with_warmup",
                  warmup_steps=10, per_device_train_batch_size=args.batch_size, logging_steps=25,
                  save_strategy="no", report_to="none", use_cpu=not on_gpu, bf16=on_gpu, seed=args.seed),
        answer_template=ANSWER_TEMPLATE, tokenizer=tokenizer,
        callbacks=[budget],
    )


def train_ladir(args, base, tokenizer, train):
    model = LaDiRModel.from_base(
        base,
        latent_tokens_per_block=args.latent_tokens_per_block,
        latent_dim=args.latent_dim,
        max_blocks=args.max_blocks,
        encoder_lora_rank=args.lora_rank,
        reasoner_lora_rank=args.lora_rank,
        vae_decoder_lora_rank=args.vae_decoder_lora_rank,
        token_aligned_latents=args.token_aligned_latents,
        velocity_parameterization=args.velocity_parameterization,
        causal_denoiser=args.causal_denoiser,
        token_readout_temperature=args.token_readout_temperature,
        num_denoise_steps=args.num_denoise_steps,
        timestep_shift=args.timestep_shift,
        initial_noise_scale=args.initial_noise_scale,
        initial_latent_logvar=args.initial_latent_logvar,
        stop_token_id=answer_start_token_id(tokenizer, ANSWER_TEMPLATE) if args.stop_readout == "answer_token" else None,
    )
    steps = {}
    stages = (("vae", args.vae_fraction, args.vae_learning_rate), ("reasoner", 1 - args.vae_fraction, args.reasoner_learning_rate))
    for index, (stage, fraction, learning_rate) in enumerate(stages):
        if args.ladir_step_budget:
            budget = StepBudgetCallback(args.ladir_step_budget[index], args.decay_learning_rate)
        else:
            budget = WallClockBudgetCallback(args.budget_seconds * fraction, args.decay_learning_rate)
        stage_args = LaDiRSFTConfig(
            output_dir=os.path.join(args.output_dir, f"ladir-{stage}"),
            stage=stage,
            max_steps=args.max_steps_per_stage,  # unless its budget stops it first
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,  # the reasoner stage's encoder pass (none for a token posterior)
            learning_rate=learning_rate,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=10,
            answer_template=ANSWER_TEMPLATE,
            max_answer_length=16,
            latent_noise_std=args.latent_noise_std,
            token_substitution_prob=args.token_substitution_prob,
            scaling_num_sentences=256,
            flow_timestep_shift=args.flow_timestep_shift,
            slot_token_weight=args.slot_token_weight,
            stop_weight=args.stop_weight,
            logging_steps=25,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available(),  # CPU bf16 matmuls take a slow reference kernel
            seed=args.seed,
        )
        trainer = LaDiRSFTTrainer(
            model=model, args=stage_args, train_dataset=train, processing_class=tokenizer,
            callbacks=[budget],
        )
        trainer.train()
        steps[stage] = trainer.state.global_step
    return model.eval(), steps


@torch.no_grad()
def vae_reconstruction(model, tokenizer, sentences, batch_size=32):
    """(a): greedy decode of each sentence's latent mean; exact match and positional token agreement."""
    exact, token_hits, token_total, examples = 0, 0, 0, []
    for start in range(0, len(sentences), batch_size):
        batch = sentences[start : start + batch_size]
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        mu = encode_sentences(model, ids, tokenizer.pad_token_id, batch_size).to(model.device)
        texts = model.decode_latents_to_text(model.config.latent_scaling_factor * mu, tokenizer, max_new_tokens=32)
        for sentence, target, text in zip(batch, ids, texts):
            decoded = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
            exact += text.strip() == sentence.strip()
            token_hits += sum(a == b for a, b in zip(decoded, target))
            token_total += len(target)
            if len(examples) < 8:
                examples.append({"sentence": sentence, "decoded": text.strip()})
    return {"exact_match": exact / len(sentences), "token_accuracy": token_hits / token_total,
            "num_sentences": len(sentences), "examples": examples}


@torch.no_grad()
def codebook_round_trip(model, tokenizer, sentences, batch_size=64):
    """(a2) a token posterior: each sentence as the codebook rows of its slot tokens (the blocks its reasoner trains on
    and samples; no encoder, no decoder), read back as each slot's nearest codebook row over the whole vocabulary.
    Exact match per sentence (one longer than the block never is), and the share of slots (the sentence's tokens and
    its empty slots) read back right."""
    codebook = model.latent_codebook()
    exact, slot_hits, slot_total = 0, 0, 0
    for start in range(0, len(sentences), batch_size):
        ids = tokenizer(sentences[start : start + batch_size], add_special_tokens=False)["input_ids"]
        slots = slot_token_ids(ids, model.config.latent_tokens_per_block, model._eos_token_id()).to(model.device)
        hits = model.nearest_codebook_tokens(codebook[slots], codebook) == slots
        fits = torch.tensor([len(row) <= slots.shape[1] for row in ids], device=hits.device)  # else cut to the slots
        exact += (hits.all(-1) & fits).sum().item()
        slot_hits += hits.sum().item()
        slot_total += hits.numel()
    return {"exact_match": exact / len(sentences), "token_accuracy": slot_hits / slot_total,
            "num_sentences": len(sentences)}


@torch.no_grad()
def oracle_latent_accuracy(model, tokenizer, test, batch_size=16):
    """(b): the reasoner reads the encoder's latents of the true reasoning sentences and answers greedily (a token
    posterior: the sentences' codebook latents, one token per slot, which is what it trains on and samples)."""
    pipeline = LaDiRPipeline(model, tokenizer)
    max_blocks = model.config.max_blocks
    correct, examples = 0, []
    for start in range(0, len(test), batch_size):
        rows = [test[i] for i in range(start, min(start + batch_size, len(test)))]
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [row["prompt"] for row in rows], device=model.device)
        context = model.prefill(prompt_ids, prompt_mask)
        sentences = [split_reasoning_into_sentences(row["reasoning"], max_sentences=max_blocks) for row in rows]
        for block in range(max(len(s) for s in sentences)):
            is_real = torch.tensor([block < len(s) for s in sentences], device=model.device)
            texts = [s[block] if block < len(s) else s[-1] for s in sentences]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            if model.config.velocity_parameterization == "token_posterior":
                slot_ids = slot_token_ids(ids, model.config.latent_tokens_per_block, tokenizer.eos_token_id)
                latents = model.latent_codebook()[slot_ids.to(model.device)]
            else:
                mu = encode_sentences(model, ids, tokenizer.pad_token_id, len(ids)).to(model.device)
                latents = model.config.latent_scaling_factor * mu.to(model.dtype)
            model.append_block(context, latents, is_real=is_real)
        completion_ids, _ = pipeline.decode_answers(
            context, max_new_tokens=16, temperature=0.0, eos_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
        answers = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards = math_accuracy_reward(completions=answers, answer=[row["answer"] for row in rows])
        correct += sum(r >= 1.0 for r in rewards)
        examples.extend({"answer": row["answer"], "decoded": a} for row, a in zip(rows, answers) if len(examples) < 8)
    return {"answer_accuracy": correct / len(test), "num_problems": len(test), "examples": examples[:8]}


@torch.no_grad()
def denoiser_slot_accuracy(model, tokenizer, test, output_dir, noise_levels=(0.3, 0.5, 0.7, 0.9, 1.0), batch_size=8):
    """(b2), token-aligned latents: how well the denoiser recovers a block from noise level ``t`` in one step.

    Every block of the true reasoning is noised to ``z_t`` (context: the prompt and the true blocks before it); the
    one-step clean estimate ``z_t - t v`` and the true latent are each read per slot as their nearest codebook token
    (`nearest_codebook_tokens`). Reports the share of the sentences' slots where the two agree, and of blocks where they agree
    in every such slot (the empty slots after a sentence are not scored).
    """
    args = LaDiRSFTConfig(output_dir=output_dir, stage="reasoner", answer_template=ANSWER_TEMPLATE, max_answer_length=16,
                          per_device_eval_batch_size=64, report_to="none", use_cpu=model.device.type == "cpu")
    rows = LaDiRSFTTrainer._prepare_dataset(test, model, tokenizer, args)
    collate = DataCollatorForLatentReasoner(tokenizer)
    codebook = model.latent_codebook().float()
    generator = torch.Generator().manual_seed(0)
    hits = {t: [0, 0, 0, 0] for t in noise_levels}  # token hits, tokens, exact blocks, blocks
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))]).items()}
        block_mask = batch["block_mask"].bool()
        if model.config.velocity_parameterization == "token_posterior":
            latents = codebook[batch["slot_token_ids"]]  # what it trains on and samples
        else:
            latents = batch["latents"]
        num_rows, num_blocks = block_mask.shape
        block_index = torch.arange(num_blocks, device=latents.device)
        for t in noise_levels:
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            noisy = (1 - t) * latents + t * noise
            times = torch.full((num_rows, num_blocks), t, device=latents.device)
            if model.config.velocity_parameterization == "token_posterior":
                # each slot's prior from the true slots before it, then the exact posterior at z_t
                slot_logits = model._packed_forward(
                    batch["prompt_ids"], batch["prompt_mask"], latents, block_mask, noisy_latents=latents,
                    noisy_timesteps=torch.zeros_like(times), noisy_block_index=block_index.expand(num_rows, -1),
                )["slot_logits"]
                velocity = model.posterior_velocity(slot_logits, noisy, times, codebook)
            else:
                velocity = model._packed_forward(
                    batch["prompt_ids"], batch["prompt_mask"], latents, block_mask, noisy_latents=noisy,
                    noisy_timesteps=times, noisy_block_index=block_index.expand(num_rows, -1),
                )["velocity"]
            read = model.nearest_codebook_tokens((noisy - t * velocity)[block_mask], codebook)  # the estimate, (blocks, L)
            target = model.nearest_codebook_tokens(latents[block_mask], codebook)  # what the true latent reads as
            is_token = batch["slot_token_ids"][block_mask] != tokenizer.eos_token_id
            hits[t][0] += int(((read == target) & is_token).sum())
            hits[t][1] += int(is_token.sum())
            hits[t][2] += int(((read == target) | ~is_token).all(-1).sum())
            hits[t][3] += len(target)
    return {"noise_levels": list(noise_levels),
            "token_accuracy": [hits[t][0] / hits[t][1] for t in noise_levels],
            "block_exact_match": [hits[t][2] / hits[t][3] for t in noise_levels],
            "num_blocks": hits[noise_levels[0]][3]}


@torch.no_grad()
def slot_prediction_accuracy(model, tokenizer, test, output_dir, batch_size=8):
    """(b3), token posterior: the reasoner's greedy prediction of each slot's token from the true slots before it (the
    task its stage trains), scored on the sentences' tokens: token accuracy, and the share of blocks with every token
    right; the end of a sentence (its first empty slot) is scored apart. `text_sft_token_accuracy` is the same
    measurement on the text-SFT model: the two say whether the recipes learnt the sentences equally well, apart from
    how each samples."""
    if model.config.velocity_parameterization != "token_posterior":
        raise ValueError("slot_prediction_accuracy reads a token posterior's slot priors; this model has "
                         f"velocity_parameterization={model.config.velocity_parameterization!r}.")
    args = LaDiRSFTConfig(output_dir=output_dir, stage="reasoner", answer_template=ANSWER_TEMPLATE, max_answer_length=16,
                          report_to="none", use_cpu=model.device.type == "cpu")
    rows = LaDiRSFTTrainer._prepare_dataset(test, model, tokenizer, args)
    collate = DataCollatorForLatentReasoner(tokenizer)
    codebook = model.latent_codebook()
    token_hits = token_total = exact_blocks = end_hits = end_total = num_blocks = 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))]).items()}
        block_mask, slot_ids = batch["block_mask"].bool(), batch["slot_token_ids"]
        logits = model._packed_forward(batch["prompt_ids"], batch["prompt_mask"], codebook[slot_ids], block_mask,
                                       clean_slot_logits=True)["clean_slot_logits"]
        right = (logits.argmax(-1) == slot_ids)[block_mask]  # (blocks, L)
        is_eos = (slot_ids == tokenizer.eos_token_id)[block_mask]
        is_token = ~is_eos
        is_end = is_eos & (is_eos.cumsum(-1) == 1)  # the first empty slot
        token_hits += int((right & is_token).sum())
        token_total += int(is_token.sum())
        exact_blocks += int((right | ~is_token).all(-1).sum())
        end_hits += int((right & is_end).sum())
        end_total += int(is_end.sum())
        num_blocks += len(right)
    return {"token_accuracy": token_hits / max(token_total, 1), "sentence_exact_match": exact_blocks / max(num_blocks, 1),
            "end_of_sentence_accuracy": end_hits / max(end_total, 1), "num_sentences": num_blocks}


@torch.no_grad()
def text_sft_token_accuracy(model, tokenizer, test, answer_template=ANSWER_TEMPLATE):
    """(d2): the text-SFT model's greedy next-token prediction over the true worked solution, written as
    `trl_ladi.baselines.text_sft_dataset` writes it (`prompt`, newline, reasoning, newline, answer), scored on the
    reasoning sentences' tokens: token accuracy, and the share of sentences with every token right. Plain-text prompts
    (the benchmark's); a token belongs to the sentence its first character is in."""
    device = next(model.parameters()).device
    token_hits = token_total = exact = num_sentences = 0
    for row in test:
        if not isinstance(row["prompt"], str):
            raise ValueError("text_sft_token_accuracy scores plain-text prompts; load the data with conversational=False.")
        reasoning = row["reasoning"]
        text = f"{row['prompt']}\n{reasoning}\n{answer_template.format(answer=row['answer'])}"
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([encoding["input_ids"]], device=device)
        predicted = model(ids).logits[0, :-1].argmax(-1).tolist()
        starts = [begin for begin, _ in encoding["offset_mapping"]]
        cursor = len(row["prompt"]) + 1  # where the reasoning starts
        for sentence in split_reasoning_into_sentences(reasoning):
            begin = text.index(sentence, cursor)
            cursor = begin + len(sentence)
            positions = [i for i in range(1, len(starts)) if begin <= starts[i] < cursor]
            hits = [predicted[i - 1] == encoding["input_ids"][i] for i in positions]
            token_hits += sum(hits)
            token_total += len(hits)
            exact += all(hits)
            num_sentences += 1
    return {"token_accuracy": token_hits / max(token_total, 1), "sentence_exact_match": exact / max(num_sentences, 1),
            "num_sentences": num_sentences}


@torch.no_grad()
def sampled_block_breakdown(model, tokenizer, test, num_latents=4, batch_size=8, seed=0, **sampling_kwargs):
    """(c2), token posterior: where sampled traces go wrong. Each trace's blocks are read back as their slot tokens
    (`nearest_codebook_tokens`, exact for a token posterior) and compared with the true sentences' tokens. Returns the
    share of traces whose blocks are all right (and as many as the true sentences), the answer accuracy of those and
    of the others, and how many traces first go wrong at each block. `sampling_kwargs` go to
    `LaDiRPipeline.sample_answers` (as in the pass@k evaluation; one decode per latent)."""
    if model.config.velocity_parameterization != "token_posterior":
        raise ValueError("sampled_block_breakdown reads blocks as slot tokens, which needs a token posterior.")
    pipeline = LaDiRPipeline(model, tokenizer)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    counts = {"traces": 0, "blocks_right": 0, "answer_right_blocks_right": 0, "answer_right_blocks_wrong": 0}
    first_wrong_block = [0] * model.config.max_blocks
    for start in tqdm(range(0, len(test), batch_size), desc="(c2) sampled blocks", unit="batch"):
        rows = [test[i] for i in range(start, min(start + batch_size, len(test)))]
        out = pipeline.sample_answers([row["prompt"] for row in rows], num_latents=num_latents, generator=generator,
                                      **sampling_kwargs)
        read = model.nearest_codebook_tokens(out.latents).tolist()  # (R, Bm, L)
        answers = [extract_final_answer(text) or text.strip() for text in out.texts]
        for trace, (blocks, used, answer) in enumerate(zip(read, out.trace.num_blocks.tolist(), answers)):
            row = rows[trace // num_latents]
            sentences = split_reasoning_into_sentences(row["reasoning"], max_sentences=model.config.max_blocks)
            ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
            truth = slot_token_ids(ids, model.config.latent_tokens_per_block, tokenizer.eos_token_id).tolist()
            wrong = [b for b in range(max(used, len(truth))) if b >= used or b >= len(truth) or blocks[b] != truth[b]]
            answer_right = math_accuracy_reward(completions=[answer], answer=[row["answer"]])[0] >= 1.0
            counts["traces"] += 1
            if wrong:
                first_wrong_block[wrong[0]] += 1
                counts["answer_right_blocks_wrong"] += answer_right
            else:
                counts["blocks_right"] += 1
                counts["answer_right_blocks_right"] += answer_right
    right, traces = counts["blocks_right"], counts["traces"]
    return {"num_traces": traces, "blocks_right": right / traces,
            "answer_accuracy_when_blocks_right": counts["answer_right_blocks_right"] / max(right, 1),
            "answer_accuracy_when_blocks_wrong": counts["answer_right_blocks_wrong"] / max(traces - right, 1),
            "first_wrong_block": first_wrong_block}


def without_per_problem(result):
    """The summary, with each problem's count of correct answers (of `num_samples`) instead of its answers."""
    summary = {key: value for key, value in result.items() if key != "per_problem"}
    summary["correct_per_problem"] = [problem["c"] for problem in result["per_problem"]]
    return summary


def paired_difference(result, reference, ks, num_samples):
    """pass@k of `result` minus `reference`, problem by problem on the same problems: the mean difference and its
    standard error over problems (in points). A difference within ~2 standard errors is not told from 0."""
    differences = {}
    for k in ks:
        per_problem = [
            100 * (pass_at_k(num_samples, c, k) - pass_at_k(num_samples, c_reference, k))
            for c, c_reference in zip(result["correct_per_problem"], reference["correct_per_problem"], strict=True)
        ]
        mean = sum(per_problem) / len(per_problem)
        variance = sum((d - mean) ** 2 for d in per_problem) / (len(per_problem) - 1)
        differences[f"pass@{k}"] = {"mean": mean, "standard_error": (variance / len(per_problem)) ** 0.5}
    return differences


def main():
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    base = args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    options = dict(seed=args.seed, conversational=False, instruction=None)
    train = load_math_dataset(args.dataset_name, "train", args.num_train_examples, **options)
    test = load_math_dataset(args.dataset_name, "test", args.num_test_examples, **options)
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.num_samples]
    report = {"settings": vars(args), "timings": {}}
    answer_fn = lambda text: extract_final_answer(text) or text.strip()  # noqa: E731

    # every recipe's trainer reads `seed`: it is the training seed there, the problems' and samples' seed here
    training_args = argparse.Namespace(**{**vars(args), "seed": args.training_seed})

    # (d) text SFT
    if args.text_sft_results:
        with open(args.text_sft_results) as f:
            report["text_sft"] = json.load(f)["text_sft"]
    elif "text_sft" in args.recipes:
        set_seed(args.training_seed)
        start = time.perf_counter()
        if args.text_sft_step_budget:
            budget = StepBudgetCallback(args.text_sft_step_budget, args.decay_learning_rate)
        else:
            budget = WallClockBudgetCallback(args.budget_seconds, args.decay_learning_rate)
        sft_dir = train_text_sft_start(training_args, base, tokenizer, train, budget)
        report["timings"]["text_sft_train_s"] = time.perf_counter() - start
        report["text_sft_steps"] = budget.steps_taken
        sft_model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
        start = time.perf_counter()
        set_seed(args.seed)
        generate_fn = causal_lm_generate_fn(sft_model, tokenizer, max_new_tokens=args.max_new_tokens,
                                            temperature=args.temperature)
        result = evaluate_pass_at_k(generate_fn, test, math_accuracy_reward, ks=ks, num_samples=args.num_samples,
                                    answer_fn=answer_fn)
        report["timings"]["text_sft_eval_s"] = time.perf_counter() - start
        report["text_sft"] = without_per_problem(result)
        report["text_sft"]["teacher_forced"] = text_sft_token_accuracy(sft_model, tokenizer, test)
        del sft_model
    curves = {"text SFT": report["text_sft"]} if "text_sft" in report else {}

    # (a)-(c) the LaDiR recipe at the same budget
    if "ladir" in args.recipes:
        set_seed(args.training_seed)
        ladir_parts = score_ladir(args, training_args, base, tokenizer, train, test, ks, answer_fn)
        report["timings"].update(ladir_parts.pop("timings"))
        report.update(ladir_parts)
        curves["LaDiR"] = report["ladir"]
        if "ladir_slots_from_prior" in report:
            curves["LaDiR, slots drawn from the prior"] = report["ladir_slots_from_prior"]
    # text-SFT results reused from before the per-problem counts were recorded have none
    if "ladir" in report and "correct_per_problem" in report.get("text_sft", {}):
        report["ladir_minus_text_sft"] = paired_difference(report["ladir"], report["text_sft"], ks, args.num_samples)

    json_path = os.path.join(args.output_dir, "ladir_quality.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    png_path = plot_pass_at_k(
        curves, os.path.join(args.output_dir, "ladir_quality.png"),
        title=f"{args.dataset_name}: pass@k on {len(test)} held-out problems, {args.budget_seconds:.0f} s of training each",
    )
    printed = ("timings", "text_sft_steps", "ladir_steps", "ladir_minus_text_sft")
    print(json.dumps({key: report[key] for key in printed if key in report}, indent=2))
    print_ladir_summary(report)
    if "text_sft" in report:
        print(f"(d) text SFT pass@k {report['text_sft']['pass_at_k']}")
    if "teacher_forced" in report.get("text_sft", {}):
        tokens = report["text_sft"]["teacher_forced"]
        print(f"(d2) text SFT next-token prediction from the true prefix: token accuracy {tokens['token_accuracy']:.3f}, "
              f"sentences exact {tokens['sentence_exact_match']:.3f}")
    print(f"Wrote {json_path} and {png_path}")


def score_ladir(args, training_args, base, tokenizer, train, test, ks, answer_fn) -> dict:
    """Trains the LaDiR recipe and returns its parts of the report: (a)-(b3) unless --no-diagnostics, then (c)."""
    report = {"timings": {}}
    start = time.perf_counter()
    model, steps = train_ladir(training_args, base, tokenizer, train)
    report["timings"]["ladir_train_s"] = time.perf_counter() - start
    report["ladir_steps"] = steps
    if args.save_ladir_model:
        model.save_pretrained(os.path.join(args.output_dir, "ladir"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "ladir"))
    start = time.perf_counter()
    sampling_kwargs = dict(num_denoise_steps=args.num_denoise_steps, sde_noise_level=args.sde_noise_level,
                           temperature=args.temperature, max_new_tokens=16)
    if args.diagnostics:
        sentences = [s for row in test for s in split_reasoning_into_sentences(row["reasoning"], args.max_blocks)]
        report["vae"] = vae_reconstruction(model, tokenizer, sentences)
        if model.config.velocity_parameterization == "token_posterior":
            report["codebook"] = codebook_round_trip(model, tokenizer, sentences)
        report["oracle_latents"] = oracle_latent_accuracy(model, tokenizer, test)
        if model.config.token_aligned_latents:
            report["denoiser"] = denoiser_slot_accuracy(model, tokenizer, test, args.output_dir)
        if model.config.velocity_parameterization == "token_posterior":
            report["slot_prediction"] = slot_prediction_accuracy(model, tokenizer, test, args.output_dir)
    if model.config.velocity_parameterization == "token_posterior" and args.block_breakdown:
        report["sampled_blocks"] = sampled_block_breakdown(
            model, tokenizer, test, num_latents=args.num_samples // args.num_decodes_per_latent, seed=args.seed,
            **sampling_kwargs,
        )

    def ladir_pass_at_k(sde_noise_level, draw_slots_from_prior=False):
        set_seed(args.seed)
        generate_fn = ladir_generate_fn(model, tokenizer, num_decodes_per_latent=args.num_decodes_per_latent,
                                        **{**sampling_kwargs, "sde_noise_level": sde_noise_level},
                                        draw_slots_from_prior=draw_slots_from_prior)
        result = evaluate_pass_at_k(generate_fn, test, math_accuracy_reward, ks=ks, num_samples=args.num_samples,
                                    answer_fn=answer_fn)
        return without_per_problem(result)

    report["ladir"] = ladir_pass_at_k(args.sde_noise_level)
    report["timings"]["ladir_eval_s"] = time.perf_counter() - start
    if args.also_sde_noise_levels:
        # the same trained model sampled at other noise levels: the sampler's share of a difference, apart from training
        report["ladir_by_sde_noise_level"] = {str(args.sde_noise_level): report["ladir"]}
        for level in args.also_sde_noise_levels:
            report["ladir_by_sde_noise_level"][str(level)] = ladir_pass_at_k(level)
    if args.also_draw_slots_from_prior:
        start = time.perf_counter()
        report["ladir_slots_from_prior"] = ladir_pass_at_k(args.sde_noise_level, draw_slots_from_prior=True)
        report["timings"]["ladir_slots_from_prior_eval_s"] = time.perf_counter() - start
    return report


def print_ladir_summary(report):
    if "vae" in report:
        print(f"(a) VAE exact match {report['vae']['exact_match']:.3f}, token accuracy {report['vae']['token_accuracy']:.3f}"
              f" on {report['vae']['num_sentences']} held-out sentences")
    if "codebook" in report:
        print(f"(a2) codebook round trip exact match {report['codebook']['exact_match']:.3f}, slot accuracy "
              f"{report['codebook']['token_accuracy']:.3f}")
    if "oracle_latents" in report:
        print(f"(b) answer accuracy with oracle latents {report['oracle_latents']['answer_accuracy']:.3f}")
    if "denoiser" in report:
        for t, accuracy, exact in zip(*(report["denoiser"][k] for k in ("noise_levels", "token_accuracy", "block_exact_match"))):
            print(f"    denoiser from noise t={t}: token accuracy {accuracy:.3f}, block exact {exact:.3f}")
    if "slot_prediction" in report:
        slots = report["slot_prediction"]
        print(f"(b3) next-slot prediction from the true prefix: token accuracy {slots['token_accuracy']:.3f}, sentences "
              f"exact {slots['sentence_exact_match']:.3f}, end of sentence {slots['end_of_sentence_accuracy']:.3f}")
    if "ladir" in report:
        print(f"(c) LaDiR pass@k {report['ladir']['pass_at_k']}")
    for level, result in report.get("ladir_by_sde_noise_level", {}).items():
        print(f"    at SDE noise level {level}: pass@k {result['pass_at_k']}, distinct answers {result['distinct_answers_mean']:.2f}")
    if "sampled_blocks" in report:
        blocks = report["sampled_blocks"]
        print(f"(c2) sampled traces with every block right {blocks['blocks_right']:.3f} (answer accuracy "
              f"{blocks['answer_accuracy_when_blocks_right']:.3f}; otherwise {blocks['answer_accuracy_when_blocks_wrong']:.3f}); "
              f"first wrong block: {blocks['first_wrong_block']}")

if __name__ == "__main__":
    main()
