"""The text chain-of-thought SFT baseline (trl_ladi.baselines)."""

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig

from trl_ladi.baselines import text_sft_dataset, train_text_sft
from trl_ladi.testing import make_tokenizer, tiny_causal_lm

ROWS = {
    "prompt": [[{"role": "user", "content": f"what is {a} plus {b} ?"}] for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]],
    "reasoning": [f"{a} + {b} = {a + b} ." for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]],
    "answer": [str(a + b) for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]],
}


def test_completion_is_the_reasoning_then_the_answer_in_the_template():
    rows = text_sft_dataset(datasets.Dataset.from_dict(ROWS), answer_template="the answer is {answer}")
    assert rows.column_names == ["prompt", "completion"]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "1 + 2 = 3 .\nthe answer is 3"}]
    plain = dict(ROWS, prompt=["what is 1 plus 2 ?"] * 4)
    assert text_sft_dataset(datasets.Dataset.from_dict(plain))[0]["completion"] == "\n1 + 2 = 3 .\n#### 3"


def test_bad_rows_and_templates_get_clear_errors():
    with pytest.raises(ValueError, match="answer_template must contain"):
        text_sft_dataset(datasets.Dataset.from_dict(ROWS), answer_template="the answer")
    with pytest.raises(ValueError, match="missing column"):
        text_sft_dataset(datasets.Dataset.from_dict({"question": ["what is 1 ?"], "answer": ["1"]}))


def completion_loss(model, tokenizer) -> float:
    """Mean NLL of the completion tokens given the prompt, computed here independently of TRL."""
    total, count = 0.0, 0
    for prompt, reasoning, answer in zip(ROWS["prompt"], ROWS["reasoning"], ROWS["answer"]):
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(f"{reasoning}\n#### {answer}", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        token_nll = -log_probs[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :]
        total, count = total + token_nll.sum().item(), count + len(token_nll)
    return total / count


@pytest.mark.statistical
def test_text_sft_lowers_the_completion_loss_and_saves_a_loadable_model(tmp_path, statistical_seed, margin):
    tokenizer = make_tokenizer()
    torch.manual_seed(statistical_seed)
    tiny_causal_lm(tokenizer, seed=None, initializer_range=0.2).save_pretrained(tmp_path / "base")
    before = completion_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokenizer)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=40, learning_rate=1e-2, per_device_train_batch_size=4,
                     use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=10,
                     seed=statistical_seed)
    output_dir = train_text_sft(str(tmp_path / "base"), datasets.Dataset.from_dict(ROWS), args, tokenizer=tokenizer)
    after = completion_loss(AutoModelForCausalLM.from_pretrained(output_dir), tokenizer)
    # 40 steps on 4 rows memorise them: measured 5.7 -> 0.017 nats per token (seed 0)
    margin.check("completion loss after / before", after / before, 0.5, "<", context=(before, after))


def test_wall_clock_budget_stops_training_once_the_time_is_spent():
    import time

    from transformers import TrainerControl, TrainerState

    from trl_ladi.baselines import WallClockBudgetCallback

    callback = WallClockBudgetCallback(seconds=0.2)
    control, state = TrainerControl(), TrainerState()
    callback.on_train_begin(None, state, control)
    callback.on_step_end(None, state, control)
    assert not control.should_training_stop  # well inside the budget
    time.sleep(0.25)
    callback.on_step_end(None, state, control)
    assert control.should_training_stop
    with pytest.raises(ValueError, match="seconds must be > 0"):
        WallClockBudgetCallback(0)


def test_wall_clock_budget_decays_the_learning_rate_linearly_in_the_time_spent(monkeypatch):
    import torch
    from transformers import TrainerControl, TrainerState
    from transformers.optimization import get_constant_schedule_with_warmup

    import trl_ladi.baselines as baselines

    now = [100.0]  # a clock the test moves
    monkeypatch.setattr(baselines.time, "perf_counter", lambda: now[0])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=2)
    callback = baselines.WallClockBudgetCallback(seconds=10.0, decay_learning_rate=True)
    control, state = TrainerControl(), TrainerState()
    callback.on_train_begin(None, state, control)
    learning_rates = []
    for elapsed in (1.0, 2.0, 5.0, 9.0, 10.0):  # the time at each step's scheduler update
        callback.on_step_begin(None, state, control, lr_scheduler=scheduler)
        optimizer.step()
        now[0] = 100.0 + elapsed
        scheduler.step()
        state.global_step += 1
        learning_rates.append(optimizer.param_groups[0]["lr"])
        callback.on_step_end(None, state, control)
    # warm-up (steps 1, 2 of 2) times the unspent share of the budget, never compounded across steps
    expected = [0.1 * 0.5 * 0.9, 0.1 * 1.0 * 0.8, 0.1 * 0.5, 0.1 * 0.1, 0.0]
    assert learning_rates == pytest.approx(expected, abs=1e-12)
    assert scheduler.get_last_lr()[0] == 0.0  # what the trainer logs
    assert control.should_training_stop

    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    other = baselines.WallClockBudgetCallback(seconds=10.0, decay_learning_rate=True)
    other.on_train_begin(None, state, control)
    with pytest.raises(TypeError, match="scales a LambdaLR schedule.*decay_learning_rate=False"):
        other.on_step_begin(None, state, control, lr_scheduler=plateau)


def test_step_budget_stops_after_its_steps_and_decays_the_learning_rate_with_the_steps_taken():
    import torch
    from transformers import TrainerControl, TrainerState
    from transformers.optimization import get_constant_schedule_with_warmup

    from trl_ladi.baselines import StepBudgetCallback

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=2)
    callback = StepBudgetCallback(steps=4, decay_learning_rate=True)
    control, state = TrainerControl(), TrainerState()
    callback.on_train_begin(None, state, control)
    learning_rates, stopped_after = [], None
    for step in range(1, 7):  # as the trainer does: step, schedule, callbacks; it stops when told to
        callback.on_step_begin(None, state, control, lr_scheduler=scheduler)
        optimizer.step()
        scheduler.step()
        state.global_step = step
        learning_rates.append(optimizer.param_groups[0]["lr"])
        callback.on_step_end(None, state, control)
        if control.should_training_stop:
            stopped_after = step
            break
    assert stopped_after == 4 and callback.steps_taken == 4
    # the rate of the step after `s` steps: warm-up (s of 2) times the unspent share 1 - s / 4, never compounded
    assert learning_rates == pytest.approx([0.1 * 0.5 * 0.75, 0.1 * 1.0 * 0.5, 0.1 * 0.25, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="steps must be > 0"):
        StepBudgetCallback(0)
