"""How people launch runs, for real: `ray job submit` to a `ray start --head` cluster, and Hydra sweeps.

Each test starts what it needs (a Ray head on free ports with its own temp dir, or one local Ray per
sweep job) and stops only the processes it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf.utils.metrics import read_metrics

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
RLHF = str(BIN / "rlhf")

# The tiny world, shrunk: 4 prompts × 4 samples = 16 sequences per step, 2 policy ranks × micro 4.
TINY = [
    "model.path=tiny",
    "data.train=tiny",
    "run.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=4",
    "policy.train_batch_size=8",
    "policy.micro_batch_size=4",
    "rollout.backend=hf",
    "rollout.sampling.max_new_tokens=8",
    "run.eval_size=8",
    "run.eval_every=0",
    "run.progress_bar=false",
    "run.tensorboard=false",
]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) of every process we can see."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry)] = (parent, cmdline)
    return found


def stop_head(temp_dir: str, gcs_port: int, grace_s: float = 5.0) -> None:
    """Stop the Ray head this test started, and only it.

    `ray stop` would end every Ray process of this user on the machine (other tests' and other
    people's clusters too) and takes no --temp-dir, so: the processes whose command line names this
    head's temp dir or GCS port, plus all their descendants (workers, the job's driver), by pid.
    """
    procs = _processes()
    tree = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd or f":{gcs_port}" in cmd}
    grown = True
    while grown:
        children = {pid for pid, (parent, _) in procs.items() if parent in tree} - tree
        tree |= children
        grown = bool(children)
    tree.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class RayHead:
    address: str
    """The dashboard / job server, what `ray job submit --address` takes."""
    gcs_address: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """`ray start --head` on free ports with a short temp dir of its own (socket paths must stay < 108 chars)."""
    temp_dir = tempfile.mkdtemp(prefix="rlhf-head-")
    gcs, dashboard, client, agent = free_ports(4)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        RAY, "start", "--head", "--num-cpus=8", f"--port={gcs}",
        "--include-dashboard=true", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp_dir}", "--object-store-memory=500000000", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed\n{started.stdout}\n{started.stderr}"
        yield RayHead(address=f"http://127.0.0.1:{dashboard}", gcs_address=f"127.0.0.1:{gcs}", env=env)
    finally:
        stop_head(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(head: RayHead, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", *args, "--address", head.address], env=head.env, capture_output=True, text=True, timeout=timeout
    )


def wait_for_job(head: RayHead, submission_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        out = ray_job(head, "status", submission_id).stdout
        for status in ("SUCCEEDED", "FAILED", "STOPPED"):
            if f"Job '{submission_id}' {status.lower()}" in out or f"status: {status}" in out:
                return status
        time.sleep(2)
    ray_job(head, "stop", submission_id)
    return "TIMEOUT"


def test_ray_job_submit_runs_tiny_grpo(ray_head, tmp_path):
    out = tmp_path / "run"
    submission_id = f"rlhf-test-{os.getpid()}-{int(time.time())}"
    submit = subprocess.run(
        [
            sys.executable, str(REPO / "launch" / "submit.py"),
            "--address", ray_head.address, "--python", sys.executable,
            "--submission-id", submission_id, "--no-wait",
            "--", *TINY, "run.total_steps=2", f"run.output_dir={out}",
        ],
        cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert submission_id in submit.stdout + submit.stderr

    status = wait_for_job(ray_head, submission_id, timeout_s=140)
    logs = ray_job(ray_head, "logs", submission_id).stdout
    assert status == "SUCCEEDED", f"job {status}\n--- ray job logs\n{logs[-8000:]}"
    assert "step 2" in logs and "reward/mean=" in logs

    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "reward/mean" in r and "policy/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert (out / "final" / "config.json").exists()


def check_kl_sweep(sweep: Path, tmp_path: Path) -> None:
    """Two jobs in their own dirs, and the summary table with one row each."""
    for job in ("0", "1"):
        assert (sweep / job / "metrics.jsonl").exists(), f"job {job} did not write into its own sweep dir"
    assert not (tmp_path / "outputs").exists(), "a sweep job wrote to the default run.output_dir"

    summary = sweep / "summary.json"
    assert summary.exists(), "no sweep summary: is rlhf.utils.sweep.SweepSummary in hydra.callbacks?"
    payload = json.loads(summary.read_text())
    assert payload["swept"] == ["algorithm.kl_coef"]
    runs = payload["runs"]
    assert [r["overrides"]["algorithm.kl_coef"] for r in runs] == ["0.0", "0.01"]
    assert [r["status"] for r in runs] == ["COMPLETED", "COMPLETED"]
    assert all(r["steps"] == 1 and r["metrics"]["reward/mean"] is not None for r in runs)
    assert runs[0]["metrics"]["kl"] is None  # kl_coef=0: no reference model, no KL
    assert runs[1]["metrics"]["kl"] is not None
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0].startswith("| run | algorithm.kl_coef | status | steps | reward/mean |")
    assert len(table) == 4
    assert (sweep / "sweep_reward.png").read_bytes()[:4] == b"\x89PNG"  # the sweep comparison plot


@pytest.mark.slow  # the basic-launcher sweep below keeps the sweep path in the default suite
def test_ray_launcher_sweep_on_the_running_cluster(ray_head, tmp_path):
    """The same sweep through hydra-ray-launcher: each job a Ray task on the existing cluster, in parallel."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is not installed")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            RLHF, "-m", "algorithm.kl_coef=0.0,0.01", *TINY, "run.total_steps=1", f"hydra.sweep.dir={sweep}",
            "hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_head.gcs_address}",
            "++hydra.launcher.ray.init.object_store_memory=null", "++hydra.launcher.ray.remote.num_cpus=0",
        ],
        cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "Callback SweepSummary" not in proc.stderr, proc.stderr[-3000:]
    check_kl_sweep(sweep, tmp_path)


def test_two_point_kl_sweep_writes_summary(tmp_path):
    """`rlhf -m algorithm.kl_coef=0.0,0.01` with the basic launcher: two runs, then the table.

    Needs conf/config.yaml to register rlhf.utils.sweep.SweepSummary under hydra.callbacks, and the
    CLI to give each job its own output dir (rlhf.utils.sweep.job_output_dir).
    """
    sweep = tmp_path / "sweep"
    ray_tmp = tempfile.mkdtemp(prefix="rlhf-sweep-")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            [RLHF, "-m", "algorithm.kl_coef=0.0,0.01", *TINY, "run.total_steps=1", f"hydra.sweep.dir={sweep}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "Callback SweepSummary" not in proc.stderr, proc.stderr[-3000:]
    check_kl_sweep(sweep, tmp_path)
