"""Use the machine's cores under `accelerate launch` on a CPU.

`accelerate launch` without `--cpu` exports `OMP_NUM_THREADS=1` to its processes unless the user set a thread count,
so a CPU-only machine runs torch on one thread per process (measured: the main job at 98% CPU on 2 cores). When the
launcher chose that 1 (neither `OMP_NUM_THREADS` in the user's environment nor `--num_cpu_threads_per_process` on
its command line), each process takes its share of the physical cores instead. A thread count the user set is
kept, and so is every run on a GPU or outside `accelerate launch`.
"""

import logging
import os

import torch

logger = logging.getLogger(__name__)


def threads_per_process(
    environment: dict, launcher_environment: dict | None, launcher_command_line: list[str], physical_cores: int
) -> int | None:
    """The thread count a process should use, or None to leave torch's alone.

    `environment` is this process's, `launcher_environment` / `launcher_command_line` those of the process that
    started it (None when unknown).
    """
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in environment or "ACCELERATE_MIXED_PRECISION" in environment
    if not launched_by_accelerate or environment.get("OMP_NUM_THREADS") != "1" or launcher_environment is None:
        return None
    if "OMP_NUM_THREADS" in launcher_environment:  # the user's own setting
        return None
    if any(argument.startswith("--num_cpu_threads_per_process") for argument in launcher_command_line):
        return None
    local_processes = int(environment.get("LOCAL_WORLD_SIZE", 1))
    return max(1, physical_cores // local_processes)


def use_available_cores() -> int:
    """On a CPU under `accelerate launch`, give this process its share of the physical cores when the launcher, not
    the user, set one thread. Returns torch's thread count afterwards."""
    if torch.cuda.is_available():
        return torch.get_num_threads()
    import psutil

    launcher_environment, launcher_command_line = None, []
    try:  # the `accelerate launch` process: the parent, or (several processes) torchrun's parent
        for process in psutil.Process().parents()[:3]:
            command_line = process.cmdline()
            if "launch" in command_line and any(os.path.basename(part).startswith("accelerate") for part in command_line):
                launcher_environment, launcher_command_line = process.environ(), command_line
                break
    except (psutil.Error, OSError):
        pass
    threads = threads_per_process(
        dict(os.environ), launcher_environment, launcher_command_line, psutil.cpu_count(logical=False) or 1
    )
    if threads is not None and threads != torch.get_num_threads():
        logger.info("accelerate launch set OMP_NUM_THREADS=1; using %d threads per process (the physical cores "
                    "divided among the processes). Set OMP_NUM_THREADS to choose yourself.", threads)
        torch.set_num_threads(threads)
    return torch.get_num_threads()
