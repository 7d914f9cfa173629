"""WorkerGroup on a real Ray cluster: dispatch modes, shard shapes, rank env, placement, failures.

The workers here are light (no model), so these tests take a few seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from rlhf.config import ClusterConfig, ResourceConfig
from rlhf.data.batch import RolloutBatch
from rlhf.errors import ConfigError, WorkerError
from rlhf.trainers.roles import PLACEMENT_FILE, check_shared_output_dir, start_group, write_placement
from rlhf.workers.group import Worker, WorkerGroup, create_placement_group, dispatch

# Ray workers cannot import test modules: ship the worker classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.ray

ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "RLHF_TEST_FLAG",
    "PATH",
)


class EchoWorker(Worker):
    def __init__(self, tag: str):
        super().__init__()
        if tag == "explode":
            raise RuntimeError("constructor exploded")
        self.tag = tag

    @dispatch("broadcast", collect="list")
    def env(self) -> dict[str, str]:
        return {k: os.environ.get(k, "") for k in ENV_KEYS}

    @dispatch("broadcast", collect="list")
    def echo(self, value):
        return (self.rank, self.tag, value)

    @dispatch("split_dp", collect="concat")
    def shard_rows(self, batch: RolloutBatch, offset: int) -> torch.Tensor:
        # rows this rank received, shifted by a broadcast scalar
        return batch.prompt_ids[:, -1:] + offset

    @dispatch("split_dp", collect="list")
    def shard_sizes(self, batch: RolloutBatch, values: torch.Tensor, items: list) -> tuple[int, int, list]:
        return len(batch), values.shape[0], items

    @dispatch("rank0", collect="first")
    def only_rank0(self) -> int:
        return self.rank

    @dispatch("all", collect="list")
    def per_rank(self, value: int) -> int:
        return value * 10 + self.rank

    @dispatch("split_dp", collect="mean")
    def stats(self, batch: RolloutBatch) -> dict[str, float]:
        return {"echo/rows": float(len(batch)), "echo/rank": float(self.rank)}

    @dispatch("broadcast", collect="first")
    def fail_on(self, rank: int) -> str:
        if self.rank == rank:
            raise ValueError(f"boom from rank {self.rank}")
        return "ok"

    @dispatch("broadcast", collect="list")
    def die_on(self, rank: int) -> None:
        if self.rank == rank:
            os._exit(3)

    @dispatch("broadcast", collect="list")
    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def undeclared(self) -> None:
        """No @dispatch: run() must refuse it."""


class DeterminismProbe(Worker):
    @dispatch("broadcast", collect="list")
    def deterministic(self) -> tuple[bool, bool]:
        return self.deterministic, torch.are_deterministic_algorithms_enabled()


class OtherWorker(Worker):
    @dispatch("broadcast", collect="list")
    def echo(self, value):
        return value


class NodeLocalDiskWorker(EchoWorker):
    """A rank on a node that does not mount the driver's storage: every path resolves in a tree of its own."""

    @dispatch("broadcast", collect="list")
    def read_text(self, path: str):
        return super().read_text(f"/nonexistent-node-local-disk{path}")


def _rows(n: int) -> RolloutBatch:
    ids = torch.arange(n).unsqueeze(1).repeat(1, 2)
    ones = torch.ones(n, 2, dtype=torch.long)
    return RolloutBatch(prompt_ids=ids, prompt_mask=ones, response_ids=ids, response_mask=ones)


@pytest.fixture(scope="module")
def echo_group(ray_session):
    group = WorkerGroup(
        EchoWorker,
        role="echo",
        num_workers=3,
        resources=ResourceConfig(num_cpus=0.25),
        init_args=("t",),
        env_vars={"RLHF_TEST_FLAG": "1"},
    )
    yield group
    group.shutdown()


def test_a_role_can_take_more_threads_than_the_cluster_default(ray_session):
    """cluster.<role>.threads (one_step_off's policy on CPU takes both cores once the engines are done)."""
    group = start_group(ClusterConfig(), EchoWorker, "echo", 1, ResourceConfig(num_cpus=0.25, threads=2), tag="t")
    try:
        assert [e["OMP_NUM_THREADS"] for e in group.call(EchoWorker.env)] == ["2"]
    finally:
        group.shutdown()


def test_rank_env_is_set_before_methods_run(echo_group):
    envs = echo_group.call(EchoWorker.env)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2"]  # one node
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1 and envs[0]["MASTER_PORT"].isdigit()
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"1"} and {e["DS_ACCELERATOR"] for e in envs} == {"cpu"}
    assert envs[0]["TORCH_EXTENSIONS_DIR"] and {e["RLHF_TEST_FLAG"] for e in envs} == {"1"}
    # the environment's tools (its ninja, for DeepSpeed's JIT builds) first, then the worker's own PATH
    path = envs[0]["PATH"].split(os.pathsep)
    assert path[0] == str(Path(sys.executable).parent) and "${PATH}" not in path
    assert set(os.environ["PATH"].split(os.pathsep)) <= set(path)  # the cluster's PATH (this process's) kept


def test_broadcast_rank0_all_and_mean(echo_group):
    pending = echo_group.run(EchoWorker.echo, {"x": 1})  # futures; nothing blocks yet
    assert len(pending.refs) == 3
    assert echo_group.wait(pending) == [(0, "t", {"x": 1}), (1, "t", {"x": 1}), (2, "t", {"x": 1})]
    assert echo_group.call(EchoWorker.only_rank0) == 0
    assert echo_group.call(EchoWorker.per_rank, [1, 2, 3]) == [10, 21, 32]
    assert echo_group.call(EchoWorker.stats, _rows(6)) == {"echo/rows": 2.0, "echo/rank": 1.0}
    assert [p["rank"] for p in echo_group.ping()] == [0, 1, 2]


def test_split_dp_sends_equal_shards_and_concat_restores_order(echo_group):
    assert echo_group.call(EchoWorker.shard_rows, _rows(6), 100).squeeze(1).tolist() == [100, 101, 102, 103, 104, 105]
    sizes = echo_group.call(EchoWorker.shard_sizes, _rows(9), torch.zeros(9, 4), list(range(9)))
    assert sizes == [(3, 3, [0, 1, 2]), (3, 3, [3, 4, 5]), (3, 3, [6, 7, 8])]
    with pytest.raises(ConfigError, match="10 rows cannot be split into 3"):
        echo_group.run(EchoWorker.shard_rows, _rows(10), 0)


def test_run_takes_declared_methods_of_this_worker_class_only(echo_group):
    with pytest.raises(TypeError, match="not a method of EchoWorker"):
        echo_group.run(OtherWorker.echo, 1)
    with pytest.raises(TypeError, match="no @dispatch"):
        echo_group.run(EchoWorker.undeclared)


def test_remote_exception_names_role_rank_and_traceback(echo_group):
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        echo_group.call(EchoWorker.fail_on, 1, timeout=60)
    err = info.value
    assert err.actor == "echo rank 1"
    assert "fail_on raised ValueError: boom from rank 1" in str(err)
    assert "fail_on" in err.remote_traceback and "boom from rank 1" in err.remote_traceback
    assert time.monotonic() - start < 30
    assert echo_group.call(EchoWorker.fail_on, -1) == "ok"  # the group is still usable


def test_timeout_raises_instead_of_hanging(echo_group):
    with pytest.raises(WorkerError, match="did not finish within 0.3s"):
        echo_group.call(EchoWorker.sleep, 1.5, timeout=0.3)
    echo_group.call(EchoWorker.sleep, 0.0, timeout=30)  # drain: the sleeps finish, the group answers again


def test_dead_actor_becomes_worker_error(ray_session):
    group = WorkerGroup(
        EchoWorker, role="doomed", num_workers=2, resources=ResourceConfig(num_cpus=0.25), init_args=("d",)
    )
    try:
        with pytest.raises(WorkerError) as info:
            group.call(EchoWorker.die_on, 1, timeout=60)
        assert info.value.actor == "doomed rank 1" and "died" in str(info.value)
        with pytest.raises(WorkerError, match="doomed rank 1"):
            group.ping(timeout=30)
    finally:
        group.shutdown()


@pytest.mark.parametrize("wait_ready", [True, False], ids=["waiting", "side-by-side"])
def test_constructor_failure_is_reported(ray_session, wait_ready):
    """A constructor's error is a WorkerError naming the rank: from WorkerGroup(...) itself, or with
    wait_ready=False (how the controllers start their roles, side by side) from the first call, the group shut down."""
    started: list[WorkerGroup] = []
    with pytest.raises(WorkerError, match="broken rank 0") as info:
        started.append(
            WorkerGroup(
                EchoWorker,
                role="broken",
                num_workers=2,
                resources=ResourceConfig(num_cpus=0.25),
                init_args=("explode",),
                wait_ready=wait_ready,
            )
        )
        started[0].call(EchoWorker.echo, 0)
    assert "constructor exploded" in str(info.value)
    assert len(started) == (0 if wait_ready else 1)
    assert all(group.placement_group is None for group in started)  # shut down: the placement group is gone


@pytest.mark.parametrize("strategy", ["PACK", "STRICT_PACK", "SPREAD"])
def test_placement_strategies_create_groups(ray_session, strategy):
    from ray.util.placement_group import placement_group_table, remove_placement_group

    pg = create_placement_group([{"CPU": 0.5}] * 2, strategy, timeout_s=30, name=f"pg-{strategy}")
    try:
        table = placement_group_table(pg)
        assert table["strategy"] == strategy and table["state"] == "CREATED"
        assert len(table["bundles"]) == 2
    finally:
        remove_placement_group(pg)


def test_roles_share_bundles_of_one_placement_group(ray_session):
    # two roles colocated on one bundle with fractional CPUs (0.5 + 0.5 = the bundle's 1 CPU)
    from ray.util.placement_group import remove_placement_group

    pg = create_placement_group([{"CPU": 1.0}], "PACK", timeout_s=30, name="shared")
    groups = []
    try:
        for role in ("a", "b"):
            groups.append(
                WorkerGroup(
                    EchoWorker,
                    role=role,
                    num_workers=1,
                    resources=ResourceConfig(num_cpus=0.5),
                    init_args=(role,),
                    placement_group=pg,
                    bundle_indices=[0],
                )
            )
        assert [g.call(EchoWorker.echo, 0)[0][1] for g in groups] == ["a", "b"]
    finally:
        for group in groups:
            group.shutdown()
        remove_placement_group(pg)


def test_unplaceable_group_fails_fast(ray_session):
    with pytest.raises(WorkerError, match="could not be placed"):
        create_placement_group([{"CPU": 64.0}], "PACK", timeout_s=2, name="too-big")


def test_output_dir_must_be_seen_by_every_trained_rank_and_placement_is_recorded(echo_group, tmp_path):
    out = tmp_path / "run"
    check_shared_output_dir(out, {"policy": echo_group, "critic": None})  # one node: every rank sees it
    assert list(out.iterdir()) == []  # the marker is gone again
    blind = WorkerGroup(NodeLocalDiskWorker, role="critic", num_workers=1, resources=ResourceConfig(num_cpus=0.25),
                        init_args=("b",))  # fmt: skip
    try:
        with pytest.raises(ConfigError) as error:
            check_shared_output_dir(out, {"policy": echo_group, "critic": blind})
        message = str(error.value)
        assert f"run.output_dir {out} is not on a filesystem every node sees: critic rank 0 (node " in message
        assert "policy" not in message.split("cannot read")[0] and "shared storage" in message
        assert list(out.iterdir()) == []

        layout = write_placement(out, {"echo": echo_group, "critic": blind}, {"transport": "shm", "backend": "gloo"})
    finally:
        blind.shutdown()
    assert json.loads((out / PLACEMENT_FILE).read_text()) == layout
    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"]]  # the session cluster is one node
    assert layout["driver_node_id"] == node and set(layout["nodes"]) == {node}
    assert [(r["rank"], r["node_id"]) for r in layout["roles"]["echo"]] == [(0, node), (1, node), (2, node)]
    assert [r["rank"] for r in layout["roles"]["critic"]] == [0] and layout["weight_sync"]["transport"] == "shm"


def test_run_deterministic_switches_every_actor_it_starts(ray_session):
    """run.deterministic, as the CLI passes it to the run's Ray session, reaches the actors the run starts."""
    from rlhf.config import ClusterConfig
    from rlhf.trainers.roles import start_group
    from rlhf.utils.ray_session import ray_session as run_session

    cluster = ClusterConfig()
    resources = ResourceConfig(num_cpus=0.25)
    for deterministic in (True, False):
        with run_session(cluster, deterministic=deterministic):
            group = start_group(cluster, DeterminismProbe, f"probe-{deterministic}", 1, resources)
        try:
            assert group.call(DeterminismProbe.deterministic) == [(deterministic, deterministic)]
        finally:
            group.shutdown()
