"""Execution reward for code problems in the HumanEval format, and the sandbox that runs the untrusted code.

A completion is turned into a program (problem prefix + code + the problem's `check()` tests) and run by a
`CodeExecutor`. The default `LocalSandboxExecutor` runs each program in its own short-lived Python process, layering
OS-level isolation (a new network and PID namespace, an unprivileged user, resource limits) with Python-level guards;
`LocalSandboxExecutor.protections` says which layers are active on this machine. A remote sandbox service can replace
it: anything with a `run(program, timeout) -> ExecutionResult` method will do.
"""

import json
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

from .math import completion_text


__all__ = [
    "CodeExecutor",
    "ExecutionResult",
    "LocalSandboxExecutor",
    "build_program",
    "code_execution_reward",
    "extract_code",
    "make_code_execution_reward",
]


@dataclass
class ExecutionResult:
    """The outcome of running one program.

    Attributes:
        passed: The program ran to its end and exited with status 0.
        status: "passed", "failed" (an exception, a failed assert, a non-zero exit), or "timeout".
        returncode: The process exit status (negative: killed by that signal); `None` on timeout.
        stdout / stderr: The start of the program's output, truncated.
        elapsed: Wall-clock seconds.
    """

    passed: bool
    status: str
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    elapsed: float = 0.0


@runtime_checkable
class CodeExecutor(Protocol):
    """Runs an untrusted Python program and reports whether it passed. Implement it to plug in a remote sandbox."""

    def run(self, program: str, timeout: float) -> ExecutionResult: ...


# The child's first code. It runs before the untrusted program, inside the sandbox process: it sets the resource
# limits, drops to the unprivileged user, installs the Python-level guards, runs the program, and only if the program
# ran to its end writes a secret token (read from stdin, so the program never sees it in argv or the environment) to
# a side channel. An early `sys.exit(0)` or `os._exit(0)` therefore does not count as a pass.
_BOOTSTRAP = r"""
import _socket, builtins, io, json, os, resource, shutil, socket, subprocess, sys

config = json.loads(sys.argv[1])

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_seconds"], config["cpu_seconds"] + 1))
memory = config["memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (config["file_size_bytes"], config["file_size_bytes"]))
if config["uid"] is not None:
    os.setgroups([])
    os.setgid(config["gid"])
    os.setuid(config["uid"])
# Set after dropping root: the limit does not bind for root, and it blocks fork/clone (threads too) for everyone else.
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

workdir = os.path.realpath(config["workdir"])

def _deny(name):
    def denied(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return denied

for name in ("fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg",
             "setsid", "setuid", "setgid", "chroot", "execv", "execve", "execl", "execle", "execlp", "execlpe",
             "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
             "spawnvpe"):
    if hasattr(os, name):
        setattr(os, name, _deny(f"os.{name}"))

def _inside_workdir(path, dir_fd=None):
    path = os.fsdecode(path) if not isinstance(path, int) else os.readlink(f"/proc/self/fd/{path}")
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    resolved = os.path.realpath(path)
    return resolved in (workdir, os.devnull) or resolved.startswith(workdir + os.sep)

def _confine(module, name):
    original = getattr(module, name)
    def confined(*args, **kwargs):
        paths = [arg for arg in args[:2] if isinstance(arg, (str, bytes, os.PathLike))] or args[:1]
        for path in paths:
            if not _inside_workdir(path, kwargs.get("dir_fd") or kwargs.get("src_dir_fd")):
                raise PermissionError(f"{module.__name__}.{name} outside the sandbox folder is disabled")
        return original(*args, **kwargs)
    setattr(module, name, confined)

for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
             "chown", "link", "symlink"):
    _confine(os, name)
for name in ("rmtree", "move"):
    _confine(shutil, name)

_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside_workdir(path, kwargs.get("dir_fd")):
        raise PermissionError("writing files outside the sandbox folder is disabled")
    return _os_open(path, flags, *args, **kwargs)
os.open = _guarded_os_open

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not isinstance(file, int) and not _inside_workdir(file):
        raise PermissionError("writing files outside the sandbox folder is disabled")
    return _open(file, mode, *args, **kwargs)
builtins.open = _guarded_open
io.open = _guarded_open

subprocess.Popen = _deny("subprocess.Popen")
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")
socket.socket = socket.create_connection = socket.socketpair = _socket.socket = _no_network
socket.fromfd = socket.create_server = socket.getaddrinfo = _no_network

result_fd = config["result_fd"]
del config
"""

# The program runs in a fresh namespace and the token only lives in a function's locals, out of the program's
# globals (a program that walks the interpreter's frames could still find it: this defends against early exits,
# not against deliberate introspection of the sandbox).
_BOOTSTRAP_RUN = r"""
def _run(result_fd):
    token = sys.stdin.readline().strip()
    null_fd = _os_open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    with _open(os.path.join(workdir, "program.py")) as program_file:
        code = compile(program_file.read(), "program.py", "exec")
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exit_request:
        sys.stderr.write(f"program exited early with sys.exit({exit_request.code!r})\n")
        sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(result_fd, token.encode())

_run(result_fd)
"""


class LocalSandboxExecutor:
    """Runs each program in a fresh, isolated Python process on this machine.

    Protection layers (each used when this machine supports it; see `protections` for what is active here):

    - a new network namespace (`unshare --net`): no network interface but a down loopback;
    - a new PID namespace with its own /proc: the program sees no other process, and dies with its launcher;
    - when the trainer runs as root, the program runs as an unprivileged user (`nobody`): it cannot read or delete
      the trainer's files, read other processes' environments, or escape the resource limits;
    - resource limits: CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), no core dumps,
      and no new processes or threads (RLIMIT_NPROC=0, binding for non-root users);
    - Python-level guards installed before the program runs: `os.fork`/`os.system`/`subprocess`/`os.kill`... raise,
      `socket` raises, and deleting, renaming or writing files outside the sandbox folder raises;
    - its own temporary folder as cwd, HOME and TMPDIR, removed afterwards, and an environment holding only PATH,
      HOME and TMPDIR;
    - a wall-clock timeout after which the whole process group is killed.

    Args:
        memory_limit_mb: Address-space limit of the program's process.
        file_size_limit_mb: Largest file the program may write (its captured output included).
        max_output_chars: How much of stdout/stderr is kept in the `ExecutionResult`.
        isolate_namespaces: Run in new network and PID namespaces. `None` (default): if `unshare` works here.
            `True`: required (error otherwise). `False`: never.
        drop_privileges: Run as `sandbox_user`. `None` (default): when running as root and it works here.
            `True`: required. `False`: never.
        sandbox_user: The unprivileged user to run as when dropping privileges.
        workdir_root: Where the per-program folders are created (default: the system's temporary folder). The
            sandbox user must be able to traverse it.
        python_executable: The interpreter that runs the programs. `None` (default): this one, or, when the
            unprivileged user cannot read this one's standard library (e.g. a Python installed under /root), the
            system's `python3`.
    """

    def __init__(
        self,
        memory_limit_mb: int = 1024,
        file_size_limit_mb: int = 16,
        max_output_chars: int = 4096,
        isolate_namespaces: bool | None = None,
        drop_privileges: bool | None = None,
        sandbox_user: str = "nobody",
        python_executable: str | None = None,
        workdir_root: str | None = None,
    ):
        self.memory_limit_mb = memory_limit_mb
        self.file_size_limit_mb = file_size_limit_mb
        self.max_output_chars = max_output_chars
        self.isolate_namespaces = isolate_namespaces
        self.drop_privileges = drop_privileges
        self.sandbox_user = sandbox_user
        self.python_executable = python_executable
        self.workdir_root = workdir_root

    @cached_property
    def _launch_plan(self) -> tuple[list[str], tuple[int, int] | None, str]:
        """The namespace command prefix, the (uid, gid) to drop to and the interpreter: the strongest combination
        that works here.

        Each candidate is tried once with a trivial program, since what works depends on the kernel, the container
        and whether the interpreter is readable by the unprivileged user.
        """
        namespace_prefixes = []
        if self.isolate_namespaces is not False and shutil.which("unshare"):
            pid_and_net = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
            if os.geteuid() == 0:
                namespace_prefixes.append(["unshare", *pid_and_net])
            # Unprivileged users get namespaces through a user namespace (where the kernel allows them).
            namespace_prefixes.append(["unshare", "--user", "--map-root-user", *pid_and_net])
        if self.isolate_namespaces is not True:
            namespace_prefixes.append([])

        identities = []
        if self.drop_privileges is not False and os.geteuid() == 0:
            try:
                user = pwd.getpwnam(self.sandbox_user)
                identities.append((user.pw_uid, user.pw_gid))
            except KeyError:
                pass
        if self.drop_privileges is not True:
            identities.append(None)

        interpreters = [self.python_executable] if self.python_executable else [sys.executable]
        if self.python_executable is None:
            system_python = shutil.which("python3", path=os.defpath)
            if system_python and os.path.realpath(system_python) != os.path.realpath(sys.executable):
                interpreters.append(system_python)

        # The probe imports standard modules, which fails when the interpreter is unreadable by the sandbox user.
        probe = "import collections, fractions, typing\nprint('ok')"
        for prefix in namespace_prefixes:
            for identity in identities:
                # Dropping privileges inside a user namespace maps to an unmapped user: not a working combination.
                if identity is not None and "--user" in prefix:
                    continue
                for interpreter in interpreters:
                    if self._execute(probe, 20, prefix, identity, interpreter).passed:
                        return prefix, identity, interpreter
        raise RuntimeError(
            "LocalSandboxExecutor could not start a sandboxed process with the requested protections "
            f"(isolate_namespaces={self.isolate_namespaces}, drop_privileges={self.drop_privileges}). "
            "Check that `unshare` works here and that the interpreter is readable by "
            f"{self.sandbox_user!r}, or set these options to None."
        )

    @property
    def protections(self) -> dict[str, bool | str]:
        """Which protection layers are active on this machine (probed on first use), and the interpreter used."""
        prefix, identity, interpreter = self._launch_plan
        return {
            "interpreter": interpreter,
            "network_namespace": bool(prefix),
            "pid_namespace": bool(prefix),
            "unprivileged_user": identity is not None,
            "rlimit_nproc_binding": identity is not None or os.geteuid() != 0,
            "rlimit_cpu_as_fsize": True,
            "python_guards": True,
            "private_workdir": True,
            "clean_environment": True,
            "wall_clock_timeout": True,
        }

    def run(self, program: str, timeout: float) -> ExecutionResult:
        """Runs `program` in the sandbox; it passes if it runs to its end and exits with status 0 within `timeout`."""
        return self._execute(program, timeout, *self._launch_plan)

    def _execute(
        self, program: str, timeout: float, prefix: list[str], identity: tuple[int, int] | None, interpreter: str
    ) -> ExecutionResult:
        workdir = tempfile.mkdtemp(prefix="trl_ladi_sandbox_", dir=self.workdir_root)
        token = secrets.token_hex(16)
        start = time.monotonic()
        try:
            with open(os.path.join(workdir, "program.py"), "w") as program_file:
                program_file.write(program)
            if identity is not None:
                os.chown(workdir, *identity)
                os.chown(os.path.join(workdir, "program.py"), *identity)
            # Output goes to unlinked files owned by us (not pipes): no deadlock, and RLIMIT_FSIZE bounds its size.
            with (
                tempfile.TemporaryFile() as stdout,
                tempfile.TemporaryFile() as stderr,
                tempfile.TemporaryFile() as result,
            ):
                config = {
                    "workdir": workdir,
                    "cpu_seconds": math.ceil(timeout) + 1,
                    "memory_bytes": self.memory_limit_mb * 2**20,
                    "file_size_bytes": self.file_size_limit_mb * 2**20,
                    "uid": identity[0] if identity else None,
                    "gid": identity[1] if identity else None,
                    "result_fd": result.fileno(),
                }
                command = [*prefix, interpreter, "-I", "-c", _BOOTSTRAP + _BOOTSTRAP_RUN, json.dumps(config)]
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=stdout,
                    stderr=stderr,
                    pass_fds=(result.fileno(),),
                    cwd=workdir,
                    env={"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir},
                    start_new_session=True,  # its own process group, killed as a whole below
                )
                try:
                    process.stdin.write(f"{token}\n".encode())
                    process.stdin.close()
                except BrokenPipeError:
                    pass
                try:
                    returncode = process.wait(timeout=timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    returncode, timed_out = None, True
                finally:
                    self._kill_process_group(process)
                elapsed = time.monotonic() - start
                completed = self._read(result) == token
                passed = not timed_out and returncode == 0 and completed
                return ExecutionResult(
                    passed=passed,
                    status="timeout" if timed_out else ("passed" if passed else "failed"),
                    returncode=returncode,
                    stdout=self._read(stdout),
                    stderr=self._read(stderr),
                    elapsed=elapsed,
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def _kill_process_group(process: subprocess.Popen):
        """Kills everything left in the program's process group, then reaps the launcher."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()

    def _read(self, file) -> str:
        file.seek(0)
        return file.read(self.max_output_chars).decode(errors="replace")


_FENCED_BLOCK_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a completion: its fenced code block if it has one, else the whole text.

    With several blocks, the first one defining `entry_point` wins, else the first Python (or untagged) block. An
    unterminated block (a completion cut by the token limit) runs to the end of the text.
    """
    blocks = [
        (language.lower(), code)
        for language, code in _FENCED_BLOCK_RE.findall(text)
        if language.lower() in ("", "python", "py", "python3")
    ]
    if not blocks:
        return text
    if entry_point is not None:
        for _, code in blocks:
            if _defines(code, entry_point):
                return code
    return blocks[0][1]


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def build_program(code: str, test: str, entry_point: str, prompt_prefix: str = "") -> str:
    """The program that tests a completion: problem prefix (unless the code defines `entry_point` itself),
    the code, the problem's tests, and the call of `check(entry_point)`.

    When the code defines the function itself, the prefix's import lines are still kept, since completions often
    rely on the prompt's `from typing import List`.
    """
    if _defines(code, entry_point):
        imports = [line for line in prompt_prefix.splitlines() if re.match(r"(?:import|from)\s+\w", line)]
        head = "\n".join(imports)
    else:
        head = prompt_prefix
    if head and not head.endswith("\n"):
        head += "\n"
    return f"{head}{code}\n\n{test}\n\ncheck({entry_point})\n"


def make_code_execution_reward(executor: CodeExecutor | None = None, timeout: float = 10.0, max_workers: int = 8):
    """Builds a TRL reward function that runs each completion against its problem's tests.

    Args:
        executor: Runs the programs; `LocalSandboxExecutor()` by default.
        timeout: Wall-clock seconds allowed per program.
        max_workers: Programs run at the same time.

    Returns:
        `code_execution_reward(completions, test, entry_point, code_prompt=None, prompts=None, prompt=None, **kwargs)`
        giving 1.0 per completion whose program passes `check(<entry_point>)`, 0.0 otherwise.
    """
    executor = executor if executor is not None else LocalSandboxExecutor()
    if not isinstance(executor, CodeExecutor):
        raise TypeError(f"executor must have a `run(program, timeout) -> ExecutionResult` method, got {executor!r}.")

    def code_execution_reward(completions, test=None, entry_point=None, code_prompt=None, prompts=None, **kwargs):
        """Rewards 1.0 for a completion that passes its problem's `check(candidate)` tests, 0.0 otherwise.

        Columns (one value per completion): `test` (defines `check(candidate)`), `entry_point` (the function's
        name), and the code prefix to complete: `code_prompt` if present, else the prompt when it is a plain string
        (TRL passes it as `prompts`; a conversational prompt is not code and is not used). The prefix is not
        prepended when the completion defines `entry_point` itself.
        """
        if test is None or entry_point is None:
            given = {"test": test, "entry_point": entry_point, "code_prompt": code_prompt, "prompts": prompts, **kwargs}
            received = ["completions"] + sorted(name for name, value in given.items() if value is not None)
            raise ValueError(
                "code_execution_reward needs the dataset columns `test` (code defining `check(candidate)`) and "
                f"`entry_point` (the function's name), but received {received}. Add these columns to your dataset "
                "(HumanEval has them)."
            )
        # `prompt` is the column's own name when called outside TRL.
        prefixes = next((p for p in (code_prompt, prompts, kwargs.get("prompt")) if p is not None), None)
        if prefixes is None:
            prefixes = [""] * len(completions)
        programs = []
        for completion, test_code, name, prefix in zip(completions, test, entry_point, prefixes, strict=True):
            code = extract_code(completion_text(completion), name)
            programs.append(build_program(code, test_code, name, prefix if isinstance(prefix, str) else ""))
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(programs)))) as pool:
            results = list(pool.map(lambda program: executor.run(program, timeout), programs))
        return [1.0 if result.passed else 0.0 for result in results]

    return code_execution_reward


code_execution_reward = make_code_execution_reward()
