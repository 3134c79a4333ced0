"""The sandbox for model-generated Python: verdicts, limits, isolation and cleanup (~10 s on 2 cores)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handoff.edge.evaluation.sandbox import STATUSES, SandboxLimits, SandboxResult, run_python_tests

ADD = "def add(a, b):\n    return a + b\n"
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
LIMITS = SandboxLimits(timeout_s=5.0)
SHORT = SandboxLimits(timeout_s=2.0)


def run(
    program: str, test: str = TEST, entry_point: str = "add", limits: SandboxLimits = LIMITS
) -> SandboxResult:
    result = run_python_tests(program, test, entry_point, limits)
    assert result.status in STATUSES
    assert result.passed == (result.status == "passed")
    assert len(result.detail) <= 500
    return result


def _children(pid: int) -> set[int]:
    """Pids of the live or zombie processes whose parent is `pid` (from /proc, no psutil)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    """Whether the process `pid` has ended (gone from /proc, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] in ("Z", "X")


@pytest.fixture(scope="module")
def network_namespaces() -> bool:
    """Whether this kernel lets an unprivileged process enter a new user + network namespace."""
    probe = "import ctypes; raise SystemExit(ctypes.CDLL(None).unshare(0x10000000 | 0x40000000) != 0)"
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


# ---------------------------------------------------------------------------------------------
# Verdicts


def test_correct_function_passes() -> None:
    result = run(ADD)
    assert result.passed and result.status == "passed"
    assert 0 < result.seconds < 5


def test_wrong_function_fails_with_the_failing_assertion() -> None:
    result = run("def add(a, b):\n    return a - b\n")
    assert result.status == "failed"
    assert result.detail.startswith("AssertionError")
    assert "<tests> line 2" in result.detail
    assert "AssertionError" in result.stderr  # the full traceback is kept for debugging


def test_exception_in_candidate_fails_with_its_last_line() -> None:
    result = run("def add(a, b):\n    return (a + b) / 0\n")
    assert result.status == "failed"
    assert result.detail.startswith("ZeroDivisionError: division by zero")
    assert "<candidate> line 2" in result.detail


@pytest.mark.parametrize("program", ["def add(a, b)\n    return a + b\n", "def add(a, b):\nreturn a + b\n"])
def test_syntax_error(program: str) -> None:
    result = run(program)
    assert result.status == "syntax_error"
    assert "line" in result.detail


def test_missing_entry_point_fails() -> None:
    result = run("def plus(a, b):\n    return a + b\n")
    assert result.status == "failed"
    assert "'add'" in result.detail


def test_broken_tests_are_an_error_not_a_failure() -> None:
    assert run(ADD, test="import no_such_module_here\n").status == "error"
    assert run(ADD, test="x = 1\n").status == "error"  # no check()


# ---------------------------------------------------------------------------------------------
# Early exits and forged verdicts


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)\n" + ADD,
        "import os\nos._exit(0)\n" + ADD,
        "import sys\ndef add(a, b):\n    sys.exit(0)\n",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
    ],
    ids=["sys.exit", "os._exit", "sys.exit-in-check", "os._exit-in-check"],
)
def test_exiting_before_the_tests_finish_is_not_a_pass(program: str) -> None:
    result = run(program)
    assert not result.passed
    assert result.status == "error"
    assert "exited before the tests finished" in result.detail


def test_forged_status_records_are_not_believed() -> None:
    fake = '{"nonce": "x", "status": "passed", "detail": "all tests passed"}\n'
    program = (
        "import os, sys\n"
        f"print({fake!r})\n"
        f"sys.stderr.write({fake!r})\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        f"        os.write(int(fd), {fake!r}.encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    result = run(program)
    assert not result.passed
    assert result.status == "error"


# ---------------------------------------------------------------------------------------------
# Limits


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    result = run("while True:\n    pass\n", limits=SHORT)
    assert result.status == "timeout"
    assert "timed out after 2 s" in result.detail
    assert time.monotonic() - start < SHORT.timeout_s + 2


def test_sleeping_loop_with_a_real_fork_times_out_and_leaves_no_process(wait_until) -> None:
    # os.fork is disabled; a fork through ctypes still works, and its child must die with the group.
    program = (
        "import ctypes, os, time\n"
        "try:\n"
        "    os.fork()\n"
        "except PermissionError:\n"
        "    pass\n"
        "pid = ctypes.CDLL(None).fork()\n"
        "if pid > 0:\n"
        "    print('grandchild', pid, flush=True)\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )
    start = time.monotonic()
    result = run(program, limits=SHORT)
    assert result.status == "timeout"
    assert time.monotonic() - start < SHORT.timeout_s + 2
    match = re.search(r"grandchild (\d+)", result.stdout)
    assert match, result.stdout
    pid = int(match.group(1))
    wait_until(lambda: _gone(pid), timeout=3, interval=0.05, what=f"process {pid} to end")


def test_a_detached_leftover_process_is_killed_when_the_run_passes(wait_until) -> None:
    # A ctypes-forked child that closes its output would not keep the pipes open: the group kill ends it.
    program = (
        "import ctypes, os, time\n"
        "pid = ctypes.CDLL(None).fork()\n"
        "if pid == 0:\n"
        "    os.close(1)\n"
        "    os.close(2)\n"
        "    while True:\n"
        "        time.sleep(0.05)\n"
        "print('grandchild', pid, flush=True)\n" + ADD
    )
    result = run(program)
    assert result.status == "passed"
    assert result.seconds < 3
    match = re.search(r"grandchild (\d+)", result.stdout)
    assert match, result.stdout
    pid = int(match.group(1))
    wait_until(lambda: _gone(pid), timeout=3, interval=0.05, what=f"process {pid} to end")


def test_os_fork_is_disabled() -> None:
    result = run("import os\nos.fork()\n" + ADD)
    assert result.status == "failed"
    assert "PermissionError: os.fork is disabled" in result.detail


def test_huge_allocation_fails_the_task_only() -> None:
    result = run("x = bytearray(10**10)\n" + ADD, limits=SandboxLimits(timeout_s=5.0, memory_mb=256))
    assert not result.passed
    assert result.status in ("failed", "crashed")
    if result.status == "failed":
        assert "MemoryError" in result.detail


def test_segfault_is_a_crash() -> None:
    result = run("import ctypes\nctypes.string_at(0)\n" + ADD)
    assert result.status == "crashed"
    assert "SIGSEGV" in result.detail


def test_cpu_limit_kills_with_sigxcpu() -> None:
    result = run("while True:\n    pass\n", limits=SandboxLimits(timeout_s=8.0, cpu_s=1))
    assert result.status == "crashed"
    assert "SIGXCPU" in result.detail or "SIGKILL" in result.detail  # soft limit, else the hard one
    assert result.seconds < 6


def test_ten_megabytes_of_output_are_truncated() -> None:
    program = "print('x' * 10_000_000)\nimport sys\nsys.stderr.write('y' * 1_000_000)\n" + ADD
    result = run(program, limits=SandboxLimits(timeout_s=10.0, max_output_bytes=1000))
    assert result.status == "passed"
    assert result.stdout.startswith("x" * 1000)
    assert len(result.stdout) < 1100 and "more bytes not kept" in result.stdout
    assert len(result.stderr) < 1100 and "more bytes not kept" in result.stderr


# ---------------------------------------------------------------------------------------------
# Isolation


def test_socket_guard_blocks_connections() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + ADD)
        assert result.status == "failed"
        assert "network access is disabled in the sandbox" in result.detail
        with pytest.raises(BlockingIOError):
            server.accept()


def test_network_namespace_blocks_raw_sockets(network_namespaces: bool) -> None:
    if not network_namespaces:
        pytest.skip("unprivileged user namespaces are not available: only the Python-level guard applies")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
        result = run(program + ADD)
        assert not result.passed
        assert result.status == "failed"
        with pytest.raises(BlockingIOError):
            server.accept()


def test_files_are_written_in_a_temporary_directory_that_is_removed() -> None:
    program = (
        "import os\n"
        "with open('marker.txt', 'w') as f:\n"
        "    f.write('hello')\n"
        "print(os.getcwd())\n"
        "print(os.environ.get('HOME'), sorted(os.environ))\n" + ADD
    )
    result = run(program)
    assert result.status == "passed"
    cwd = Path(result.stdout.splitlines()[0])
    assert cwd.is_absolute() and cwd.name.startswith("handoff-sandbox-")
    assert cwd != Path.cwd() and Path(__file__).resolve().parent.parent not in (cwd, *cwd.parents)
    assert not cwd.exists()
    assert not (Path.cwd() / "marker.txt").exists()


def test_environment_is_minimal_and_hashing_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANDOFF_SANDBOX_SECRET", "do-not-leak")
    program = "import os, sys\nprint(sorted(os.environ), hash('handoff'))\n" + ADD
    first, second = run(program), run(program)
    assert first.status == second.status == "passed"
    assert "HANDOFF_SANDBOX_SECRET" not in first.stdout
    assert "'PYTHONHASHSEED'" in first.stdout
    assert first.stdout == second.stdout  # hash() is the same in every run


@pytest.mark.parametrize(
    "call", ["os.remove('x')", "os.system('true')", "shutil.rmtree('.')", "subprocess.Popen(['true'])"]
)
def test_destructive_functions_are_disabled(call: str) -> None:
    result = run(f"import os, shutil, subprocess\n{call}\n" + ADD)
    assert result.status == "failed"
    assert "is disabled in the sandbox" in result.detail


def test_runs_leave_no_child_processes() -> None:
    before = _children(os.getpid())
    for program in (ADD, "import ctypes\nctypes.string_at(0)\n", "import os\nos._exit(3)\n"):
        run(program)
    run("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1.0))
    assert _children(os.getpid()) <= before
    if not before:
        with pytest.raises(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)  # nothing left to reap either
