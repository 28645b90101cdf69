"""Reward functions with TRL's signature: `reward(completions, **dataset_columns) -> list[float | None]`."""

from .code import (
    CodeExecutor,
    ExecutionResult,
    LocalSandboxExecutor,
    code_execution_reward,
    make_code_execution_reward,
)
from .math import math_accuracy_reward


__all__ = [
    "CodeExecutor",
    "ExecutionResult",
    "LocalSandboxExecutor",
    "code_execution_reward",
    "make_code_execution_reward",
    "math_accuracy_reward",
]
