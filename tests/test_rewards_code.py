import os
import shutil
import socket
import tempfile
import textwrap
import time

import pytest

from trl_ladi.rewards import (
    CodeExecutor,
    ExecutionResult,
    LocalSandboxExecutor,
    code_execution_reward,
    make_code_execution_reward,
)
from trl_ladi.rewards.code import build_program, extract_code


TIMEOUT = 3.0
PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
TEST = "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"
CORRECT_BODY = "    return sum(xs)\n"
SECRET_NAME, SECRET_VALUE = "TRL_LADI_TEST_SECRET", "s3cr3t-value-8c1f2b"


@pytest.fixture(scope="module")
def workdir_root():
    """A folder only the sandboxes use, so that its path marks their processes; traversable by `nobody`."""
    root = tempfile.mkdtemp(prefix="trl_ladi_test_sandboxes_")
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def executor(workdir_root):
    return LocalSandboxExecutor(workdir_root=workdir_root)


@pytest.fixture(scope="module")
def reward(executor):
    return make_code_execution_reward(executor, timeout=TIMEOUT, max_workers=4)


def hostile(code: str) -> str:
    """A completion doing `code` first, then solving the problem: it passes only if `code` succeeds."""
    return textwrap.dedent(code) + "\n\ndef total(xs):\n    return sum(xs)\n"


def score(reward, completions, **columns):
    n = len(completions)
    columns = {"test": [TEST] * n, "entry_point": ["total"] * n, "prompts": [PROMPT] * n, **columns}
    return reward(completions=completions, **columns)


def sandbox_processes(marker: str) -> list[int]:
    """Ids of live processes whose command line mentions `marker`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    pids.append(int(pid))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def assert_host_untouched(workdir_root):
    assert sandbox_processes(workdir_root) == []
    assert os.listdir(workdir_root) == []  # every sandbox folder was removed


def test_correct_and_wrong_completions(reward, workdir_root):
    completions = [
        CORRECT_BODY,  # a body completing the prompt
        "```python\ndef total(xs):\n    return sum(xs)\n```",  # a full function in a fenced block
        "Here you go:\n```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```\nDone.",  # needs the import
        "    return len(xs)\n",  # wrong
        "    return sum(xs\n",  # syntax error
        "```python\ndef total(xs):\n    return sum(xs)\n",  # unterminated fence (cut by the token limit)
    ]
    assert score(reward, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert_host_untouched(workdir_root)


def test_conversational_completions_and_code_prompt_column(reward):
    conversation = [{"role": "user", "content": "Write total."}]
    completions = [
        [{"role": "assistant", "content": "```python\ndef total(xs):\n    return sum(xs)\n```"}],
        [{"role": "assistant", "content": CORRECT_BODY}],
    ]
    # A conversational prompt is not code: the prefix comes from `code_prompt`.
    rewards = score(reward, completions, prompts=[conversation] * 2, code_prompt=[PROMPT] * 2)
    assert rewards == [1.0, 1.0]
    # Without `code_prompt`, a body has nothing to complete.
    assert score(reward, completions, prompts=[conversation] * 2) == [1.0, 0.0]


def test_early_exit_does_not_pass(reward):
    completions = [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "raise SystemExit\n",
    ]
    assert score(reward, completions) == [0.0, 0.0, 0.0]


def test_timeout_kills_the_program(reward, workdir_root):
    start = time.monotonic()
    rewards = score(reward, ["    while True:\n        pass\n", "    import time\n    time.sleep(60)\n"])
    elapsed = time.monotonic() - start
    assert rewards == [0.0, 0.0]
    assert elapsed < TIMEOUT + 5
    assert_host_untouched(workdir_root)


def test_programs_run_in_parallel(executor):
    reward = make_code_execution_reward(executor, timeout=TIMEOUT, max_workers=4)
    start = time.monotonic()
    rewards = score(reward, ["    import time\n    time.sleep(1)\n    return sum(xs)\n"] * 4)
    assert rewards == [1.0] * 4
    assert time.monotonic() - start < 3.5  # four 1 s sleeps, not one after another


def test_fork_bomb(reward, workdir_root):
    completions = [
        hostile("import os\nwhile True:\n    os.fork()"),
        hostile("import subprocess\nsubprocess.run(['sleep', '30'])"),
        hostile("import os\nos.system('sleep 30 &')"),
        hostile("import multiprocessing\nmultiprocessing.Process(target=print).start()"),
    ]
    start = time.monotonic()
    assert score(reward, completions) == [0.0] * len(completions)
    assert time.monotonic() - start < TIMEOUT + 5
    assert_host_untouched(workdir_root)


def test_fork_bomb_through_libc(executor, reward, workdir_root):
    """Past the Python guards, the kernel must refuse new processes (RLIMIT_NPROC, which does not bind for root)."""
    if not executor.protections["rlimit_nproc_binding"]:
        pytest.skip("RLIMIT_NPROC does not bind here (root without a sandbox user): a libc fork bomb would run.")
    completion = hostile("import ctypes\nlibc = ctypes.CDLL(None)\nfor _ in range(50):\n    assert libc.fork() >= 0")
    assert score(reward, [completion]) == [0.0]
    assert_host_untouched(workdir_root)


def test_huge_allocation(reward, workdir_root):
    completions = [hostile("x = bytearray(16 * 2**30)"), hostile("x = [0] * (2**33)")]
    assert score(reward, completions) == [0.0, 0.0]
    assert_host_untouched(workdir_root)


def test_files_outside_the_sandbox_folder_are_untouched(executor, reward, tmp_path, workdir_root):
    sentinel_dir = tmp_path / "precious"
    sentinel_dir.mkdir()
    sentinel = sentinel_dir / "sentinel.txt"
    sentinel.write_text("keep me")
    attacks = [
        f"import os\nos.remove({str(sentinel)!r})",
        f"import shutil\nshutil.rmtree({str(sentinel_dir)!r})",
        f"open({str(sentinel)!r}, 'w').write('overwritten')",
        f"import os\nos.rename({str(sentinel)!r}, 'stolen.txt')",
        f"import pathlib\npathlib.Path({str(sentinel)!r}).unlink()",
    ]
    if executor.protections["unprivileged_user"]:  # past the Python guards, only file permissions protect
        attacks.append(f"import ctypes\nassert ctypes.CDLL(None).unlink({str(sentinel).encode()!r}) == 0")
    assert score(reward, [hostile(attack) for attack in attacks]) == [0.0] * len(attacks)
    assert sentinel.read_text() == "keep me"
    assert_host_untouched(workdir_root)


def test_files_inside_the_sandbox_folder_are_allowed(reward):
    completion = hostile(
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('x')\n"
        "os.remove('scratch.txt')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'y')\n"
        "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']"
    )
    assert score(reward, [completion]) == [1.0]


def test_no_network(reward):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        completions = [
            hostile(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')"),
            hostile("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)"),
            hostile("import _socket\n_socket.socket()"),
        ]
        assert score(reward, completions) == [0.0] * len(completions)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_parent_environment_is_not_readable(reward, monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    completions = [
        hostile(f"import os\nassert os.environ.get({SECRET_NAME!r}) == {SECRET_VALUE!r}"),
        hostile(
            "import os\n"
            "found = False\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            f"        found |= {SECRET_VALUE.encode()!r} in open(f'/proc/{{pid}}/environ', 'rb').read()\n"
            "    except OSError:\n"
            "        pass\n"
            "assert found"
        ),
    ]
    assert score(reward, completions) == [0.0, 0.0]
    # The environment holds only what the sandbox sets.
    allowed = hostile("import os\nassert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LC_CTYPE'}, dict(os.environ)")
    assert score(reward, [allowed]) == [1.0]


def test_protections_report(executor):
    protections = executor.protections
    assert protections["python_guards"] and protections["clean_environment"] and protections["wall_clock_timeout"]
    if os.geteuid() == 0 and protections["unprivileged_user"]:
        assert protections["rlimit_nproc_binding"]


class RecordingExecutor:
    """A stand-in for a remote sandbox: records the programs, and passes those that return sum(xs)."""

    def __init__(self):
        self.programs = []

    def run(self, program: str, timeout: float) -> ExecutionResult:
        self.programs.append(program)
        return ExecutionResult(passed="return sum(xs)" in program, status="passed")


def test_executor_is_pluggable():
    executor = RecordingExecutor()
    assert isinstance(executor, CodeExecutor)
    reward = make_code_execution_reward(executor, timeout=1.0, max_workers=2)
    assert reward.__name__ == "code_execution_reward"
    rewards = score(reward, [CORRECT_BODY, "```python\ndef total(xs):\n    return sum(xs)\n```", "    return 0\n"])
    assert rewards == [1.0, 1.0, 0.0]
    body_program = next(p for p in executor.programs if "def total(xs):" not in p and "sum(xs)" in p)
    function_program = next(p for p in executor.programs if "def total(xs):" in p)
    # A body is appended to the whole prompt; a full function only gets the prompt's imports.
    assert body_program.startswith(PROMPT + CORRECT_BODY)
    assert function_program.startswith("from typing import List\ndef total(xs):\n")
    assert all(program.endswith("\n\ncheck(total)\n") for program in executor.programs)


def test_default_instance_and_bad_input():
    assert code_execution_reward.__name__ == "code_execution_reward"
    with pytest.raises(ValueError, match=r"`test`.*`entry_point`.*\['completions', 'prompts', 'solution'\]"):
        code_execution_reward(completions=["x"], prompts=["p"], solution=["s"])
    with pytest.raises(TypeError, match="run\\(program, timeout\\)"):
        make_code_execution_reward(executor=object())


def test_extract_code_and_build_program():
    text = "```text\nnot code\n```\n```python\nprint(1)\n```\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(text, "f") == "def f(x):\n    return x\n"
    assert extract_code(text) == "print(1)\n"
    assert extract_code("def f(): pass") == "def f(): pass"
    program = build_program("    return 1\n", "def check(c):\n    assert c() == 1\n", "f", "import math\ndef f():\n")
    assert program.startswith("import math\ndef f():\n    return 1\n") and program.endswith("check(f)\n")


def test_active_layers_hold_inside_the_sandbox(executor):
    """Each layer `protections` reports is checked from inside a sandboxed program."""
    protections = executor.protections
    checks = ["import os, resource", "assert resource.getrlimit(resource.RLIMIT_NPROC) == (0, 0)"]
    if protections["network_namespace"]:  # no interface but loopback
        checks.append("assert [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]] == ['lo']")
    if protections["pid_namespace"]:  # the program is alone in its process tree
        checks.append("assert [p for p in os.listdir('/proc') if p.isdigit()] == ['1']")
    if protections["unprivileged_user"]:
        checks.append("assert os.getuid() != 0 and os.getgid() != 0")
    result = executor.run("\n".join(checks), timeout=TIMEOUT)
    assert result.passed, result.stderr


def test_python_guards_alone(workdir_root, tmp_path, monkeypatch):
    """Without namespaces or a sandbox user (e.g. no `unshare`, not root), the Python-level guards still hold."""
    executor = LocalSandboxExecutor(isolate_namespaces=False, drop_privileges=False, workdir_root=workdir_root)
    assert not executor.protections["network_namespace"] and not executor.protections["unprivileged_user"]
    reward = make_code_execution_reward(executor, timeout=TIMEOUT)
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    completions = [
        hostile(f"import os\nos.remove({str(sentinel)!r})"),
        hostile("import os\nos.fork()"),
        hostile("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)"),
        hostile(f"import os\nassert os.environ.get({SECRET_NAME!r}) == {SECRET_VALUE!r}"),
        CORRECT_BODY,
    ]
    assert score(reward, completions) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert sentinel.read_text() == "keep me"
    assert_host_untouched(workdir_root)


def test_a_batch_of_64_mixing_hostile_and_correct_programs(reward, tmp_path, workdir_root, monkeypatch):
    """Under load: 32 correct programs and 32 hostile ones (8 kinds x 4) in one call. The correct ones score 1, the
    hostile 0, nothing outside the sandboxes changes, and the batch ends within its bound: 64 programs on 4 workers
    are 16 rounds, each at most the timeout plus 2 s of start-up and clean-up."""
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    project_files = set(os.listdir(project))
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    attacks = [
        "import os\nwhile True:\n    os.fork()",
        "while True:\n    pass",
        "x = bytearray(10 * 2**30)",
        f"import os\nos.remove({str(sentinel)!r})",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        f"import os\nassert os.environ.get({SECRET_NAME!r}) == {SECRET_VALUE!r}",
        f"open({os.path.join(project, 'written_by_a_sandbox.txt')!r}, 'w').write('x')",
        "import subprocess\nsubprocess.run(['sleep', '30'])",
    ]
    completions, expected = [], []
    for index in range(64):
        if index % 2 == 0:
            completions.append(CORRECT_BODY)
            expected.append(1.0)
        else:
            completions.append(hostile(attacks[(index // 2) % len(attacks)]))
            expected.append(0.0)
    start = time.monotonic()
    rewards = score(reward, completions)
    seconds = time.monotonic() - start
    assert rewards == expected
    assert seconds < 16 * (TIMEOUT + 2), seconds
    assert sentinel.read_text() == "keep me"
    assert set(os.listdir(project)) == project_files
    assert os.environ[SECRET_NAME] == SECRET_VALUE
    assert_host_untouched(workdir_root)
