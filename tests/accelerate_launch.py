"""The `accelerate launch` command line of the multi-process tests: CPU processes with a config of examples/."""

import os
import shutil
import sys

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate_configs")


def accelerate_launch_command(config: str, num_processes: int = 2) -> list[str]:
    """`accelerate launch --num_processes N --config_file examples/accelerate_configs/<config>.yaml`; the script and
    its arguments follow. The `accelerate` of this Python's environment is preferred to one on the PATH."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    return [accelerate, "launch", "--num_processes", str(num_processes), "--config_file",
            os.path.join(CONFIGS, f"{config}.yaml")]
