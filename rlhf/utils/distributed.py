"""Process and node facts a distributed worker needs before torch.distributed starts.

The WorkerGroup sets the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) on every actor, plus the variables below that must exist before torch or DeepSpeed
is imported in the actor's process (thread counts, DeepSpeed's accelerator and JIT cache).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib
import importlib.util
import os
import random
import socket
import sys
import time
from pathlib import Path

DEVICES = ("cpu", "cuda")
MMAP_THRESHOLD_BYTES = 1 << 20
"""CPU ranks of a ZeRO-3 trained group: glibc's mmap threshold (`set_mmap_threshold`)."""
ZERO3_INFERENCE_MMAP_THRESHOLD_BYTES = 256 << 10
"""CPU ranks of a ZeRO-3 inference group (reference, reward model): see `set_mmap_threshold`."""
M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number (malloc.h)."""
DEEPSPEED_MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"
"""Imported uncompiled by `import_deepspeed` (`_import_muon_uncompiled`)."""
STALE_BUILD_LOCK_S = 900
"""A JIT build lock older than this is left over from a killed build (a CPU op builds in ~35 s)."""


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops live: outside the repo, one directory per DeepSpeed installation.

    $TORCH_EXTENSIONS_DIR wins when set. Otherwise <RLHF_CACHE>/torch_extensions/<hash of where deepspeed is
    installed>: an op builds against the torch and DeepSpeed headers beside it and its build flags name their
    paths, so two installations sharing one directory rebuild it for each other (and wait on each other's build
    locks). The venvs that scripts/setup_env.sh layers on one cached dependency venv share one installation, so a
    new clone reuses the ops. The first build takes ~35 s, later loads 0.4 s.
    """
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return configured
    cache = Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf").expanduser()
    env_key = hashlib.sha1(deepspeed_location().encode()).hexdigest()[:10]
    return str(cache / "torch_extensions" / env_key)


def deepspeed_location() -> str:
    """The real directory deepspeed is imported from (found, not imported), or sys.prefix without it."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or spec.origin is None:
        return sys.prefix
    return os.path.dirname(os.path.realpath(spec.origin))


def import_deepspeed(submodule: str = ""):  # -> a module (not annotated: importing deepspeed here defeats the point)
    """`import deepspeed` (or `deepspeed.<submodule>`), without the optional mlflow import of its autotuner,
    which we never run, and with its Muon module uncompiled (`_import_muon_uncompiled`). The library's only way
    to import deepspeed (tests/unit/test_layering.py checks it).

    With mlflow installed (the `tracking` extra) that import is 1.1 s of deepspeed's 1.4 s (measured on 2 cores),
    paid by every actor process that trains or shards a model. mlflow stays importable afterwards; a process
    that imported it already keeps it.
    """
    if "deepspeed" not in sys.modules:
        hide = "mlflow" not in sys.modules
        if hide:
            sys.modules["mlflow"] = None  # type: ignore[assignment]  # makes `import mlflow` raise ImportError
        try:
            import deepspeed  # noqa: F401
        finally:
            if hide and sys.modules.get("mlflow", False) is None:
                del sys.modules["mlflow"]
    if DEEPSPEED_MUON_MODULE not in sys.modules:  # also when something else imported deepspeed first
        _import_muon_uncompiled()
    return importlib.import_module(f"deepspeed.{submodule}" if submodule else "deepspeed")


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with its `torch.compile` decorators left off.

    Every ZeRO optimizer imports it when it is built, only to test `isinstance(optimizer, MuonWithAuxAdam)`;
    its module decorates three functions with torch.compile at import, which imports TorchDynamo and
    Inductor: 1.4-2.5 s of CPU in every process that trains or shards a model (measured on 2 cores),
    for an optimizer the framework never builds. The functions stay plain Python, correct if ever called.
    """
    import torch

    compile_ = torch.compile
    torch.compile = _no_compile  # type: ignore[assignment]
    try:
        importlib.import_module(DEEPSPEED_MUON_MODULE)
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        torch.compile = compile_


def _no_compile(model=None, **_options):
    """torch.compile's two call forms (`torch.compile(fn)`, `torch.compile(**options)(fn)`), returning fn as is."""
    return model if model is not None else (lambda fn: fn)


def clear_stale_build_locks(root: str | Path, max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove JIT build `lock` files older than `max_age_s`: torch waits on a lock forever, and a
    build killed mid-way (kill -9, OOM) never removes its own."""
    removed = []
    now = time.time()
    for lock in Path(root).glob("*/lock"):
        try:
            if now - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # another process cleared it first
            continue
    return removed


_RAY_WORKER_PORTS_END = 20000
"""Ray's worker ports end below this (`--max-worker-port` default 19999); the rendezvous ports start here."""


def free_port() -> int:
    """A TCP port that is free on this node right now, for a rendezvous (it may be taken later).

    Drawn at random below the kernel's ephemeral range and above Ray's worker ports: a port the OS
    hands out (bind to 0) is also what every outgoing connection (Ray's gRPC clients, gloo) gets, so
    one taken that way can be reused by a client in the seconds before the rendezvous binds it
    (seen as EADDRINUSE in CI).
    """
    low, _ = _ephemeral_range()
    draw = random.Random()  # not the global generator: seeded runs would draw the same port on every node
    for _ in range(200):
        port = draw.randrange(_RAY_WORKER_PORTS_END, low - 1)  # -1: tests use port + 1 as well
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # the low range is full: let the OS pick
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing ports (Linux default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        if int(low) > _RAY_WORKER_PORTS_END + 1000:
            return int(low), int(high)
    except (OSError, ValueError):
        pass
    return 32768, 60999


def node_ip() -> str:
    """This node's IP as other nodes of the Ray cluster reach it (127.0.0.1 without a network)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    try:
        # A UDP "connect" sends nothing; it only asks the kernel which interface routes outwards.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def node_id() -> str:
    """This process's node as placement sees it: Ray's node id inside Ray, else the hostname.

    Several Ray nodes can share one machine (a simulated cluster, containers with a shared /dev/shm);
    each is still its own node here, so same-node shortcuts (shared-memory weight sync) follow Ray's
    placement, not what the processes happen to share.
    """
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


def torch_backend(device: str) -> str:
    """The torch.distributed backend for a device: gloo on CPU, NCCL on CUDA."""
    if device not in DEVICES:
        from rlhf.errors import ConfigError

        raise ConfigError(f"cluster.device must be one of {DEVICES}, got {device!r}")
    return "gloo" if device == "cpu" else "nccl"


def process_env(*, device: str, threads: int) -> dict[str, str]:
    """Variables every worker process needs before importing torch / DeepSpeed (and before its first JIT build:
    PATH, see `interpreter_bin_first`).

    OMP/MKL thread counts stop ranks sharing a node from oversubscribing its cores (10-100x
    slower steps on CPU otherwise); DS_ACCELERATOR picks DeepSpeed's CPU path (gloo) or CUDA.
    glibc's malloc keeps its adaptive default here: ZeRO-3 ranks on CPU lower its mmap threshold
    themselves (`set_mmap_threshold`), since every mapping costs page faults when touched.
    """
    return {
        "PATH": interpreter_bin_first(),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": "cpu" if device == "cpu" else "cuda",
        "TORCH_EXTENSIONS_DIR": torch_extensions_dir(),
        "TOKENIZERS_PARALLELISM": "false",
    }


def interpreter_bin_first(path: str = "${PATH}") -> str:
    """`path` (by default Ray's placeholder for the worker's own PATH) with this interpreter's bin directory first.

    DeepSpeed's JIT builds run the `ninja` found on PATH. The environment ships one (requirements/cpu.lock) and a
    machine may have another: a process started as `.venv/bin/python` without the venv activated finds the
    system's. Two ninja versions hash a build's commands differently, so each rebuilds what the other built:
    measured, DeepSpeed's shm op was compiled afresh (40 s of CPU) whenever jobs launched with and without the
    venv on PATH took turns on one cache. Workers and tests therefore always take the environment's tools.
    """
    return f"{Path(sys.executable).parent}{os.pathsep}{path}"


def set_mmap_threshold(nbytes: int) -> bool:
    """From now on, glibc maps every allocation of `nbytes` or more on its own and unmaps it when freed
    (mallopt M_MMAP_THRESHOLD); False where the C library has no mallopt (not glibc).

    ZeRO-3 ranks on CPU call it before they load their partition: with glibc's adaptive default the
    buffers that ZeRO-3 gathers and frees a module at a time stay in a fragmented heap, and a rank's
    resident memory creeps towards the whole model it partitions (benchmarks/memory.py). Trained ranks
    use 1 MiB (MMAP_THRESHOLD_BYTES); inference ranks 256 KiB: at 1 MiB the activations and half-megabyte
    partitions of each module's pass left 80 MiB of free heap per rank of a 2-rank 294M reference group
    (peak - baseline 734 -> 666 MiB; its forward passes as fast).
    Not for every worker: each mapping costs page faults when it is touched. Every CPU worker had 1 MiB
    until 2026-12-07: the ~25M policy's update (64 sequences × 74 tokens, one thread, the same TrainEngine
    and loss in one process) took 14.7-15.5 s at 1 MiB against 11.0-11.5 s with the default; at 256 KiB
    the SFT -> DPO recipe test took 110 s against 98 s.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def rank_env(*, rank: int, world_size: int, local_rank: int, local_world_size: int) -> dict[str, str]:
    """torchrun-style rank variables (MASTER_ADDR/PORT are added once rank 0 is up)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
    }
