"""Worker tests share the session's real Ray cluster and the tiny checkpoint and batch fixtures of tests/conftest.py.

tests/conftest.py sets the environment before Ray starts (no token auth, DeepSpeed on CPU over gloo,
its JIT cache outside the repo: 35 s cold build of the shm op, then 0.4 s).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """The session's Ray cluster (tests/conftest.py ray_cluster: 16 logical CPUs, worker processes reused)."""
    yield ray_cluster
