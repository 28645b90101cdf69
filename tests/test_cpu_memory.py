"""glibc's malloc keeps what a CPU run frees (trl_ladi.cpu_memory): measured as the resident memory after a free."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

CPU_MEMORY_MODULE = Path(__file__).resolve().parent.parent / "trl_ladi" / "cpu_memory.py"

# Allocates 48 blocks of 8 MiB, writes them, frees them, and prints the resident memory growth before and after the
# free, in MiB. glibc maps blocks this size on their own and unmaps them when freed, unless its thresholds are raised.
# The module is loaded from its file, not through the trl_ladi package, whose import (TRL, transformers) takes most of a
# probe's time; it needs nothing of the package.
PROBE = """
import importlib.util, sys, psutil, torch
spec = importlib.util.spec_from_file_location("cpu_memory", sys.argv[2])
cpu_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_memory)
kept = cpu_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
rss = lambda: psutil.Process().memory_info().rss / 2**20
start = rss()
blocks = [torch.ones(2 * 2**20) for _ in range(48)]
held = rss() - start
del blocks
print(kept, round(held), round(rss() - start))
"""

glibc_linux = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def probe(mode: str, **environment) -> tuple[str, float, float]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("MALLOC_", "GLIBC_TUNABLES", "TRL_LADI_KEEP_FREED_MEMORY"))}
    result = subprocess.run([sys.executable, "-c", PROBE, mode, str(CPU_MEMORY_MODULE)], capture_output=True,
                            text=True, timeout=120, env={**env, **environment})
    assert result.returncode == 0, result.stderr[-2000:]
    kept, held, after_free = result.stdout.split()
    return kept, float(held), float(after_free)


@glibc_linux
def test_freed_memory_stays_in_the_process_once_asked():
    kept, held, after_free = probe("keep")
    assert kept == "True" and held > 300  # 384 MiB written
    assert after_free > 0.8 * held  # freed, but still the process's: the next step reuses it
    kept, held, after_free = probe("default")
    assert held > 300 and after_free < 0.3 * held  # glibc's default: given back at once


@glibc_linux
def test_a_malloc_setting_the_user_made_is_kept():
    kept, held, after_free = probe("keep", MALLOC_TRIM_THRESHOLD_="0")
    assert kept == "False" and after_free < 0.3 * held
    kept, _, _ = probe("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=0")
    assert kept == "False"
    kept, held, after_free = probe("keep", TRL_LADI_KEEP_FREED_MEMORY="0")  # the opt-out: glibc's defaults
    assert kept == "False" and after_free < 0.3 * held
