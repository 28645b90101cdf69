"""Shared test settings, and the seed and margin fixtures of the statistical tests.

Statistical tests (marker ``statistical``) assert a learning effect or a sampling statistic: a loss goes down, a
reward rises, a clip ratio is positive, an empirical marginal matches its target. Their outcome depends on random
draws and on float rounding, which differs between CPUs and thread counts, so each one must hold because its effect
is large against its noise, not because one seed suits one machine. Two fixtures support that:

- ``statistical_seed``: the base seed, from the environment variable ``TRL_LADI_TEST_SEED`` (default 0). A statistical
  test derives every seed it uses from it (``statistical_seed + offset``), so that another value gives the test new
  random draws throughout. With the default 0 the tests use the seeds they were written with.
- ``margin``: ``margin.check(name, observed, bound, ">")`` asserts ``observed > bound`` (or ``>=``, ``<``, ``<=``) and,
  when ``TRL_LADI_MARGIN_LOG=path`` is set, appends a JSON line to that file with the test id, the check's name, the
  observed value, the bound, the margin (how far inside the bound the observed value is, in the observed quantity's
  own unit), the margin relative to ``|bound|``, and with ``scale=`` (an expected spread or size) the margin in that
  unit.

``python tests/check_statistical.py`` runs the statistical tests under several seeds and thread counts and prints the
smallest margin of every check (see the script's docstring and README's test section). ``OMP_NUM_THREADS`` (or
``MKL_NUM_THREADS``) sets torch's intra-op threads here explicitly, so that a run under 1 and under 2 threads really
sums in different orders.
"""

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED_VARIABLE = "TRL_LADI_TEST_SEED"
MARGIN_LOG_VARIABLE = "TRL_LADI_MARGIN_LOG"

_threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")
if _threads:
    torch.set_num_threads(int(_threads))


def pytest_report_header(config):
    return (f"statistical tests: {SEED_VARIABLE}={os.environ.get(SEED_VARIABLE, '0')}, "
            f"torch threads={torch.get_num_threads()}")


def pytest_collection_modifyitems(config, items):
    # a test that checks margins is a statistical test: keep the marker and the fixture in step, so that
    # `-m statistical` (and tests/check_statistical.py) runs every one of them
    for item in items:
        if "margin" in getattr(item, "fixturenames", ()) and item.get_closest_marker("statistical") is None:
            raise pytest.UsageError(f"{item.nodeid} uses the `margin` fixture: mark it @pytest.mark.statistical")


@pytest.fixture(scope="session")
def statistical_seed() -> int:
    """The base seed of the statistical tests (``TRL_LADI_TEST_SEED``, default 0); derive every seed from it."""
    return int(os.environ.get(SEED_VARIABLE, "0"))


class MarginChecker:
    """Asserts a statistical outcome against its bound and records how much room it had."""

    _compare = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}

    def __init__(self, test_id: str, seed: int):
        self.test_id, self.seed = test_id, seed
        self.log_path = os.environ.get(MARGIN_LOG_VARIABLE)

    def check(self, name: str, observed, bound, op: str = ">", scale=None, context=None):
        """Assert ``observed <op> bound``.

        The margin is ``observed - bound`` for ``>``/``>=`` and ``bound - observed`` for ``<``/``<=``: positive inside
        the bound, in the unit of the observed quantity. ``scale`` (optional) is the size the margin is best read
        against, e.g. the standard deviation of the observed value or a first-order prediction of it; the log then
        also holds ``margin / scale``. ``context`` is shown when the check fails (e.g. the whole reward curve).
        """
        if op not in self._compare:
            raise ValueError(f"op must be one of {list(self._compare)}, got {op!r}")
        observed, bound = float(observed), float(bound)
        margin = observed - bound if op in (">", ">=") else bound - observed
        record = {
            "test": self.test_id,
            "check": name,
            "observed": observed,
            "op": op,
            "bound": bound,
            "margin": margin,
            "relative_margin": margin / abs(bound) if bound != 0 else None,
            "scale": None if scale is None else float(scale),
            "margin_in_scale": None if not scale else margin / float(scale),
            "seed": self.seed,
            "threads": torch.get_num_threads(),
        }
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        ok = self._compare[op](observed, bound) and not math.isnan(observed)
        assert ok, f"{name}: observed {observed:.6g} is not {op} {bound:.6g}" + (f" ({context})" if context else "")
        return margin


@pytest.fixture
def margin(request, statistical_seed) -> MarginChecker:
    """``margin.check(name, observed, bound, op)``: assert a statistical outcome and log its margin (see above)."""
    return MarginChecker(request.node.nodeid, statistical_seed)
