"""How people launch runs, for real: `ray job submit` to a `ray start --head` cluster, and Hydra sweeps.

Each test starts what it needs (a Ray head on free ports with its own temp dir, or one local Ray per
sweep job) and stops only the processes it started.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


def stop_ray(temp_dirs: Sequence[str], gcs_port: int | None, grace_s: float = 5.0) -> None:
    """Stop the Ray nodes this test started, and only them.

    `ray stop` would end every Ray process of this user on the machine (other tests' and other
    people's clusters too) and takes no --temp-dir, so: the processes whose command line names one of
    these nodes' temp dirs or the GCS port, plus all their descendants (workers, the job's driver), by pid.
    gcs_port None: only the nodes of these temp dirs (every node names the GCS port).
    """
    procs = _processes()
    gcs = f":{gcs_port}" if gcs_port is not None else None
    tree = {pid for pid, (_, cmd) in procs.items() if (gcs and gcs in cmd) or any(d in cmd for d in temp_dirs)}
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


@contextmanager
def ray_nodes(head_cpus: int, worker_cpus: Sequence[int] = ()) -> Iterator[RayHead]:
    """`ray start --head` and one `ray start --address` per entry of `worker_cpus`, on free ports, each node
    with a short temp dir of its own (socket paths must stay < 108 chars): several Ray nodes on this machine."""
    temp_dirs = [tempfile.mkdtemp(prefix="rlhf-head-")] + [tempfile.mkdtemp(prefix="rlhf-node-") for _ in worker_cpus]
    gcs, dashboard, client, agent = free_ports(4)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    head = [
        RAY, "start", "--head", f"--num-cpus={head_cpus}", f"--port={gcs}",
        "--include-dashboard=true", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp_dirs[0]}", "--object-store-memory=300000000", "--disable-usage-stats",
    ]  # fmt: skip
    workers = []
    for cpus, temp_dir in zip(worker_cpus, temp_dirs[1:]):
        ports = free_ports(6)
        workers.append([
            RAY, "start", f"--address=127.0.0.1:{gcs}", f"--num-cpus={cpus}", f"--temp-dir={temp_dir}",
            f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
            f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
            "--object-store-memory=100000000", "--disable-usage-stats",
        ])  # fmt: skip
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed\n{started.stdout}\n{started.stderr}"
        for cmd, temp_dir in zip(workers, temp_dirs[1:]):
            join_node(cmd, temp_dir, env)
        yield RayHead(address=f"http://127.0.0.1:{dashboard}", gcs_address=f"127.0.0.1:{gcs}", env=env)
    finally:
        stop_ray(temp_dirs, gcs)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def join_node(cmd: list[str], temp_dir: str, env: dict[str, str], attempts: int = 2) -> None:
    """`ray start --address ...` for one worker node, one node at a time, a second attempt if it times out.

    Ray gives a new raylet 30 s to register with the GCS (ray/_private/node.py). Three nodes starting together
    on 2 busy cores once missed it (a fresh-clone CI run: "The current node timed out during startup"); one at a
    time they start in a few seconds each. A failed attempt's processes are stopped before the next."""
    for attempt in range(1, attempts + 1):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
        stop_ray([temp_dir], gcs_port=None)
        if attempt == attempts:
            pytest.fail(f"ray start (worker) failed {attempts} times\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """One Ray node with 8 logical CPUs, started with `ray start --head`."""
    with ray_nodes(head_cpus=8) as head:
        yield head


def ray_job(head: RayHead, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", *args, "--address", head.address], env=head.env, capture_output=True, text=True, timeout=timeout
    )


ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def job_status(head: RayHead, submission_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, from the job server's REST API.

    Polled every second or two while a job runs, so through Ray's Python client in this process: each `ray job
    status` process cost 2 s of CPU (measured, 40 polls a run), the cores the job itself needs. The CLI still
    stops the jobs and prints their logs below, as a user does."""
    return job_client(head.address).get_job_status(submission_id).value


@functools.cache
def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def wait_for_job(head: RayHead, submission_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job_status(head, submission_id)
        if status in ENDED:
            return status
        time.sleep(2)
    ray_job(head, "stop", submission_id)
    return "TIMEOUT"


def submit_job(head: RayHead, overrides: Sequence[str], cwd: Path) -> str:
    """`launch/submit.py --no-wait ... -- <overrides>`; the submission id."""
    submission_id = f"rlhf-test-{os.getpid()}-{time.monotonic_ns()}"
    submit = subprocess.run(
        [
            sys.executable, str(REPO / "launch" / "submit.py"),
            "--address", head.address, "--python", sys.executable,
            "--submission-id", submission_id, "--no-wait", "--", *overrides,
        ],
        cwd=cwd, env=head.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert submission_id in submit.stdout + submit.stderr
    return submission_id


@pytest.mark.slow  # the multi-node job below submits through the same path (and stops and resumes)
def test_ray_job_submit_runs_tiny_grpo(ray_head, tmp_path):
    out = tmp_path / "run"
    submission_id = submit_job(ray_head, [*TINY, "run.total_steps=2", f"run.output_dir={out}"], tmp_path)

    status = wait_for_job(ray_head, submission_id, timeout_s=140)
    logs = ray_job(ray_head, "logs", submission_id).stdout
    assert status == "SUCCEEDED", f"job {status}\n--- ray job logs\n{logs[-8000:]}"
    assert "step 2" in logs and "reward/mean=" in logs

    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "reward/mean" in r and "policy/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert (out / "final" / "config.json").exists()


# cluster=multi_node on CPUs and shrunk: 2 policy ranks (ZeRO-3, bf16, PACK as the preset says), 1 engine, 1 CPU each.
MULTI_NODE = [
    "cluster=multi_node", "cluster.device=cpu",
    "cluster.policy.num_cpus=1", "cluster.policy.num_gpus=0", "cluster.rollout.num_cpus=1", "cluster.rollout.num_gpus=0",
    "policy.num_workers=2", "rollout.num_engines=1", *TINY, "run.save_every=1", "run.plots=false",
]  # fmt: skip


def wait_for_checkpoint(head: RayHead, submission_id: str, output_dir: Path, timeout_s: float) -> None:
    """Until the running job has written a complete checkpoint (older ones are pruned: any will do)."""
    deadline = time.monotonic() + timeout_s
    while not list((output_dir / "checkpoints").glob("step_*/trainer_state.json")):
        status = job_status(head, submission_id)
        if time.monotonic() > deadline or status in ENDED:
            logs = ray_job(head, "logs", submission_id).stdout
            pytest.fail(f"no checkpoint in {output_dir} (job {status})\n--- ray job logs\n{logs[-8000:]}")
        time.sleep(1)


def test_multi_node_job_places_roles_by_node_syncs_collectively_and_resumes_after_stop(tmp_path):
    """`cluster=multi_node` through launch/submit.py on four Ray nodes of this machine: a head that only hosts the
    driver (0 CPUs) and three 1-CPU nodes, each with its own temp dir. PACK cannot fit the policy's 2 ranks on one
    node, so they take two (the fewest possible) and the engine the third. The engine is not on the trainer rank 0's
    node, so weight_sync_transport=auto must take the collective although every node shares this machine's
    /dev/shm. tmp_path is the shared filesystem: every rank writes its checkpoint shards there. The job is stopped
    with `ray job stop` after its first checkpoint; a new job with run.resume=auto continues from the newest one.
    """
    out = tmp_path / "run"
    with ray_nodes(head_cpus=0, worker_cpus=[1, 1, 1]) as head:
        first = submit_job(head, [*MULTI_NODE, "run.total_steps=50", f"run.output_dir={out}"], tmp_path)
        # liveness bounds, not timings: ~2 min on an idle machine; a fresh machine builds the tiny world and
        # DeepSpeed's shm op in its first job, and with the other test worker busy that took over 4 min
        wait_for_checkpoint(head, first, out, timeout_s=480)
        stopped = ray_job(head, "stop", first, timeout=120)
        assert wait_for_job(head, first, timeout_s=60) == "STOPPED", stopped.stdout + stopped.stderr

        layout = json.loads((out / "placement.json").read_text())
        nodes = layout["nodes"]
        head_node = next(n for n, info in nodes.items() if "node:__internal_head__" in info["resources"])
        workers = {n for n, info in nodes.items() if info["resources"].get("CPU") == 1.0}
        assert len(nodes) == 4 and len(workers) == 3 and head_node not in workers
        assert layout["driver_node_id"] == head_node
        policy_nodes = [r["node_id"] for r in layout["roles"]["policy"]]
        engine_nodes = [r["node_id"] for r in layout["roles"]["rollout"]]
        assert len(set(policy_nodes)) == 2 and set(policy_nodes) <= workers  # PACK: as few nodes as fit 2 ranks
        assert len(engine_nodes) == 1 and engine_nodes[0] in workers - set(policy_nodes)
        assert layout["weight_sync"] == {"transport": "collective", "backend": "gloo"}

        rows = read_metrics(out / "metrics.jsonl")
        assert rows and all(r["weight_sync/shm"] == 0.0 for r in rows if "weight_sync/shm" in r)
        checkpoint = max((out / "checkpoints").glob("step_*"))
        assert {p.name for p in (checkpoint / "policy" / "state").glob("*optim_states.pt")} == {
            f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)
        }  # both ranks' ZeRO-3 shards, written from two nodes, in one directory
        step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]

        overrides = [*MULTI_NODE, f"run.total_steps={step + 1}", "run.resume=auto", f"run.output_dir={out}"]
        second = submit_job(head, overrides, tmp_path)
        status = wait_for_job(head, second, timeout_s=480)
        logs = ray_job(head, "logs", second).stdout
        assert status == "SUCCEEDED", f"job {status}\n--- ray job logs\n{logs[-8000:]}"
    assert f"resuming from {checkpoint} (step {step})" in logs
    resumed = [r["step"] for r in read_metrics(out / "metrics.jsonl")[len(rows) :] if "policy/loss" in r]
    assert resumed == [step + 1]  # from the checkpoint's step, not from step 0
    assert (out / "final" / "model.safetensors").exists()


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


@pytest.mark.slow  # the sweep callback in a real Hydra multirun: tests/unit/launch/test_sweep.py (default)
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
