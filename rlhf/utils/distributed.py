"""Process and node facts a distributed worker needs before torch.distributed starts.

The WorkerGroup sets the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) on every actor, plus the variables below that must exist before torch or DeepSpeed
is imported in the actor's process (thread counts, DeepSpeed's accelerator and JIT cache).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

DEVICES = ("cpu", "cuda")

TORCH_EXTENSIONS_DIR = str(Path("~/.cache/rlhf/torch_extensions").expanduser())
"""DeepSpeed's JIT-built ops live here, outside the repo: the first build takes ~35 s, later ones 0.4 s."""


def free_port() -> int:
    """A TCP port that is free on this node right now (the OS picks it; it may be taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


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


def torch_backend(device: str) -> str:
    """The torch.distributed backend for a device: gloo on CPU, NCCL on CUDA."""
    if device not in DEVICES:
        from rlhf.errors import ConfigError

        raise ConfigError(f"cluster.device must be one of {DEVICES}, got {device!r}")
    return "gloo" if device == "cpu" else "nccl"


def process_env(*, device: str, threads: int) -> dict[str, str]:
    """Variables every worker process needs before importing torch / DeepSpeed.

    OMP/MKL thread counts stop ranks sharing a node from oversubscribing its cores (10-100x
    slower steps on CPU otherwise); DS_ACCELERATOR picks DeepSpeed's CPU path (gloo) or CUDA.
    """
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": "cpu" if device == "cpu" else "cuda",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR),
        "TOKENIZERS_PARALLELISM": "false",
    }


def rank_env(*, rank: int, world_size: int, local_rank: int, local_world_size: int) -> dict[str, str]:
    """torchrun-style rank variables (MASTER_ADDR/PORT are added once rank 0 is up)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
    }
