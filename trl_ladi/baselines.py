"""The token-level reference: text chain-of-thought SFT of the same base model on the same data.

LaDiR learns to reason in latent blocks from `(prompt, reasoning, answer)` rows. The fair reference for it, and the
starting model of token-level GRPO in a LaDi-RL vs GRPO comparison, is the same base model fine-tuned with TRL's
`SFTTrainer` on the same rows with the reasoning written out as text, then the answer in the same format:

    prompt -> "\\n" + reasoning + "\\n" + answer_template.format(answer=answer) + eos

`text_sft_dataset` builds those prompt/completion rows; `train_text_sft` runs `SFTTrainer` on them (loss on the
completion only, as TRL does for prompt/completion data) and saves the model and tokenizer.
"""

import time

import datasets
import torch
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_ladi.data import prepare_cot_dataset
from trl_ladi.modeling import load_causal_lm

DEFAULT_ANSWER_TEMPLATE = "#### {answer}"


def text_sft_dataset(dataset: datasets.Dataset, answer_template: str = DEFAULT_ANSWER_TEMPLATE) -> datasets.Dataset:
    """Prompt/completion rows for `SFTTrainer`: the completion is the reasoning as text, then the formatted answer.

    `dataset` has the columns the LaDiR stages read (`prompt` and `reasoning` + `answer`, or a GSM8K-style
    `solution`); it is validated by `trl_ladi.data.prepare_cot_dataset`. Conversational prompts give an assistant
    message as the completion, plain prompts a string that starts on a new line.
    """
    if "{answer}" not in answer_template:
        raise ValueError(f"answer_template must contain '{{answer}}', got {answer_template!r}.")
    dataset = prepare_cot_dataset(dataset)

    def to_completion(row):
        text = f"{row['reasoning']}\n{answer_template.format(answer=row['answer'])}"
        if isinstance(row["prompt"], str):
            return {"prompt": row["prompt"], "completion": "\n" + text}
        return {"prompt": row["prompt"], "completion": [{"role": "assistant", "content": text}]}

    return dataset.map(to_completion, remove_columns=dataset.column_names)


def train_text_sft(
    model_name_or_path: str,
    train_dataset: datasets.Dataset,
    args: SFTConfig,
    answer_template: str = DEFAULT_ANSWER_TEMPLATE,
    tokenizer=None,
    callbacks=None,
) -> str:
    """Fine-tune a causal LM on `train_dataset` with the reasoning written as text; returns `args.output_dir`.

    The model and its tokenizer are saved there, ready for `AutoModelForCausalLM.from_pretrained` (and for TRL's
    `GRPOTrainer`). The whole model is trained unless `args` says otherwise (e.g. through a peft config).
    `callbacks` go to the `SFTTrainer` (e.g. `WallClockBudgetCallback` for a run of fixed wall-clock time).
    """
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_causal_lm(model_name_or_path, dtype="float32")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=text_sft_dataset(train_dataset, answer_template),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    return args.output_dir


class BudgetCallback(TrainerCallback):
    """Stops training once its budget is spent (checked after each optimizer step) and, with
    `decay_learning_rate=True`, makes the learning rate fall linearly with the budget spent, to 0 at its end: the
    trainer's schedule (its warm-up, say) is multiplied by `remaining_fraction`. A step-count schedule cannot do this
    when the number of steps a wall-clock budget allows is unknown, and a constant rate leaves the weights wherever the
    last noisy step put them. It needs a `LambdaLR` schedule, which every `lr_scheduler_type` but
    `reduce_lr_on_plateau` and DeepSpeed's own schedulers gives. Subclasses say what the budget counts;
    `steps_taken` records the optimizer steps that the budget allowed."""

    def __init__(self, decay_learning_rate: bool = False):
        self.decay_learning_rate = decay_learning_rate
        self._decaying_scheduler = None
        self.steps_taken = 0  # the optimizer steps of the last training, for reports

    def remaining_fraction(self, step: int) -> float:
        """The share of the budget not yet spent, in [0, 1], after `step` optimizer steps."""
        raise NotImplementedError

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if not self.decay_learning_rate or lr_scheduler is self._decaying_scheduler:
            return
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise TypeError(
                f"{type(self).__name__}(decay_learning_rate=True) scales a LambdaLR schedule, but the trainer's is "
                f"{type(lr_scheduler).__name__}. Use an lr_scheduler_type such as 'constant_with_warmup', or "
                "decay_learning_rate=False."
            )
        # LambdaLR sets lr = base_lr * lambda(step) at every step, so the factor is applied once, never compounded
        lr_scheduler.lr_lambdas = [self._decayed(factor) for factor in lr_scheduler.lr_lambdas]
        self._decaying_scheduler = lr_scheduler

    def _decayed(self, factor):
        # `step`: the steps taken when the scheduler sets the rate of the next one
        return lambda step: factor(step) * self.remaining_fraction(step)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_taken = state.global_step
        if self.remaining_fraction(state.global_step) == 0.0:
            control.should_training_stop = True


class WallClockBudgetCallback(BudgetCallback):
    """A budget of `seconds` of wall-clock time from the start of training, so that two recipes can be compared at the
    same time budget rather than the same step count. Set `max_steps` above what the budget allows and a schedule that
    does not depend on it (e.g. constant). With `decay_learning_rate=True` the learning rate falls linearly with the
    time spent (`1 - elapsed / seconds`)."""

    def __init__(self, seconds: float, decay_learning_rate: bool = False):
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}.")
        super().__init__(decay_learning_rate)
        self.seconds = seconds
        self.start_time = None

    def remaining_fraction(self, step: int) -> float:
        return max(0.0, 1.0 - (time.perf_counter() - self.start_time) / self.seconds)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = time.perf_counter()


class StepBudgetCallback(BudgetCallback):
    """A budget of `steps` optimizer steps, spent as `WallClockBudgetCallback` spends its seconds (the learning rate
    falling as `1 - steps taken / steps`): it repeats the number of steps that a wall-clock budget gave a training on
    another machine, where the same seconds would give more or fewer steps."""

    def __init__(self, steps: int, decay_learning_rate: bool = False):
        if steps <= 0:
            raise ValueError(f"steps must be > 0, got {steps}.")
        super().__init__(decay_learning_rate)
        self.steps = steps

    def remaining_fraction(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.steps)
