"""Thread count under `accelerate launch` on a CPU (trl_ladi.cpu_threads)."""

from trl_ladi.cpu_threads import threads_per_process

LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}  # what accelerate exports to its process


def test_the_launchers_one_thread_becomes_the_cores_share():
    assert threads_per_process(LAUNCHED, {}, ["python", "accelerate", "launch", "main.py"], physical_cores=2) == 2
    two_processes = dict(LAUNCHED, LOCAL_WORLD_SIZE="2")
    assert threads_per_process(two_processes, {}, ["accelerate", "launch", "x.py"], physical_cores=8) == 4
    assert threads_per_process(dict(LAUNCHED, LOCAL_WORLD_SIZE="4"), {}, ["accelerate", "launch"], 2) == 1


def test_a_thread_count_the_user_chose_is_kept():
    # OMP_NUM_THREADS in the user's environment, or --num_cpu_threads_per_process on the launcher's command line
    assert threads_per_process(LAUNCHED, {"OMP_NUM_THREADS": "1"}, ["accelerate", "launch", "x.py"], 2) is None
    command_line = ["accelerate", "launch", "--num_cpu_threads_per_process", "1", "x.py"]
    assert threads_per_process(LAUNCHED, {}, command_line, 2) is None
    assert threads_per_process(dict(LAUNCHED, OMP_NUM_THREADS="3"), {}, ["accelerate", "launch"], 2) is None


def test_runs_outside_accelerate_launch_are_left_alone():
    assert threads_per_process({"OMP_NUM_THREADS": "1"}, {}, ["python", "x.py"], 2) is None
    assert threads_per_process(LAUNCHED, None, [], 2) is None  # the launcher could not be found
