"""The Python tool's sandbox: a real child process per run, its limits enforced by the kernel (resource limits)
and its refusals by the audit hook; each hit is reported, and nothing outlives its wall-clock limit."""

from __future__ import annotations

import time

import pytest

from rlhf.environments import PythonEnv, SandboxLimits, run_python

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=10, memory_mb=256, output_bytes=4096)


def test_code_runs_imports_and_writes_in_its_scratch_directory():
    result = run_python(
        "import json, math\nopen('out.txt', 'w').write('7')\nprint(json.dumps(math.factorial(int(open('out.txt').read()))))",
        FAST,
    )
    assert result.ok and result.stdout == "5040\n"


@pytest.mark.parametrize(
    "code,refused",
    [
        ("open('/etc/passwd').read()", "read /etc/passwd"),
        ("open('/tmp/escaped.txt', 'w').write('x')", "write /tmp/escaped.txt"),
        ("import os\nos.listdir('/etc')", "os.listdir /etc"),
        ("import os\nos.remove('/etc/hostname')", "os.remove /etc/hostname"),
        ("import socket\nsocket.socket()", "socket.__new__"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "socket."),
        ("import os\nos.system('echo hi')", "os.system"),
        ("import subprocess\nsubprocess.run(['ls'])", "import _posixsubprocess"),
        ("import os\nos.fork()", "os.fork"),
        ("import ctypes", "import ctypes"),
    ],
)
def test_escapes_are_refused_and_reported(code, refused):
    result = run_python(code, FAST)
    assert not result.ok and result.killed is None
    assert result.refused and result.refused[0].startswith(refused)
    assert "PermissionError: sandbox:" in result.stderr  # the code saw the refusal as an exception


def test_a_refusal_the_code_catches_is_still_reported():
    result = run_python("try:\n    open('/etc/passwd')\nexcept PermissionError:\n    print('caught')", FAST)
    assert result.stdout == "caught\n" and result.exit_code == 0
    assert result.refused == ["read /etc/passwd"] and not result.ok


@pytest.mark.parametrize(
    "code,limits,killed",
    [
        ("while True:\n    pass", SandboxLimits(cpu_seconds=1, wall_seconds=20), "cpu"),
        ("import time\ntime.sleep(60)", SandboxLimits(wall_seconds=1), "wall"),
        ("x = bytearray(2 * 10**9)", SandboxLimits(memory_mb=256), "memory"),
        ("print('x' * 10**6)", SandboxLimits(output_bytes=1000), "output"),
    ],
    ids=["cpu", "wall", "memory", "output"],
)
def test_limits_end_the_run_and_say_which(code, limits, killed):
    start = time.monotonic()
    result = run_python(code, limits)
    assert result.killed == killed and not result.ok
    assert time.monotonic() - start < 15  # nothing hangs


def test_output_past_the_limit_is_truncated_when_the_process_survives():
    result = run_python("import sys\nsys.stdout.write('y' * 900)", SandboxLimits(output_bytes=1000))
    assert result.ok and result.stdout == "y" * 900


def test_python_environment_answers_with_output_errors_and_counts():
    env = PythonEnv(cpu_seconds=1, wall_seconds=5)
    result = env.step("Let me compute.<python>print(123 * 456)</python>")
    assert result.observation == "56088" and result.info["tool_calls"] == 1 and result.info["tool_errors"] == 0
    error = env.step("<python>1/0</python>")
    assert error.observation == "error: ZeroDivisionError: division by zero" and error.info["tool_errors"] == 1
    refused = env.step("<python>print(open('/etc/passwd').read())</python>")
    assert refused.observation == "error: not allowed: read /etc/passwd" and refused.info["tool_refused"] == 1
    slow = env.step("<python>while True: pass</python>")
    assert slow.observation == "error: cpu limit reached" and slow.info["tool_timeouts"] == 1
    assert env.step("The answer is 56088.").done
