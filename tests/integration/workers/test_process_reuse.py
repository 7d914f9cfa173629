"""Worker processes handed from one group to the next (rlhf.workers.host, rlhf.utils.process_pool), on the real
session cluster: what carries over (the process, its torch.distributed world) and what must not (the previous
worker's environment, random state, deterministic setting; a process after an error; a vLLM engine's)."""

from __future__ import annotations

import os
import sys

import pytest
import ray
import torch
import torch.distributed as dist

from rlhf.config import ResourceConfig
from rlhf.errors import WorkerError
from rlhf.utils.process_pool import PROCESS_POOL
from rlhf.workers.group import Worker, WorkerGroup, dispatch

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

pytestmark = pytest.mark.ray

RESOURCES = ResourceConfig(num_cpus=0.75)  # a shape no other test of the session uses


class InTheWorld(Worker):
    """Joins the group's torch.distributed world and sums its ranks over it."""

    @dispatch("broadcast", collect="list")
    def all_reduce_rank(self) -> float:
        self.setup_distributed("gloo", 60)
        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return value.item()


class LeavesTraces(InTheWorld):
    """Changes what a process-wide setting can change, so the next worker in its process can look for it."""

    def __init__(self) -> None:
        super().__init__()
        self.rng_at_start = torch.get_rng_state()

    @dispatch("broadcast", collect="list")
    def meddle(self) -> dict:
        os.environ["LEFT_BEHIND"] = "1"
        os.environ["RLHF_ROLE"] = "changed"
        torch.manual_seed(123)
        torch.use_deterministic_algorithms(True)
        torch.set_default_dtype(torch.float64)
        return {"pid": os.getpid(), "rng_at_start": self.rng_at_start}

    @dispatch("broadcast", collect="list")
    def fail(self) -> None:
        raise RuntimeError("this worker's process must not be handed on")


class LooksForTraces(InTheWorld):
    """Another class in the same processes: reports what it finds."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.rng_at_start = torch.get_rng_state()

    @dispatch("broadcast", collect="list")
    def look(self) -> dict:
        return {
            "pid": os.getpid(),
            "tag": self.tag,
            "role": os.environ["RLHF_ROLE"],
            "rank": int(os.environ["RANK"]),
            "left_behind": "LEFT_BEHIND" in os.environ,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "default_dtype": str(torch.get_default_dtype()),
            "rng_at_start": self.rng_at_start,
            "path_has_placeholder": "${PATH}" in os.environ["PATH"],
        }


class CannotBeCleaned(Worker):
    def release(self) -> bool:
        return False

    @dispatch("broadcast", collect="list")
    def pid(self) -> int:
        return os.getpid()


def group(worker_cls, role: str, *args, num_workers: int = 2) -> WorkerGroup:
    return WorkerGroup(worker_cls, role=role, num_workers=num_workers, resources=RESOURCES, init_args=args)


@pytest.fixture
def pool(ray_session):
    """The session's pool (tests/conftest.py turns reuse on), emptied before and after each test: under xdist a
    module's tests may run with other modules' tests between them."""
    assert PROCESS_POOL.enabled
    PROCESS_POOL.drain()
    yield PROCESS_POOL
    PROCESS_POOL.drain()


def test_next_group_of_the_shape_builds_in_the_same_clean_processes_and_world(pool):
    first = group(LeavesTraces, "first")
    assert first.call(LeavesTraces.all_reduce_rank) == [3.0, 3.0]  # ranks 1 + 2 over the group's world
    before = first.call(LeavesTraces.meddle)
    first.shutdown()
    assert len(pool.parked) == 1

    second = group(LooksForTraces, "second", "b")
    try:
        after = second.call(LooksForTraces.look)
        assert [a["pid"] for a in after] == [b["pid"] for b in before]  # no new process
        assert not pool.parked
        for rank, (old, new) in enumerate(zip(before, after)):
            assert new["tag"] == "b" and new["role"] == "second" and new["rank"] == rank
            assert not new["left_behind"] and not new["deterministic"] and not new["path_has_placeholder"]
            assert new["default_dtype"] == "torch.float32"
            assert torch.equal(new["rng_at_start"], old["rng_at_start"])  # the process's own start, not seed 123
        assert second.call(LooksForTraces.all_reduce_rank) == [3.0, 3.0]  # the world stands, same ranks
    finally:
        second.shutdown()
    assert len(pool.parked) == 1
    group(LooksForTraces, "untouched", "x").shutdown()  # rebuilt in them, no call made: parked again
    assert len(pool.parked) == 1

    # a group of another shape gets a process of its own; the two-rank one waits for a group of its shape
    single = group(LooksForTraces, "one", "c", num_workers=1)
    try:
        assert single.call(LooksForTraces.look)[0]["pid"] not in {b["pid"] for b in before}
        assert len(pool.parked) == 1
    finally:
        single.shutdown()
    assert len(pool.parked) == 2


def test_a_group_that_failed_or_cannot_be_cleaned_is_not_handed_on(pool):
    failed = group(LeavesTraces, "failed")
    failed.call(LeavesTraces.meddle)
    with pytest.raises(WorkerError, match="must not be handed on"):
        failed.call(LeavesTraces.fail)
    failed.shutdown()
    unclean = group(CannotBeCleaned, "unclean", num_workers=1)
    unclean.call(CannotBeCleaned.pid)
    unclean.shutdown()
    assert not pool.parked  # so no later group can get their processes


def test_parked_groups_make_room_for_a_placement_group_that_needs_it(pool):
    group(LooksForTraces, "parked", "a", num_workers=1).shutdown()
    assert len(pool.parked) == 1
    # a group that needs every free CPU and the parked group's: it gives them back instead of blocking it
    cpus = ray.available_resources()["CPU"] + pool.parked[0].cpus()
    everything = WorkerGroup(
        LooksForTraces, role="big", num_workers=2, resources=ResourceConfig(num_cpus=cpus / 2), init_args=("d",)
    )
    try:
        assert not pool.parked
        assert [a["tag"] for a in everything.call(LooksForTraces.look)] == ["d", "d"]
    finally:
        everything.shutdown()
