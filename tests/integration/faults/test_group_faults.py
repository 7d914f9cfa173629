"""WorkerGroup under faults, with cheap actors: a SIGKILLed rank is found and replaced exactly as it was
built; a rank that fails because its peer died is reported as the peer's death; the group's call
timeout bounds every wait."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import ray

from rlhf.config import ResourceConfig
from rlhf.errors import WorkerDiedError, WorkerError
from rlhf.workers.group import Worker, WorkerGroup, dispatch, wait_all

# Ray workers cannot import test modules: ship the worker classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.ray


class FragileWorker(Worker):
    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    @dispatch("broadcast", collect="list")
    def identity(self) -> tuple[str, int, str, str]:
        return self.tag, self.rank, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]

    @dispatch("broadcast", collect="list")
    def lose_peer(self, dying_rank: int) -> None:
        """The others fail at once, `dying_rank` exits hard a moment later: the victims' errors reach the
        driver before Ray reports the death, as when a collective's lost peer is noticed first."""
        if self.rank == dying_rank:
            time.sleep(1.0)
            os._exit(1)
        raise RuntimeError("connection closed by peer")

    @dispatch("broadcast", collect="list")
    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture
def group(ray_cluster):
    group = WorkerGroup(
        FragileWorker,
        role="fragile",
        num_workers=2,
        resources=ResourceConfig(num_cpus=0.25),
        init_args=("t",),
        call_timeout_s=60,
    )
    yield group
    group.shutdown()


def test_killed_rank_is_found_and_restarted_as_built(group):
    before = group.ping()
    os.kill(before[1]["pid"], signal.SIGKILL)
    assert group.dead_ranks(timeout=60) == [1]
    with pytest.raises(WorkerDiedError) as info:
        group.call(FragileWorker.identity)
    assert (info.value.role, info.value.rank) == ("fragile", 1)

    group.restart(1)
    after = group.ping()
    assert after[0]["pid"] == before[0]["pid"] and after[1]["pid"] != before[1]["pid"]
    # same constructor arguments, rank and rendezvous address as the original actor
    identities = group.call(FragileWorker.identity)
    assert [i[:2] for i in identities] == [("t", 0), ("t", 1)]
    assert identities[0][2:] == identities[1][2:]
    assert group.dead_ranks() == []


def test_peer_death_is_reported_instead_of_the_victims_error(group):
    with pytest.raises(WorkerDiedError) as info:
        group.call(FragileWorker.lose_peer, 1)
    assert (info.value.role, info.value.rank) == ("fragile", 1)
    assert "actor died during lose_peer" in str(info.value)
    assert "connection closed by peer" in str(info.value.__cause__)  # the victim's error is kept as the cause


def test_call_timeout_bounds_every_wait(ray_cluster):
    group = WorkerGroup(
        FragileWorker,
        role="slow",
        num_workers=1,
        resources=ResourceConfig(num_cpus=0.25),
        init_args=("s",),
        call_timeout_s=0.5,
    )
    try:
        with pytest.raises(WorkerError, match=r"slow ranks \[0\]: sleep did not finish within 0.5s"):
            group.call(FragileWorker.sleep, 5)
        other = WorkerGroup(
            FragileWorker, role="other", num_workers=1, resources=ResourceConfig(num_cpus=0.25), init_args=("o",)
        )
        try:  # two groups awaited together: the timeout names the ranks still running
            with pytest.raises(WorkerError, match=r"other ranks \[0\]"):
                wait_all([(group, group.run(FragileWorker.sleep, 0)), (other, other.run(FragileWorker.sleep, 3))], 1.0)
        finally:
            other.shutdown()
    finally:
        group.shutdown()
