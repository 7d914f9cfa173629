"""Run a model's Python code in a separate process with limits: the Python tool's sandbox.

Each run gets a fresh scratch directory (its working directory and HOME) and a new process session, and runs
under resource limits set before the interpreter starts: CPU seconds, address space (memory), the size of any
file it writes (stdout and stderr included, which go to files; a write past it fails), open files; the parent
kills the whole session after `wall_seconds`. Inside, an audit hook (PEP 578, installed before the code runs and impossible to remove)
refuses: opening files outside the scratch directory (reading the Python installation and its import path
stays allowed, or nothing could be imported), changing files outside it, sockets, new processes (fork, exec,
subprocess, os.system), signals to other processes and ctypes. Each refusal raises PermissionError in the code
and is reported (`SandboxResult.refused`); each limit hit ends the run and is reported (`SandboxResult.killed`).

This stops a policy's mistakes and casual escapes. It is not a security boundary against code written to break
out (CPython's audit hooks are not one): run untrusted code inside a container or VM as well (docs/agents.md).
"""

from __future__ import annotations

import errno
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

KILLED = ("cpu", "memory", "wall", "output")
"""Why a run was stopped: CPU time, memory, wall-clock time, or output (a written file, stdout included,
past its size limit)."""
MARKER = "[sandbox refused {nonce}]"

# Runs in the child before the user's code: the audit hook, then the code from main.py in the scratch directory.
_BOOTSTRAP = r"""
import os, sys
_scratch, _nonce = sys.argv[1], sys.argv[2]
_roots = [os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path} if p and os.path.isdir(p)]
_devices = {"/dev/null", "/dev/urandom", "/dev/random"}
_write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_processes = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
              "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.startfile"}
_changes = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.symlink", "os.link",
            "os.truncate", "os.utime", "os.chdir", "os.chroot"}
_blocked_modules = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"}

def _inside(path, roots):
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

def _real(path):
    if isinstance(path, int):
        return None
    return os.path.realpath(os.fsdecode(path))

def _refuse(what):
    os.write(2, ("\n[sandbox refused " + _nonce + "] " + what + "\n").encode())
    raise PermissionError("sandbox: " + what + " is not allowed")

def _hook(event, args):
    if event == "open":
        path = _real(args[0])
        if path is None or _inside(path, [_scratch]):
            return
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        writing = bool(flags & _write_flags) or any(c in mode for c in "wax+")
        if not writing and (_inside(path, _roots) or path in _devices):
            return
        _refuse(("write " if writing else "read ") + path)
    elif event.startswith("socket."):
        _refuse(event)
    elif event in _processes:
        _refuse(event)
    elif event in _changes:
        paths = [_real(a) for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if not all(p is not None and _inside(p, [_scratch]) for p in paths):
            _refuse(event + " " + " ".join(str(p) for p in paths))
    elif event in ("os.listdir", "os.scandir"):
        path = _real(args[0]) if args and args[0] is not None else os.getcwd()
        if path is not None and not _inside(path, [_scratch, *_roots]):
            _refuse(event + " " + path)
    elif event == "import" and args[0].split(".")[0] in _blocked_modules:
        _refuse("import " + args[0])

os.chdir(_scratch)
with open(os.path.join(_scratch, "main.py"), encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
sys.addaudithook(_hook)
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class SandboxLimits:
    cpu_seconds: int = 5
    """CPU time of the process; past it the kernel stops it (SIGXCPU)."""
    wall_seconds: float = 10.0
    """Wall-clock time; past it the parent kills the process's session."""
    memory_mb: int = 512
    """Address space; an allocation past it fails (MemoryError)."""
    output_bytes: int = 65536
    """Size of any file the code writes, stdout and stderr included; a write past it fails (EFBIG)."""
    open_files: int = 64
    """File descriptors."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: Optional[int]
    """The process's exit status; negative: the signal that ended it; None: killed for the wall-clock limit."""
    killed: Optional[str] = None
    """Which limit ended the run (one of KILLED), None if it ended on its own."""
    refused: list[str] = field(default_factory=list)
    """What the audit hook refused ("read /etc/passwd", "socket.__new__", ...), in order."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None and not self.refused


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a script in a fresh scratch directory under `limits` (module docstring)."""
    limits = limits or SandboxLimits()
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="rlhf-sandbox-") as root:
        scratch = Path(root) / "scratch"
        scratch.mkdir()
        (scratch / "main.py").write_text(code, encoding="utf-8")
        out_path, err_path = Path(root) / "stdout", Path(root) / "stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(scratch.resolve()), nonce],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=scratch,
                env={"PATH": "/usr/bin:/bin", "HOME": str(scratch), "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
                start_new_session=True,
                preexec_fn=lambda: _set_limits(limits),
            )
            try:
                exit_code: Optional[int] = process.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                _kill_session(process)
                exit_code = None
        stdout = _read(out_path, limits.output_bytes)
        stderr = _read(err_path, limits.output_bytes)
    marker = MARKER.format(nonce=nonce)
    refused = [line[len(marker) :].strip() for line in stderr.splitlines() if line.startswith(marker)]
    stderr = "\n".join(line for line in stderr.splitlines() if line.strip() and not line.startswith(marker))
    return SandboxResult(stdout, stderr, exit_code, _killed(exit_code, stderr), refused)


def _set_limits(limits: SandboxLimits) -> None:
    """In the child, before exec: the kernel enforces these whatever the code does."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    memory = limits.memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _killed(exit_code: Optional[int], stderr: str) -> Optional[str]:
    if exit_code is None:
        return "wall"
    if exit_code in (-signal.SIGXCPU, -signal.SIGKILL):  # the soft CPU limit sends SIGXCPU, the hard one SIGKILL
        return "cpu"
    # CPython ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG ("[Errno 27] File too large") instead
    if exit_code == -signal.SIGXFSZ or (exit_code != 0 and f"[Errno {errno.EFBIG}]" in stderr):
        return "output"
    if exit_code != 0 and "MemoryError" in stderr:
        return "memory"
    return None


def _read(path: Path, limit: int) -> str:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")
