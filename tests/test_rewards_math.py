import pytest

from trl_ladi.rewards import math_accuracy_reward
from trl_ladi.rewards.math import extract_final_answer


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        # final-answer formats
        ("So we get \\boxed{42}.", "42", 1.0),
        ("First \\boxed{1}, then correcting: \\boxed{42}", "42", 1.0),
        ("Step 1: 40 + 2\n#### 42", "42", 1.0),
        ("The answer is 42.", "42", 1.0),
        ("The final answer is: $42$", "42", 1.0),
        ("We add 40 and 2 to get 42 apples", "42", 1.0),
        ("We add 40 and 2 to get 41", "42", 0.0),
        # numbers: commas, negatives, decimals, fractions
        ("The answer is 1,234.", "1234", 1.0),
        ("#### 1234", "1,234", 1.0),
        ("The answer is -7", "-7", 1.0),
        ("The answer is 7", "-7", 0.0),
        ("\\boxed{3.0}", "3", 1.0),
        ("\\boxed{3.5}", "3", 0.0),
        ("\\boxed{0.75}", "3/4", 1.0),
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("\\boxed{-\\frac{1}{2}}", "-1/2", 1.0),
        ("The total is $1{,}000$, so \\boxed{1{,}000}", "1000", 1.0),
        ("\\boxed{\\$18}", "18", 1.0),
        # LaTeX compared by math-verify
        ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
        ("\\boxed{x^2 + 1}", "1 + x^2", 1.0),
        ("\\boxed{(1, 2)}", "(1,2)", 1.0),
        # a nested box, and a box cut off by the token limit (falls back to the last number)
        ("\\boxed{\\frac{1}{\\sqrt{4}}}", "1/2", 1.0),
        ("the result is 5 so \\boxed{5", "5", 1.0),
        # GSM8K-style gold solutions
        ("The answer is 72.", "Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", 1.0),
        ("The answer is 24.", "Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", 0.0),
        ("#### 5", "The answer is \\boxed{5}", 1.0),
        # no answer in the completion
        ("I do not know.", "42", 0.0),
        ("", "42", 0.0),
        ("", "\\frac{1}{2}", 0.0),
        # unjudgeable gold
        ("The answer is 42.", None, None),
        ("The answer is 42.", "", None),
        ("The answer is 42.", "unknown", None),
        ("The answer is 42.", "see the figure", None),
    ],
)
def test_math_accuracy_reward_table(completion, gold, expected):
    assert math_accuracy_reward([completion], answer=[gold]) == [expected]


def test_conversational_completions_use_the_last_assistant_message():
    completions = [
        [{"role": "assistant", "content": "The answer is 42."}],
        [{"role": "user", "content": "\\boxed{7}"}, {"role": "assistant", "content": "#### 8"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{9}"}]}],
    ]
    assert math_accuracy_reward(completions, answer=["42", "7", "9"]) == [1.0, 0.0, 1.0]


def test_solution_column_and_extra_trl_kwargs():
    rewards = math_accuracy_reward(
        ["\\boxed{6}", "\\boxed{5}"],
        solution=["2 \\cdot 3 = \\boxed{6}", "#### 6"],
        prompts=["q1", "q2"],
        completion_ids=[[1], [2]],
        trainer_state=None,
    )
    assert rewards == [1.0, 0.0]


def test_integer_gold_answers():
    assert math_accuracy_reward(["#### 12", "#### 13"], answer=[12, 12.0]) == [1.0, 0.0]


def test_missing_answer_column_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\['answer', 'solution'\].*\['completions', 'label', 'prompts'\]"):
        math_accuracy_reward(["#### 1"], prompts=["q"], label=["1"])


def test_mismatched_lengths_are_a_clear_error():
    with pytest.raises(ValueError, match="2 completions but 1 gold answers"):
        math_accuracy_reward(["#### 1", "#### 2"], answer=["1"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{\\frac{1}{2}} and more text 7", "\\frac{1}{2}"),
        ("x = 3\n#### 1,234", "1,234"),
        ("The answer is $-5$.", "-5"),
        ("so the answer is 12 dollars.", "12"),
        ("numbers 1, 2 and .5", ".5"),
        ("no numbers here", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_works_outside_the_main_thread():
    """math-verify's own timeouts need the main thread; the reward must still judge LaTeX from a worker thread."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        rewards = pool.submit(math_accuracy_reward, ["\\boxed{\\sqrt{8}}", "\\boxed{3}"], answer=["2\\sqrt{2}", "3"])
    assert rewards.result() == [1.0, 1.0]
