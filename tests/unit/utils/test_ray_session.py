"""What the machine must have is checked when a run starts its own Ray, not in validate(); a held local cluster."""

import os
import subprocess
import sys

import pytest
import torch

from rlhf.config import ClusterConfig
from rlhf.errors import ConfigError
from rlhf.utils.ray_session import check_local_devices


def test_a_cuda_preset_on_a_machine_without_a_gpu_stops_before_ray_starts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, whatever it has
    with pytest.raises(ConfigError, match=r"cluster.device=cuda \(cluster=single_gpu\), but torch sees no CUDA GPU"):
        check_local_devices(ClusterConfig(name="single_gpu", device="cuda"))
    check_local_devices(ClusterConfig(device="cpu"))  # nothing to ask of the machine


HELD_PROBE = """
import logging
import sys

import ray
from rlhf.config import ClusterConfig, ResourceConfig
from rlhf.utils.process_pool import PROCESS_POOL
from rlhf.utils.ray_session import held_ray_session, ray_session
from rlhf.workers.group import Worker, WorkerGroup

logging.basicConfig(level=logging.INFO)

def run(cluster):
    with ray_session(cluster):
        group = WorkerGroup(Worker, role="probe", num_workers=1, resources=ResourceConfig(num_cpus=1))
        pid = group.ping()[0]["pid"]
        group.shutdown()
        return ray.get_runtime_context().gcs_address, pid

with held_ray_session():
    (first, first_pid), (again, again_pid) = run(ClusterConfig(num_cpus=2)), run(ClusterConfig(num_cpus=2))
    _, own_pid = run(ClusterConfig(num_cpus=2, reuse_worker_processes=False))
    assert own_pid != again_pid and not PROCESS_POOL.parked
    joined, _ = run(ClusterConfig(address=sys.argv[1]))
    assert not ray.is_initialized()  # a joined cluster is left at the end of its run
    assert not PROCESS_POOL.enabled and not PROCESS_POOL.parked  # nothing is parked on a cluster joined by address
assert not ray.is_initialized()
print(first == again, first_pid == again_pid, joined == sys.argv[1])
"""


def test_held_session_keeps_one_cluster_for_runs_with_its_settings_and_stops_it_for_others(ray_cluster):
    """rlhf and rlhf-pipeline hold the local cluster between a stage, its final evaluation and the next step, and
    the next run's group of a shape builds in the processes of the last one's (rlhf.utils.process_pool; not with
    cluster.reuse_worker_processes=false); a run with other settings (here: joining the suite's cluster by
    address) stops it first. In a process of its own: the suite's cluster is up in this one."""
    address = ray_cluster.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", HELD_PROBE, address], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "True"]
    assert proc.stderr.count("Started a local Ray instance") == 1
    assert "reusing the Ray cluster of the previous run of this process" in proc.stderr
    assert "stopping the Ray cluster of the previous run: this run needs another" in proc.stderr
