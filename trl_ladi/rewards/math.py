"""Accuracy reward for math problems with a single final answer (GSM8K, MATH, the built-in chain-sum data).

The reward follows TRL's reward-function signature: it receives the batch's `completions` and the dataset's other
columns as keyword arguments, and returns one float (or `None`) per completion.
"""

import re
import threading
from fractions import Fraction


__all__ = ["extract_final_answer", "math_accuracy_reward"]

# The gold answer column: GSM8K and most math datasets call it `answer`, MATH-style datasets `solution`.
GOLD_ANSWER_COLUMNS = ("answer", "solution")

# A number as written in text: optional sign, thousands separators, decimals (".5" included).
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FRACTION_RE = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")
_LATEX_FRACTION_RE = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_GSM_ANSWER_RE = re.compile(r"####\s*(.+)")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)


def completion_text(completion) -> str:
    """The text of a completion: a plain string, or the last assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        assistant_messages = [m for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
        messages = assistant_messages or [m for m in completion if isinstance(m, dict)]
        if not messages:
            return ""
        content = messages[-1].get("content") or ""
        if isinstance(content, list):  # multimodal-style content: [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content
    raise TypeError(
        f"A completion must be a string or a list of {{'role', 'content'}} messages, got {type(completion).__name__}."
    )


def _last_boxed_content(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_brace = text.find("{", start)
    if open_brace < 0:
        return None
    depth = 0
    for position in range(open_brace, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : position].strip()
    return None  # unbalanced: the completion was cut inside the box


def _clean_answer(answer: str) -> str:
    """Strips the decoration around a final answer: math delimiters, a trailing full stop, spacing commands."""
    answer = answer.strip().rstrip(".").strip()
    for wrapper in ("$$", "$", "\\(", "\\)", "\\[", "\\]", "**"):
        answer = answer.removeprefix(wrapper).removesuffix(wrapper).strip()
    answer = answer.replace("{,}", "").replace("\\!", "").replace("\\,", "").replace("\\$", "")
    return answer.rstrip(".").strip()


def _answer_from_sentence(sentence: str) -> str:
    """The answer in "The answer is ...": the whole sentence if it is math, else its first number."""
    sentence = _clean_answer(re.split(r"\.\s|\n", sentence, maxsplit=1)[0])
    if _as_number(sentence) is not None or "\\" in sentence:
        return sentence
    number = _NUMBER_RE.search(sentence)
    return number.group(0) if number else sentence


def extract_final_answer(text: str) -> str | None:
    """Extracts the final answer of a solution text, or `None` when it gives none.

    Looked for in this order: the last `\\boxed{}`, a GSM8K-style `#### N`, "The answer is N" (also "final answer:"),
    and finally the last number in the text.
    """
    boxed = _last_boxed_content(text)
    if boxed is not None:
        return _clean_answer(boxed)
    gsm_matches = _GSM_ANSWER_RE.findall(text)
    if gsm_matches:
        return _answer_from_sentence(gsm_matches[-1])
    sentence_matches = _ANSWER_IS_RE.findall(text)
    if sentence_matches:
        return _answer_from_sentence(sentence_matches[-1])
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _as_number(answer: str) -> Fraction | None:
    """The exact value of an answer that is a plain number or a numeric fraction ("1,234", "-3.0", "3/4",
    "\\frac{3}{4}"), else `None`."""
    answer = _clean_answer(answer).removesuffix("%").strip()
    if re.fullmatch(_NUMBER, answer):
        return Fraction(answer.replace(",", ""))
    fraction = _FRACTION_RE.match(answer) or _LATEX_FRACTION_RE.match(answer)
    if fraction is None:
        return None
    if fraction.re is _LATEX_FRACTION_RE:
        sign, numerator, denominator = fraction.groups()
        numerator = sign + numerator
    else:
        numerator, denominator = fraction.groups()
    denominator = Fraction(denominator.replace(",", ""))
    return Fraction(numerator.replace(",", "")) / denominator if denominator != 0 else None


def _parse_with_math_verify(answer: str) -> list:
    """Parses an answer with math-verify."""
    from math_verify import parse

    # math-verify's timeouts use SIGALRM, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    # A bare math answer must be wrapped in `$`, or math-verify reads only its last number ("2\\sqrt{2}" -> 2,
    # "(1, 2)" -> 2); prose ("42 apples", "see the figure") is searched as it is.
    if "$" in answer or _is_prose(answer):
        return parse(answer, parsing_timeout=timeout)
    return parse(f"${answer}$", parsing_timeout=timeout)


def _is_prose(answer: str) -> bool:
    """Whether an answer holds words (two letters or more outside LaTeX commands and `\\text{}`)."""
    math_only = re.sub(r"\\text\{[^}]*\}|\\[a-zA-Z]+", " ", answer)
    return re.search(r"[a-zA-Z]{2,}", math_only) is not None


def _gold_answer(gold) -> str | None:
    """The final answer inside a gold column value (a bare answer, a GSM8K `... #### 42`, or a `\\boxed{}` solution)."""
    if gold is None:
        return None
    gold = str(gold).strip()
    if not gold:
        return None
    if "####" in gold or "\\boxed" in gold or "\\fbox" in gold:
        return extract_final_answer(gold)
    return _clean_answer(gold)


def _score(predicted: str | None, gold: str | None) -> float | None:
    """1.0 if `predicted` equals `gold`, 0.0 if not, `None` if the gold answer cannot be judged."""
    if not gold:
        return None
    gold_number = _as_number(gold)
    predicted_number = _as_number(predicted) if predicted else None
    if gold_number is not None and predicted_number is not None:
        return float(gold_number == predicted_number)

    from math_verify import verify

    parsed_gold = _parse_with_math_verify(gold)
    if not parsed_gold:
        return None
    if not predicted:
        return 0.0
    parsed_prediction = _parse_with_math_verify(predicted)
    if not parsed_prediction:
        return 0.0
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return float(verify(parsed_gold, parsed_prediction, timeout_seconds=timeout))


def math_accuracy_reward(completions: list, answer: list | None = None, solution: list | None = None, **kwargs):
    """Rewards 1.0 for a completion whose final answer equals the gold answer, 0.0 otherwise.

    Args:
        completions: Plain strings, or conversations (lists of `{"role", "content"}` messages; the last assistant
            message is judged).
        answer: The gold answers, one per completion: a bare answer (`"42"`, `"\\frac{3}{4}"`), a GSM8K-style
            solution ending in `#### 42`, or a solution with a `\\boxed{}` answer.
        solution: Read instead of `answer` when the dataset has a `solution` column and no `answer` column.
        **kwargs: The other dataset columns and TRL's extra arguments, ignored.

    Returns:
        One value per completion: 1.0, 0.0, or `None` when the gold answer is missing or cannot be parsed (TRL
        turns `None` into NaN and leaves the row out of this reward).

    The final answer of a completion is its last `\\boxed{}`, a `#### N` line, "The answer is N", or its last number.
    Numbers are compared exactly (`1,234` == `1234`, `3.0` == `3`, `3/4` == `0.75`); anything else (LaTeX
    expressions, intervals) is compared with math-verify.
    """
    golds = answer if answer is not None else solution
    if golds is None:
        received = ["completions"] + sorted(kwargs)
        raise ValueError(
            "math_accuracy_reward needs the gold answers in a dataset column named one of "
            f"{list(GOLD_ANSWER_COLUMNS)}, but received only the columns {received}. "
            "Rename your dataset's answer column to `answer`."
        )
    if len(golds) != len(completions):
        raise ValueError(
            f"math_accuracy_reward got {len(completions)} completions but {len(golds)} gold answers; "
            "pass one gold answer per completion."
        )
    return [
        _score(extract_final_answer(completion_text(completion)), _gold_answer(gold))
        for completion, gold in zip(completions, golds)
    ]
