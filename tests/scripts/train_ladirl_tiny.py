"""A short LaDi-RL run on a tiny model, for the multi-process tests: `accelerate launch ... train_ladirl_tiny.py OUT`.

Uses the tiny model, settings and reward of tests/test_ladirl_trainer.py; writes rank 0's logged losses, the engine
type and the process count to OUT/losses.json.
"""

import json
import os
import sys

from datasets import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from test_ladirl_trainer import PROMPTS, digit_fraction_reward, make_args, make_model  # noqa: E402

from trl_ladi import LaDiRLTrainer  # noqa: E402
from trl_ladi.process_group import end_process_group  # noqa: E402


def main(output_dir):
    model, tokenizer = make_model()
    args = make_args(
        output_dir,
        max_completion_length=5,
        max_steps=3,
        gradient_accumulation_steps=2,
        num_iterations=2,
        latent_kl_beta=0.01,
        ddp_find_unused_parameters=True,
    )
    trainer = LaDiRLTrainer(
        model=model,
        reward_funcs=digit_fraction_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=tokenizer,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
        record = {"losses": losses, "engine": type(trainer.model_wrapped).__name__, "processes": trainer.accelerator.num_processes}
        with open(os.path.join(output_dir, "losses.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()
    # Leave without the interpreter's teardown, where a thread of the torn-down group can abort the process
    # (tests/test_ladirl_trainer.py, TEARDOWN_ABORT); the losses are written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
