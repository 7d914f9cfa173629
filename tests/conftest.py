"""Shared test set-up: CPU-mode environment, markers, one real Ray cluster per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before torch/deepspeed/vllm are imported anywhere in this process (see shared STACK notes).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RLHF_CACHE", str(Path.home() / ".cache" / "rlhf"))
from rlhf.utils.distributed import torch_extensions_dir  # noqa: E402 (after RLHF_CACHE, before torch)

os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test of the session (logical CPUs so all roles fit)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = tempfile.mkdtemp(prefix="rlhf-ray-")
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={
            "env_vars": {
                k: os.environ[k]
                for k in (
                    "DS_ACCELERATOR",
                    "RAY_AUTH_MODE",
                    "VLLM_ENABLE_V1_MULTIPROCESSING",
                    "VLLM_CPU_KVCACHE_SPACE",
                    "TOKENIZERS_PARALLELISM",
                    "TORCH_EXTENSIONS_DIR",
                    "RLHF_CACHE",
                )
            }
        },
    )
    yield ray
    ray.shutdown()
