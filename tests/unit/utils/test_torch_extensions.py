"""DeepSpeed's JIT cache: one directory per DeepSpeed installation, and stale build locks cleared."""

from __future__ import annotations

import os
import time

from rlhf.utils import distributed
from rlhf.utils.distributed import clear_stale_build_locks, deepspeed_location, torch_extensions_dir


def test_the_directory_is_keyed_by_the_deepspeed_installation(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    here = torch_extensions_dir()
    assert here.startswith(str(tmp_path / "torch_extensions")) and here != str(tmp_path / "torch_extensions")
    import deepspeed

    assert deepspeed_location() == os.path.dirname(os.path.realpath(deepspeed.__file__))
    # another venv with its own deepspeed: another directory; a venv layered on this one's packages: this one
    monkeypatch.setattr(distributed, "deepspeed_location", lambda: "/some/other/venv/site-packages/deepspeed")
    assert torch_extensions_dir() != here
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/explicit")
    assert torch_extensions_dir() == "/explicit"


def test_only_old_build_locks_are_removed(tmp_path):
    stale, fresh = tmp_path / "op_a" / "lock", tmp_path / "op_b" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()
