import re

import datasets
import pytest

from trl_ladi.data import (
    MATH_INSTRUCTION,
    load_humaneval_dataset,
    load_math_dataset,
    load_user_dataset,
    longest_sentence_tokens,
    prepare_cot_dataset,
    split_gsm8k_solution,
    split_reasoning_into_sentences,
)
from trl_ladi.testing import make_tokenizer


# ---------------------------------------------------------------- GSM8K solutions


def test_split_gsm8k_solution_strips_calculator_annotations():
    solution = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
        "#### 72"
    )
    reasoning, answer = split_gsm8k_solution(solution)
    assert reasoning == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert answer == "72"


@pytest.mark.parametrize(
    "solution, expected_answer",
    [
        ("He owes 3 - 8 = -5 dollars.\n#### -5", "-5"),
        ("The total is 1,200 + 34 = 1,234.\n####  1,234 ", "1234"),
        ("Half of 7 is 3.5\n#### 3.5", "3.5"),
    ],
)
def test_split_gsm8k_solution_answers(solution, expected_answer):
    reasoning, answer = split_gsm8k_solution(solution)
    assert answer == expected_answer
    assert "####" not in reasoning


def test_split_gsm8k_solution_keeps_commas_in_the_reasoning():
    reasoning, _ = split_gsm8k_solution("She has 1,000 apples.\n#### 1,000")
    assert reasoning == "She has 1,000 apples."


@pytest.mark.parametrize("solution", ["The answer is 4.", "The answer is 4.\n####   "])
def test_split_gsm8k_solution_without_answer_raises(solution):
    with pytest.raises(ValueError, match="####"):
        split_gsm8k_solution(solution)


# ---------------------------------------------------------------- sentences


def test_sentences_keep_decimals_whole():
    assert split_reasoning_into_sentences("Each costs 3.5 dollars. So 2 cost 7.0 dollars! Right? Yes.") == [
        "Each costs 3.5 dollars.",
        "So 2 cost 7.0 dollars!",
        "Right?",
        "Yes.",
    ]


def test_sentences_split_on_newlines_and_drop_empty_lines():
    assert split_reasoning_into_sentences("  98 - 93 = 5\n\n5 + 77 = 82  \n   \n82 + 13 = 95\n") == [
        "98 - 93 = 5",
        "5 + 77 = 82",
        "82 + 13 = 95",
    ]


def test_sentences_keep_list_numbers_with_their_sentence():
    reasoning = "Let's solve this step by step:\n\n1. Initial amounts: 35 apples.\n2. Bought 93 more."
    assert split_reasoning_into_sentences(reasoning) == [
        "Let's solve this step by step:",
        "1. Initial amounts: 35 apples.",
        "2. Bought 93 more.",
    ]


def test_sentences_max_sentences_merges_the_tail():
    reasoning = "One. Two. Three.\nFour"
    assert split_reasoning_into_sentences(reasoning, max_sentences=2) == ["One.", "Two. Three. Four"]
    assert split_reasoning_into_sentences(reasoning, max_sentences=4) == ["One.", "Two.", "Three.", "Four"]
    assert split_reasoning_into_sentences(reasoning, max_sentences=1) == ["One. Two. Three. Four"]
    with pytest.raises(ValueError, match="max_sentences"):
        split_reasoning_into_sentences(reasoning, max_sentences=0)


def test_longest_sentence_tokens_counts_sentences_as_the_stages_cut_them():
    tokenizer = make_tokenizer()  # one token per whitespace-separated word
    rows = datasets.Dataset.from_dict({"reasoning": ["1 + 2 = 3\n3 + 4 = 7", "5 + 6 = 11 + 2 = 13\n1 + 1 = 2"]})
    assert longest_sentence_tokens(rows, tokenizer) == 9  # "5 + 6 = 11 + 2 = 13"
    # one block per row joins a row's sentences: "5 + 6 = 11 + 2 = 13 1 + 1 = 2"
    assert longest_sentence_tokens(rows, tokenizer, max_sentences=1) == 14
    with pytest.raises(ValueError, match="no 'reasoning' column.*prepare_cot_dataset"):
        longest_sentence_tokens(datasets.Dataset.from_dict({"solution": ["1 + 1 = 2\n#### 2"]}), tokenizer)


# ---------------------------------------------------------------- math datasets


def _question(row) -> str:
    return row["prompt"][0]["content"]


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic", "gsm_symbolic"])
def test_math_dataset_columns_and_solutions(name):
    dataset = load_math_dataset(name, split="train", num_examples=30)
    assert dataset.column_names == ["prompt", "reasoning", "answer", "solution"]
    assert len(dataset) == 30
    for row in dataset:
        assert row["prompt"][0]["role"] == "user"
        assert _question(row).endswith("\n" + MATH_INSTRUCTION)
        assert row["reasoning"] and row["answer"]
        assert row["solution"] == f"{row['reasoning']}\n#### {row['answer']}"
        assert split_gsm8k_solution(row["solution"]) == (row["reasoning"], row["answer"])
        float(row["answer"])  # a number


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic"])
def test_arithmetic_answers_and_steps_are_correct(name):
    dataset = load_math_dataset(name, split="train", num_examples=200)
    terms_seen = set()
    for row in dataset:
        expression = re.search(r"(-?\d+(?: [+-] \d+)+)", _question(row)).group(1)
        terms_seen.add(len(expression.split(" ")) // 2 + 1)
        assert int(row["answer"]) == eval(expression)  # only digits, + and -: safe to evaluate
        steps = row["reasoning"].split("\n")
        assert len(steps) == expression.count(" ") // 2
        for step in steps:  # every partial sum is right, and each step starts from the previous result
            left, result = step.split(" = ")
            assert eval(left) == int(result)
        assert steps[-1].endswith(f"= {row['answer']}")
    assert terms_seen == ({3, 4} if name == "chain_sum" else {2})


def test_math_dataset_is_deterministic_and_seeded():
    first = load_math_dataset("chain_sum", split="train", num_examples=50, seed=3)
    second = load_math_dataset("chain_sum", split="train", num_examples=50, seed=3)
    other_seed = load_math_dataset("chain_sum", split="train", num_examples=50, seed=4)
    assert first.to_dict() == second.to_dict()
    assert first["answer"] != other_seed["answer"]


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic", "gsm_symbolic"])
def test_math_train_and_test_splits_are_disjoint(name):
    train = load_math_dataset(name, split="train", num_examples=1500)
    test = load_math_dataset(name, split="test", num_examples=150)
    train_questions = {_question(row) for row in train}
    test_questions = {_question(row) for row in test}
    assert len(train_questions) == len(train) and len(test_questions) == len(test)  # no duplicates inside a split
    assert not train_questions & test_questions


def test_math_dataset_plain_prompt_and_default_sizes():
    dataset = load_math_dataset("basic_arithmetic", split="test", conversational=False, instruction=None)
    assert len(dataset) == 200
    assert isinstance(dataset[0]["prompt"], str) and dataset[0]["prompt"].startswith("Calculate ")


def test_math_dataset_rejects_unknown_names():
    with pytest.raises(ValueError, match="chain_sum"):
        load_math_dataset("gsm8k")
    with pytest.raises(ValueError, match="'train'"):
        load_math_dataset("chain_sum", split="validation")


# ---------------------------------------------------------------- prepare_cot_dataset


def test_prepare_cot_dataset_splits_solutions():
    dataset = datasets.Dataset.from_dict(
        {"question": ["1 + 2?", "3 * 4?"], "solution": ["1 + 2 = 3\n#### 3", "3 * 4 = <<3*4=12>>12\n#### 12"]}
    )
    prepared = prepare_cot_dataset(dataset, prompt_column="question")
    assert set(prepared.column_names) == {"prompt", "solution", "reasoning", "answer"}
    assert prepared["prompt"] == ["1 + 2?", "3 * 4?"]
    assert prepared["reasoning"] == ["1 + 2 = 3", "3 * 4 = 12"]
    assert prepared["answer"] == ["3", "12"]


def test_prepare_cot_dataset_keeps_reasoning_and_answer_and_extra_columns():
    dataset = datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "2 + 2?"}]], "reasoning": [" 2 + 2 = 4 "], "answer": [4], "id": [7]}
    )
    prepared = prepare_cot_dataset(dataset)
    assert prepared[0] == {
        "prompt": [{"role": "user", "content": "2 + 2?"}],
        "id": 7,
        "reasoning": "2 + 2 = 4",
        "answer": "4",
    }


@pytest.mark.parametrize(
    "columns, named_in_error",
    [
        (["question", "solution"], "'prompt'"),
        (["prompt", "reasoning"], "'reasoning' + 'answer' (or 'solution')"),
        (["prompt", "answer"], "'reasoning' + 'answer' (or 'solution')"),
    ],
)
def test_prepare_cot_dataset_names_missing_columns(columns, named_in_error):
    dataset = datasets.Dataset.from_dict({column: ["x"] for column in columns})
    with pytest.raises(ValueError) as error:
        prepare_cot_dataset(dataset)
    assert named_in_error in str(error.value)
    assert f"Available columns: {columns}" in str(error.value)


def _dataset_with_bad_rows():
    solutions = ["1 + 1 = 2\n#### 2", "no marker here", "2 + 2 = 4\n#### 4", "#### 5", "also no marker"]
    return datasets.Dataset.from_dict({"prompt": [f"q{i}" for i in range(5)], "solution": solutions})


def test_prepare_cot_dataset_reports_bad_rows_with_their_indices():
    with pytest.raises(ValueError) as error:
        prepare_cot_dataset(_dataset_with_bad_rows())
    message = str(error.value)
    assert "no '#### answer' line in 'solution': rows [1, 4] (2 in all)" in message
    assert "empty 'reasoning in solution': rows [3] (1 in all)" in message
    assert "drop_invalid=True" in message


def test_prepare_cot_dataset_drops_bad_rows_on_request():
    with pytest.warns(UserWarning, match=r"rows \[1, 4\]"):
        prepared = prepare_cot_dataset(_dataset_with_bad_rows(), drop_invalid=True)
    assert prepared["prompt"] == ["q0", "q2"]
    assert prepared["answer"] == ["2", "4"]


def test_prepare_cot_dataset_rejects_a_dataset_dict():
    dataset_dict = datasets.DatasetDict({"train": _dataset_with_bad_rows()})
    with pytest.raises(TypeError, match=r"dataset\['train'\]"):
        prepare_cot_dataset(dataset_dict)


def test_prepare_cot_dataset_accepts_the_embedded_math_data():
    math = load_math_dataset("gsm_symbolic", num_examples=10)
    prepared = prepare_cot_dataset(math.remove_columns(["reasoning", "answer"]))
    assert prepared["reasoning"] == math["reasoning"]
    assert prepared["answer"] == math["answer"]


# ---------------------------------------------------------------- user datasets


def test_load_user_dataset_from_files_and_folders(tmp_path):
    dataset = datasets.Dataset.from_dict({"prompt": ["a", "b"], "solution": ["x\n#### 1", "y\n#### 2"]})
    dataset.to_json(tmp_path / "data.jsonl")
    dataset.to_csv(tmp_path / "data.csv", index=False)
    dataset.to_parquet(tmp_path / "data.parquet")
    dataset.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(tmp_path / "saved_dict")

    for source in ["data.jsonl", "data.csv", "data.parquet", "saved"]:
        assert load_user_dataset(str(tmp_path / source)).to_dict() == dataset.to_dict(), source
    assert len(load_user_dataset(str(tmp_path / "saved_dict"), split="test")) == 1
    with pytest.raises(ValueError, match="validation"):
        load_user_dataset(str(tmp_path / "saved_dict"), split="validation")


def test_load_user_dataset_missing_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_user_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="Offline"):  # conftest sets HF_HUB_OFFLINE=1
        load_user_dataset("some-user/some-dataset")


# ---------------------------------------------------------------- HumanEval


def test_load_humaneval_dataset():
    dataset = load_humaneval_dataset()
    assert len(dataset) == 164
    assert dataset.column_names == ["prompt", "code_prompt", "test", "entry_point", "task_id", "canonical_solution"]
    first = dataset[0]
    assert first["task_id"] == "HumanEval/0" and first["entry_point"] == "has_close_elements"
    assert first["prompt"][0]["role"] == "user"
    assert first["code_prompt"] in first["prompt"][0]["content"]
    assert "def check(candidate)" in first["test"]

    plain = load_humaneval_dataset(conversational=False)
    assert isinstance(plain[0]["prompt"], str) and first["code_prompt"] in plain[0]["prompt"]
