"""Run the statistical tests under several seeds and thread counts and print the smallest margin of every check.

    python tests/check_statistical.py                      # seeds 0-4 x OMP_NUM_THREADS 1 and 2: 10 runs
    python tests/check_statistical.py --seeds 0 1 2 3 4 5 6 7 8 9 --threads 1 -- -k bimodal

Each run is ``python -m pytest -m statistical -q -p no:cacheprovider`` with ``TRL_LADI_TEST_SEED``, ``OMP_NUM_THREADS``
and ``MKL_NUM_THREADS`` set (tests/conftest.py passes the thread count to ``torch.set_num_threads``) and
``TRL_LADI_MARGIN_LOG`` pointing at a JSON-lines file, to which every ``margin.check`` of the tests appends a record.
Arguments after ``--`` go to pytest. The table lists, per check, the smallest margin over all runs and the run that
gave it, the margin relative to the bound and in the check's own ``scale`` (where the test gives one), and the mean
and standard deviation of the observed value over the runs with ``z`` = (mean - bound) / std, the distance of the
bound from the typical outcome in run-to-run standard deviations. The script exits with status 1 if any run failed.

A statistical test is healthy when its smallest margin is large against the spread of what it measures (a ``z`` of
several). If a margin is small, strengthen the test (more samples, a larger effect, more room); do not loosen its bound.
This file is not collected by pytest (its name does not start with ``test_``).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_once(seed: int, threads: int, log_path: Path, pytest_args: list[str]) -> dict:
    environment = dict(
        os.environ,
        TRL_LADI_TEST_SEED=str(seed),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TRL_LADI_MARGIN_LOG=str(log_path),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # the tests import `trl_ladi` (its `testing` builders included) from this checkout
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-m", "statistical", "-q", "-p", "no:cacheprovider", *pytest_args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True)
    return {
        "seed": seed,
        "threads": threads,
        "returncode": result.returncode,
        "seconds": time.perf_counter() - start,
        "summary": (result.stdout.strip().splitlines() or [""])[-1],
        "output": result.stdout + result.stderr,
    }


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict]) -> list[dict]:
    """One row per (test, check): the smallest margin over the runs and the spread of the observed values."""
    groups = defaultdict(list)
    for record in records:
        groups[record["test"], record["check"]].append(record)
    rows = []
    for (test, check), group in groups.items():
        worst = min(group, key=lambda r: r["margin"])
        observed = [r["observed"] for r in group]
        mean = statistics.fmean(observed)
        std = statistics.stdev(observed) if len(observed) > 1 else float("nan")
        sign = 1.0 if worst["op"] in (">", ">=") else -1.0
        scaled = [r["margin_in_scale"] for r in group if r["margin_in_scale"] is not None]
        relative = [r["relative_margin"] for r in group if r["relative_margin"] is not None]
        rows.append({
            "test": test,
            "check": check,
            "op": worst["op"],
            "bound": worst["bound"],
            "runs": len(group),
            "min_margin": worst["margin"],
            "worst_run": f"seed {worst['seed']}, {worst['threads']} thr",
            "worst_observed": worst["observed"],
            "min_relative_margin": min(relative) if relative else None,
            "min_margin_in_scale": min(scaled) if scaled else None,
            "mean": mean,
            "std": std,
            "z": sign * (mean - worst["bound"]) / std if std and std == std and std > 0 else float("inf"),
        })
    return sorted(rows, key=lambda row: (row["test"], row["check"]))


def _format(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(rows: list[dict]):
    headers = ["check", "op bound", "runs", "min margin", "rel", "in scale", "worst run", "mean", "std", "z"]
    lines = []
    for row in rows:
        test = row["test"].split("::", 1)[-1]
        lines.append([
            f"{test} | {row['check']}", f"{row['op']} {_format(row['bound'])}", str(row["runs"]),
            _format(row["min_margin"]), _format(row["min_relative_margin"], 2), _format(row["min_margin_in_scale"], 2),
            row["worst_run"], _format(row["mean"]), _format(row["std"], 2), _format(row["z"], 2),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="values of TRL_LADI_TEST_SEED")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="values of OMP_NUM_THREADS")
    parser.add_argument("--log_dir", default=None, help="where to keep the margin logs (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the table (and the runs) to this JSON file")
    parser.add_argument("pytest_args", nargs="*", help="after `--`: extra pytest arguments, e.g. -k or a file")
    args = parser.parse_args(argv)

    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="trl_ladi_margins_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    runs, records = [], []
    sweep_start = time.perf_counter()
    for seed in args.seeds:
        for threads in args.threads:
            log_path = log_dir / f"seed{seed}_threads{threads}.jsonl"
            log_path.unlink(missing_ok=True)
            run = run_once(seed, threads, log_path, args.pytest_args)
            run_records = read_records(log_path)
            logged_threads = {record["threads"] for record in run_records}
            if logged_threads and logged_threads != {threads}:
                run["returncode"] = run["returncode"] or 3
                run["summary"] += f" (torch ran with {sorted(logged_threads)} threads, not {threads})"
            records += run_records
            runs.append(run)
            status = "ok" if run["returncode"] == 0 else f"FAILED (exit {run['returncode']})"
            print(f"seed {seed}, {threads} thread(s): {status} in {run['seconds']:.0f} s -- {run['summary']}",
                  flush=True)
    total = time.perf_counter() - sweep_start

    rows = summarize(records)
    print()
    print_table(rows)
    print(f"\n{len(runs)} runs in {total / 60:.1f} min; margin logs in {log_dir}")
    failed = [run for run in runs if run["returncode"] != 0]
    for run in failed:
        print(f"\n----- seed {run['seed']}, {run['threads']} thread(s) failed; the end of its output:")
        print(run["output"][-4000:])
    if not records:
        print("no margin was logged: did any test run? (pytest arguments after `--` select tests)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "checks": rows, "seconds": total,
            "runs": [{key: value for key, value in run.items() if key != "output"} for run in runs],
        }, indent=1))
    return 1 if failed or not records else 0


if __name__ == "__main__":
    sys.exit(main())
