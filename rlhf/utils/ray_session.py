"""Start (or join) the Ray cluster for one run, with the environment every actor needs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhf.config import ClusterConfig
from rlhf.errors import ConfigError
from rlhf.utils.distributed import clear_stale_build_locks, torch_extensions_dir
from rlhf.utils.seeding import DETERMINISTIC_KEYS, deterministic_mode

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def runtime_env_vars(cluster: ClusterConfig) -> dict[str, str]:
    """Variables that must be set before torch/deepspeed/vllm import in every actor.

    A run.deterministic run's variables (rlhf.utils.seeding.deterministic_env) are taken from this
    process's environment, where `ray_session` puts them for the run.
    """
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TORCH_EXTENSIONS_DIR": torch_extensions_dir(),
        "RLHF_CACHE": str(cache_dir()),
    }
    if cluster.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    for key in ("RAY_AUTH_MODE", "HF_HOME", "HF_HUB_OFFLINE", "VLLM_CACHE_ROOT", *DETERMINISTIC_KEYS):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def check_local_devices(cluster: ClusterConfig) -> None:
    """ConfigError before a local Ray starts when this machine lacks the device the preset places actors on.

    Kept out of rlhf.config.validate, so a GPU preset validates anywhere (in CI, on a laptop before submitting)."""
    if cluster.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"cluster.device=cuda (cluster={cluster.name}), but torch sees no CUDA GPU on this machine and there is "
            "no cluster to join (cluster.address, RAY_ADDRESS); use cluster=cpu_debug, or run where the GPUs are"
        )


@contextmanager
def ray_session(cluster: ClusterConfig, *, deterministic: bool = False) -> Iterator[None]:
    """ray.init for this run (joining `cluster.address` or RAY_ADDRESS if set), shut down after.

    `deterministic` (run.deterministic): this process and every actor of the run use deterministic
    algorithms (rlhf.utils.seeding.deterministic_mode; docs/reliability.md says what that guarantees).
    """
    with deterministic_mode(deterministic, cluster.device):
        with _ray_session(cluster):
            yield


LOCAL_SYSTEM_CONFIG = {"_system_config": {"prestart_worker_first_driver": False}}
"""A cluster this run starts itself: no pool of idle task workers when the driver connects. Ray prestarts some
for tasks (two on a 2-core machine, measured with num_cpus=8), each a Python process importing Ray; a run starts
actors, each in a process of its own, so on a laptop or CI machine those workers only take CPU from their start-up."""


@dataclass
class _HeldSession:
    """A local Ray cluster this process started and keeps up between runs (`held_ray_session`)."""

    settings: Optional[tuple] = None
    """The settings it was started with (`_session_settings`); None while none is up."""


_held: Optional[_HeldSession] = None
"""Set inside `held_ray_session`: runs started there leave their cluster up for the next run."""


@contextmanager
def held_ray_session() -> Iterator[None]:
    """Runs of this process inside it share the Ray cluster the first one starts, shut down at the end.

    `rlhf` wraps a stage and its final evaluation in it, `rlhf-pipeline` its whole recipe: each
    `ray_session` of a run would otherwise start a local Ray and stop it (~4 s of start-up a time on
    2 cores, and the Ray processes' CPU). A run whose settings differ (cluster preset, device, resources,
    actor environment: run.deterministic) stops the held cluster and starts its own. Nested: the outer
    one holds. A cluster joined by address is never held; joining costs nothing to repeat. Only a CPU
    cluster is held: a stopped run's actors give their GPU memory back when their processes exit, which
    `ray.shutdown` waits for and the next run's engines (sized from the free memory) need.

    While a cluster is held, the runs reuse each other's worker processes (rlhf.utils.process_pool): a group
    shut down at the end of a stage hosts the next stage's group of the same shape (~6 s of imports saved per
    rank).
    """
    global _held
    if _held is not None:
        yield
        return
    _held = _HeldSession()
    try:
        yield
    finally:
        held, _held = _held, None
        if held.settings is not None:
            import ray

            from rlhf.utils.process_pool import PROCESS_POOL

            PROCESS_POOL.disable()
            ray.shutdown()


def _session_settings(cluster: ClusterConfig, env: dict[str, str]) -> tuple:
    """What a local cluster is started with; a held one serves a run only if they are equal."""
    return (cluster.num_cpus, cluster.num_gpus, tuple(sorted(env.items())))


@contextmanager
def _ray_session(cluster: ClusterConfig) -> Iterator[None]:
    import ray

    from rlhf.utils.process_pool import PROCESS_POOL

    env = runtime_env_vars(cluster)
    os.environ.update(env)
    for lock in clear_stale_build_locks(env["TORCH_EXTENSIONS_DIR"]):
        logger.warning("removed a stale DeepSpeed build lock left by a killed build: %s", lock)
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    settings = _session_settings(cluster, env)
    if _held is not None and _held.settings is not None and (address or _held.settings != settings):
        logger.info("stopping the Ray cluster of the previous run: this run needs another")
        PROCESS_POOL.disable()
        ray.shutdown()
        _held.settings = None
    started_here = not ray.is_initialized()
    if started_here:
        if not address:
            check_local_devices(cluster)
        kwargs = {} if address else {"num_cpus": cluster.num_cpus, "num_gpus": cluster.num_gpus, **LOCAL_SYSTEM_CONFIG}
        ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True, **kwargs)
        logger.info("ray cluster resources: %s", ray.cluster_resources())
    elif _held is not None and _held.settings == settings:
        logger.info("reusing the Ray cluster of the previous run of this process")
    hold = started_here and not address and _held is not None and cluster.device == "cpu"
    if hold:
        _held.settings = settings
    if _held is not None and _held.settings == settings:  # a held cluster: this run's groups may be reused
        if cluster.reuse_worker_processes:
            PROCESS_POOL.enable(max_cpus=ray.cluster_resources().get("CPU", 0.0))
        else:
            PROCESS_POOL.disable()
    try:
        yield
    finally:
        if started_here and not hold:
            ray.shutdown()
