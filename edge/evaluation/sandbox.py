"""Run model-generated Python against unit tests in a throwaway, resource-limited child process.

Threat model: the code comes from a language model, not from an adversary. The usual harm is an accident:
an infinite loop, a huge allocation, a fork, a stray `rm`, a network call, a segfault through ctypes, a
`sys.exit(0)` that would look like success. The sandbox contains those and reports them as one failed
task; it is defence in depth, NOT a security boundary against a determined attacker (the code runs as the
same user, in the same file system, with ctypes available). The layers:

- a separate interpreter in its own session (the whole process group is SIGKILLed on timeout), in a fresh
  temporary directory as cwd (removed afterwards), with a minimal environment and stdin from /dev/null;
- rlimits set by the child's harness before any candidate code runs: address space, CPU seconds, file
  size, open files, no core dumps (also PR_SET_DUMPABLE 0), plus PR_SET_NO_NEW_PRIVS;
- no network: the harness first enters a new user + network namespace (only a downed loopback inside);
  where the kernel refuses that, it carries on, and in any case Python-level guards replace the socket
  constructors and the process/file-destroying functions of os, shutil and subprocess (after HumanEval's
  `reliability_guard`): raw syscalls through ctypes can still get round those;
- the verdict travels on a private pipe, never on stdout (see `_CHILD`), and "passed" is recorded only
  after check() has returned, so printing text or exiting early cannot pass a task.

What it does not do: stop a program from cheating its own tests (an object whose __eq__ is always True),
contain processes that leave the session through raw syscalls, or bound the number of processes that
ctypes-level forks create within the time limit.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "crashed", "syntax_error", "error")
_DETAIL_MAX = 500
_FILE_SIZE_LIMIT = 10 * 1024 * 1024
_OPEN_FILES_LIMIT = 64
_RECORD_MAX = 64 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run."""

    timeout_s: float = 10.0  # wall clock for the whole child process
    memory_mb: int = 512  # RLIMIT_AS
    cpu_s: int = 10  # RLIMIT_CPU
    max_output_bytes: int = 64_000  # captured stdout/stderr kept (each), truncated beyond


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one run: `status` is one of STATUSES, `detail` a short reason (<= 500 chars)."""

    passed: bool
    status: str  # passed | failed | timeout | crashed | syntax_error | error
    detail: str
    seconds: float
    stdout: str = field(default="", repr=False)  # the first max_output_bytes, then a truncation note
    stderr: str = field(default="", repr=False)


_DEFAULT_LIMITS = SandboxLimits()

# The child's harness, run with `python -s -P -B -c _CHILD <payload.json> <status fd>`.
# The pass signal: the parent opens a pipe and hands only its write end to the child (pass_fds); the
# harness writes exactly one JSON record {"nonce", "status", "detail"} to it and then leaves through
# os._exit. The nonce is a random token from the payload file, which the harness deletes before any
# candidate code runs. The parent believes a record only with the right nonce, and "passed" only with
# exit code 0 as well; no record means the child died or exited on its own before the tests finished.
# So the candidate's stdout, its exit code and anything it writes in the directory cannot pass a task.
_CHILD = r"""
import builtins, ctypes, json, linecache, os, resource, shutil, socket, subprocess, sys, traceback, types

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38


def set_limit(res, soft, hard):
    _, cur_hard = resource.getrlimit(res)
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    try:
        resource.setrlimit(res, (soft, hard))
    except (ValueError, OSError):
        pass


def isolate(job):
    libc = ctypes.CDLL(None, use_errno=True)
    netns = libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    mem = job["memory_mb"] * 1024 * 1024
    set_limit(resource.RLIMIT_AS, mem, mem)
    set_limit(resource.RLIMIT_CPU, job["cpu_s"], job["cpu_s"] + 1)
    set_limit(resource.RLIMIT_FSIZE, job["fsize"], job["fsize"])
    set_limit(resource.RLIMIT_NOFILE, job["nofile"], job["nofile"])
    set_limit(resource.RLIMIT_CORE, 0, 0)
    return netns


def blocked(what):
    def refuse(*args, **kwargs):
        raise PermissionError(what + " is disabled in the sandbox")
    return refuse


def guard():
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(socket, name):
            setattr(socket, name, blocked("network access"))
    disabled = {
        os: ("fork", "forkpty", "system", "popen", "kill", "killpg", "putenv", "remove", "removedirs",
             "rmdir", "unlink", "rename", "renames", "replace", "truncate", "chmod", "fchmod", "lchmod",
             "chown", "fchown", "lchown", "chroot", "fchdir", "setuid", "setgid", "setsid", "setpgid",
             "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
             "posix_spawn", "posix_spawnp", "spawnv", "spawnve", "spawnvp", "spawnvpe"),
        shutil: ("rmtree", "move", "chown"),
        subprocess: ("Popen",),
        resource: ("setrlimit", "prlimit"),
    }
    for module, names in disabled.items():
        for name in names:
            if hasattr(module, name):
                setattr(module, name, blocked(module.__name__ + "." + name))


def describe(exc):
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename in ("<candidate>", "<tests>"):
            where = (frame.f_code.co_filename, lineno)
    if where is not None:
        src = linecache.getline(*where).strip()
        line += " (at %s line %d: %s)" % (where[0], where[1], src[:200])
    return line


def show(exc):
    try:
        traceback.print_exception(exc, file=sys.__stderr__)
    except BaseException:
        pass


def main():
    payload, status_fd = sys.argv[1], int(sys.argv[2])
    with open(payload, encoding="utf-8") as f:
        job = json.load(f)
    os.remove(payload)
    nonce = job.pop("nonce")
    write, exit_now, dumps = os.write, os._exit, json.dumps

    def finish(status, detail):
        for stream in (sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass
        record = dumps({"nonce": nonce, "status": status, "detail": detail[:500], "netns": netns})
        try:
            write(status_fd, (record + "\n").encode())
        finally:
            exit_now(0 if status == "passed" else 1)

    netns = isolate(job)
    guard()
    program, test, entry_point = job["program"], job["test"], job["entry_point"]
    for name, src in (("<candidate>", program), ("<tests>", test)):
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    try:
        program_code = compile(program, "<candidate>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        if isinstance(e, SyntaxError):
            finish("syntax_error", "%s: %s (line %s)" % (type(e).__name__, e.msg, e.lineno))
        finish("syntax_error", describe(e))
    except BaseException as e:
        finish("error", "could not compile the program: " + describe(e))
    try:
        test_code = compile(test, "<tests>", "exec", dont_inherit=True)
    except BaseException as e:
        finish("error", "could not compile the tests: " + describe(e))

    module = types.ModuleType("__candidate__")
    sys.modules["__candidate__"] = module
    namespace = module.__dict__
    try:
        exec(program_code, namespace)
    except SystemExit as e:
        finish("error", "exited before the tests finished (SystemExit: %r)" % (e.code,))
    except BaseException as e:
        show(e)
        finish("failed", describe(e))
    try:
        exec(test_code, namespace)
    except SystemExit as e:
        finish("error", "exited before the tests finished (SystemExit: %r)" % (e.code,))
    except BaseException as e:
        show(e)
        finish("error", "the tests failed to load: " + describe(e))
    check = namespace.get("check")
    if not callable(check):
        finish("error", "the tests do not define check(candidate)")
    if entry_point not in namespace:
        finish("failed", "the program does not define the function %r" % (entry_point,))
    try:
        check(namespace[entry_point])
    except SystemExit as e:
        finish("error", "exited before the tests finished (SystemExit: %r)" % (e.code,))
    except BaseException as e:
        show(e)
        finish("failed", describe(e))
    finish("passed", "all tests passed")


main()
"""


class _Capture:
    """The first `limit` bytes of a stream; the rest is counted and dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.chunks: list[bytes] = []
        self.kept = 0
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - self.kept
        if room > 0:
            self.chunks.append(data[:room])
            self.kept += min(room, len(data))

    def text(self) -> str:
        out = b"".join(self.chunks).decode("utf-8", "replace")
        if self.total > self.kept:
            out += f"\n[... {self.total - self.kept} more bytes not kept]"
        return out


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def _child_env(cwd: Path) -> dict[str, str]:
    """A minimal environment: PATH, a home and temp dir inside the sandbox, deterministic hashing."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(cwd),
        "TMPDIR": str(cwd),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its pid keeps the process group id reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group (it leads its own session, so the group id is its pid).

    Only while the child is not reaped: until then its pid, and so the group id, cannot be reused.
    """
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _collect(proc: subprocess.Popen[bytes], deadline: float, out: _Capture, err: _Capture) -> bool:
    """Read stdout/stderr until both close and the child exits, or until the deadline.

    Args:
        proc: the child, with stdout and stderr pipes.
        deadline: time.monotonic() value by which the child must be done.
        out: where stdout goes.
        err: where stderr goes.

    Returns:
        True when the deadline passed first.
    """
    assert proc.stdout is not None and proc.stderr is not None
    captures = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    with selectors.DefaultSelector() as sel:
        for fd in captures:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            for key, _ in sel.select(min(remaining, 0.25)):
                data = os.read(key.fd, 65536)
                if data:
                    captures[key.fd].add(data)
                else:
                    sel.unregister(key.fd)
            if sel.get_map() and _has_exited(proc.pid):
                _kill_group(proc)  # leftovers (forked via ctypes) hold the pipes open: end them
    while not _has_exited(proc.pid):  # the pipes are closed; wait for the exit without reaping
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.01)
    return False


def _read_record(fd: int, nonce: str) -> dict | None:
    """The harness's status record from the pipe (non-blocking: a stray holder of the pipe cannot hang us)."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < _RECORD_MAX:
        try:
            chunk = os.read(fd, _RECORD_MAX)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    for line in reversed(data.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("nonce"), str)
            and hmac.compare_digest(record["nonce"], nonce)
            and record.get("status") in STATUSES
            and isinstance(record.get("detail"), str)
        ):
            return record
    return None


def _signal_detail(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    why = {
        signal.SIGSEGV: "segmentation fault",
        signal.SIGBUS: "bus error",
        signal.SIGABRT: "aborted",
        signal.SIGXCPU: "CPU time limit exceeded",
        signal.SIGXFSZ: "file size limit exceeded",
        signal.SIGKILL: "killed, possibly out of memory",
    }.get(signum)
    return f"killed by {name}" + (f" ({why})" if why else "")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("[... ")]
    return lines[-1] if lines else ""


def _run(
    program: str, test: str, entry_point: str, limits: SandboxLimits, tmp: Path, start: float
) -> SandboxResult:
    nonce = secrets.token_hex(16)
    payload = tmp / "payload.json"
    job = {
        "nonce": nonce,
        "program": program,
        "test": test,
        "entry_point": entry_point,
        "memory_mb": int(limits.memory_mb),
        "cpu_s": max(1, int(limits.cpu_s)),
        "fsize": _FILE_SIZE_LIMIT,
        "nofile": _OPEN_FILES_LIMIT,
    }
    payload.write_text(json.dumps(job), encoding="utf-8")
    read_fd, write_fd = os.pipe()
    # `-s -P -B` is `-I` minus `-E`: -E would drop PYTHONHASHSEED, and the environment is ours anyway.
    # Limits and namespaces are set by the harness itself, not by a preexec_fn (unsafe in a threaded parent).
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-s", "-P", "-B", "-c", _CHILD, str(payload), str(write_fd)],
                cwd=tmp,
                env=_child_env(tmp),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        out, err = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes)
        try:
            timed_out = _collect(proc, start + limits.timeout_s, out, err)
        finally:
            _kill_group(proc)  # whatever is left of the group, the child included, before reaping it
            proc.wait()  # exited or SIGKILLed: returns at once
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        record = _read_record(read_fd, nonce)
    finally:
        os.close(read_fd)

    seconds = time.monotonic() - start
    rc = proc.returncode
    stdout, stderr = out.text(), err.text()
    if timed_out:
        status, detail = "timeout", f"timed out after {limits.timeout_s:g} s"
    elif record is not None:
        status, detail = record["status"], record["detail"]
        if status == "passed" and rc != 0:
            status, detail = "error", f"the tests passed but the process ended with code {rc}"
    elif rc < 0:
        status, detail = "crashed", _signal_detail(-rc)
        if last := _last_line(stderr):
            detail += f": {last}"
    else:
        status, detail = "error", f"exited before the tests finished (exit code {rc})"
        if last := _last_line(stderr):
            detail += f": {last}"
    netns = record.get("netns") if record else None
    logger.debug("sandbox run: %s in %.2f s (%s); network namespace: %s", status, seconds, detail, netns)
    return SandboxResult(status == "passed", status, _clip(detail), seconds, stdout, stderr)


def run_python_tests(
    program: str, test: str, entry_point: str, limits: SandboxLimits = _DEFAULT_LIMITS
) -> SandboxResult:
    """Run `program`, then `test` (defines check(candidate)), then check(<entry_point>), in a sandbox.

    Never raises for anything the candidate does: every failure comes back as a SandboxResult, and no
    process of the run outlives the call.

    Args:
        program: the candidate's Python source.
        test: Python source defining `check(candidate)`, which raises (e.g. AssertionError) on failure.
        entry_point: the name of the function in `program` that is passed to check().
        limits: time, memory, CPU and output limits.

    Returns:
        The SandboxResult; `passed` only when check() returned normally.
    """
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="handoff-sandbox-", ignore_cleanup_errors=True) as tmp:
            return _run(program, test, entry_point, limits, Path(tmp), start)
    except Exception as e:  # the sandbox itself failed (fork refused, disk full, ...): fail this task only
        logger.warning("sandbox run failed: %s: %s", type(e).__name__, e)
        detail = _clip(f"sandbox failure: {type(e).__name__}: {e}")
        return SandboxResult(False, "error", detail, time.monotonic() - start)
