"""A short LaDi-RL run on a tiny model, for the multi-process tests: `accelerate launch ... train_ladirl_tiny.py OUT`.

Writes the logged losses of rank 0 to OUT/losses.json.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tiny import make_tokenizer, tiny_llama_config  # noqa: E402

from trl_ladi import LaDiRLConfig, LaDiRLTrainer, LaDiRModel  # noqa: E402


def digit_fraction_reward(completions, **kwargs):
    """Fraction of the answer's words that are numbers: varied enough on a random model to give advantages."""
    return [sum(word.isdigit() for word in text.split()) / max(len(text.split()), 1) for text in completions]


def main(output_dir, resume_from_checkpoint=None, max_steps=3, save_steps=None):
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    base = AutoModelForCausalLM.from_config(tiny_llama_config(tokenizer))
    model = LaDiRModel.from_base(
        base, latent_tokens_per_block=3, latent_dim=8, encoder_lora_rank=4, reasoner_lora_rank=4, max_blocks=2,
        num_denoise_steps=4,
    )
    torch.nn.init.normal_(model.velocity_head.linear.weight, std=0.1)
    dataset = Dataset.from_dict({"prompt": ["what is 3 plus 4 ?", "2 + 2 =", "the cat sat on", "a b c"] * 4})
    args = LaDiRLConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        num_decodes_per_latent=2,
        max_completion_length=5,
        max_steps=max_steps,
        gradient_accumulation_steps=2,
        num_iterations=2,
        learning_rate=1e-2,
        latent_kl_beta=0.01,
        logging_steps=1,
        report_to="none",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=0,
        ddp_find_unused_parameters=True,
    )
    trainer = LaDiRLTrainer(
        model=model, reward_funcs=digit_fraction_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
        record = {"losses": losses, "engine": type(trainer.model_wrapped).__name__, "processes": trainer.accelerator.num_processes}
        with open(os.path.join(output_dir, "losses.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
