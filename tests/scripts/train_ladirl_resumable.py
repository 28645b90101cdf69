"""A 6-step LaDi-RL run on a tiny model that saves a checkpoint every 2 steps, for the kill-and-resume test.

    python train_ladirl_resumable.py OUT              # the whole run
    python train_ladirl_resumable.py OUT --hang 3     # stops inside step 3 until killed (after checkpoint-2)
    python train_ladirl_resumable.py OUT --hang_in_save 4   # stops inside the save of checkpoint-4 (weights and
                                                             # optimizer written, trainer state not yet)
    python train_ladirl_resumable.py OUT --resume     # resume_from_checkpoint=True
    accelerate launch --num_processes 2 --config_file ... train_ladirl_resumable.py OUT [...]   # DDP, ZeRO

Writes OUT/losses.json (logged loss per step) and OUT/final (the trained model) when it finishes (main process).
"""

import argparse
import json
import os
import sys
import time

from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from test_ladirl_trainer import PROMPTS, digit_fraction_reward, make_args, make_model  # noqa: E402

from trl_ladi import LaDiRLTrainer  # noqa: E402
from trl_ladi.process_group import end_process_group  # noqa: E402


class HangAtStep(TrainerCallback):
    """Writes OUT/hanging and sleeps at the start of `step` (1-based), so the run can be killed there."""

    def __init__(self, step: int, output_dir: str):
        self.step, self.output_dir = step, output_dir

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            with open(os.path.join(self.output_dir, f"hanging-{args.process_index}"), "w") as marker:
                marker.write(str(os.getpid()))
            while True:
                time.sleep(1)


def hang_inside_save(trainer, step: int, output_dir: str):
    """Stops inside `Trainer._save_checkpoint` at `step`, after the weights and optimizer of checkpoint-`step` are on
    disk and before its RNG and trainer state are, so the run can be killed in the middle of writing a checkpoint."""
    save_rng_state = trainer._save_rng_state

    def save_or_hang(checkpoint_dir):
        if trainer.state.global_step == step:
            with open(os.path.join(output_dir, f"hanging-{trainer.args.process_index}"), "w") as marker:
                marker.write(str(os.getpid()))
            while True:
                time.sleep(1)
        return save_rng_state(checkpoint_dir)

    trainer._save_rng_state = save_or_hang


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--hang", type=int, default=None)
    parser.add_argument("--hang_in_save", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    model, tokenizer = make_model()
    args = make_args(options.output_dir, max_steps=6, save_strategy="steps", save_steps=2, learning_rate=5e-2)
    callbacks = [HangAtStep(options.hang, options.output_dir)] if options.hang else None
    trainer = LaDiRLTrainer(model=model, reward_funcs=digit_fraction_reward, args=args, callbacks=callbacks,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 6}), processing_class=tokenizer)
    if options.hang_in_save:
        hang_inside_save(trainer, options.hang_in_save, options.output_dir)
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    trainer.save_model(os.path.join(options.output_dir, "final"))  # whole weights, also from ZeRO (main process)
    if trainer.is_world_process_zero():
        losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
        with open(os.path.join(options.output_dir, "losses.json"), "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
    end_process_group()
