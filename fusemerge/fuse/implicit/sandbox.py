"""Run untrusted Python (a model's code and a record's tests) in a child process, never in ours.

What a model writes can loop forever, crash the interpreter, eat the machine's memory, fork, or reach
the network; any of these must fail *that* response and leave the scoring run going. So each run is:

- a separate process (`python -I`: isolated mode, no user site, no PYTHON* variables, no cwd on sys.path)
  in its own session, killed with its whole process group at the wall-clock timeout;
- under rlimits set in the child before the code runs: address space (`memory_mb`), CPU seconds (the
  timeout, rounded up, plus one), file size (16 MiB), no core files;
- in an empty temporary working directory (also its HOME), with a minimal environment; the code comes
  through stdin, stdout/stderr go to files outside that directory;
- writing only inside that directory: the audit hook ends the process on a file opened for writing, or
  a file created, removed, renamed or re-permissioned, anywhere else (bytecode caching is off);
- without network: an audit hook (PEP 578) in the child ends the process on any non-Unix socket, connect,
  bind, sendto or name lookup, and on process spawning (which would escape the hook); and, where the
  kernel allows it, inside an empty network namespace (`unshare -n`, or `unshare -rn` unprivileged), which
  also stops what an audit hook cannot see (ctypes calling libc).

The audit hook is a guard against accidents and ordinary code, not a security boundary against an
adversary; the namespace and rlimits are the hard limits. Results: passed iff the process exits 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

FSIZE_BYTES = 16 * 2**20
NETWORK_EXIT = 97
SPAWN_EXIT = 98
FILESYSTEM_EXIT = 99
# BLAS pools reserve address space per thread: one thread each under a memory limit (kept by -I: not PYTHON*).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MARK = "fusemerge-sandbox:"

# The child: limits first, then read the program, then the audit hook, then run it as __main__.
# A plain string (not an f-string) so that it reads as the Python it is; the constants come in argv.
BOOTSTRAP = r"""
import os, resource, sys
mem_mb, cpu_s, fsize, mark, net_exit, spawn_exit, fs_exit = sys.argv[1:8]
resource.setrlimit(resource.RLIMIT_AS, (int(mem_mb) * 2**20,) * 2)
resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s) + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize),) * 2)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.dont_write_bytecode = True  # imports must not write __pycache__ next to the library
source = sys.stdin.read()
sys.stdin = open(os.devnull)
HOME = os.path.realpath(os.getcwd())
NET = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
       "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}
SPAWN = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
         "pty.spawn"}
CHANGE = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod", "os.chown",
          "os.truncate", "os.symlink", "os.link", "os.utime", "shutil.move", "shutil.copyfile"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def inside(path, _real=os.path.realpath, _fs=os.fsdecode):
    if isinstance(path, int):
        return True  # an open descriptor: its path was checked when it was opened
    real = _real(_fs(path))
    return real == HOME or real.startswith(HOME + os.sep) or real == os.devnull
def stop(code, what, _write=os.write, _exit=os._exit):
    _write(2, ("\n" + mark + " " + what + "\n").encode())
    _exit(int(code))
def guard(event, args):
    if event in NET or (event == "socket.__new__" and len(args) > 1 and args[1] != 1):
        stop(net_exit, "network attempt (" + event + ")")
    if event in SPAWN:
        stop(spawn_exit, "process spawn (" + event + ")")
    if event == "open" and args[0] is not None:
        mode, flags = args[1] or "", args[2] or 0
        if (any(c in mode for c in "wax+") or flags & WRITE_FLAGS) and not inside(args[0]):
            stop(fs_exit, "filesystem write outside the sandbox (" + str(args[0])[:80] + ")")
    if event in CHANGE and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        stop(fs_exit, "filesystem change outside the sandbox (" + event + ")")
sys.addaudithook(guard)
del guard
exec(compile(source, "solution.py", "exec"), {"__name__": "__main__"})
"""

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class SandboxOutcome:
    passed: bool
    detail: str  # one line: "passed", "timeout after 10s", "memory limit", "network attempt", ...
    returncode: int | None


def cpu_count() -> int:
    """The cores this process may use (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def extract_code(response: str) -> str | None:
    """The response's code: the longest fenced block tagged python/py (or untagged), else None.

    Answers often add a short usage example in a second block; the solution is usually the longest.
    """
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    python = [body for tag, body in blocks if tag in ("python", "py", "python3", "")]
    if not python:
        return None
    best = max(python, key=len)
    return best if best.strip() else None


@cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that puts the child in an empty network namespace here, or () if none works."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return ()
    for prefix in ((unshare, "-n"), (unshare, "-rn")):
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def run_python_tests(code: str, tests: str, *, timeout_s: float, memory_mb: int) -> SandboxOutcome:
    """Run `code` then `tests` as one program in the sandbox; passed iff it exits 0 in time.

    Args:
        code: the response's code.
        tests: the record's test code (asserts, or a call of a check function).
        timeout_s: wall-clock limit; the process group is killed after it.
        memory_mb: address-space limit of the child.
    """
    program = f"{code}\n\n# --- tests ---\n{tests}\n"
    cpu = math.ceil(timeout_s) + 1
    with tempfile.TemporaryDirectory(prefix="fusemerge-run-") as root:
        cwd = Path(root) / "cwd"
        cwd.mkdir()
        out_path, err_path = Path(root) / "stdout", Path(root) / "stderr"
        env = {
            "PATH": os.defpath,
            "HOME": str(cwd),
            "LANG": "C.UTF-8",
            "TMPDIR": str(cwd),
            **ONE_THREAD,
        }
        limits = [memory_mb, cpu, FSIZE_BYTES, MARK, NETWORK_EXIT, SPAWN_EXIT, FILESYSTEM_EXIT]
        argv = [*network_isolation(), sys.executable, "-I", "-c", BOOTSTRAP, *map(str, limits)]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                return SandboxOutcome(False, f"could not start: {exc.strerror}", None)
            try:
                proc.communicate(program.encode("utf-8"), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return SandboxOutcome(False, f"timeout after {timeout_s:g}s", None)
            finally:
                _kill_group(proc)  # children it left behind die with it
        return _outcome(proc.returncode, err_path.read_bytes()[-2000:].decode("utf-8", errors="replace"))


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _outcome(returncode: int, stderr: str) -> SandboxOutcome:
    if returncode == 0:
        return SandboxOutcome(True, "passed", 0)
    if MARK in stderr:
        what = stderr.split(MARK)[-1].strip().splitlines()[0]
        return SandboxOutcome(False, what, returncode)
    if "MemoryError" in stderr:
        return SandboxOutcome(False, "memory limit (MemoryError)", returncode)
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        reason = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed"}.get(
            name, "crashed"
        )
        return SandboxOutcome(False, f"{reason} ({name})", returncode)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return SandboxOutcome(
        False, f"failed: {lines[-1][:200] if lines else f'exit code {returncode}'}", returncode
    )
