"""WeightSyncGroup between two plain processes over gloo: exact round trips, buckets, timeouts."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

import pytest
import torch

from rlhf.engines.weight_sync import WeightSyncGroup, free_port
from rlhf.errors import WeightSyncError

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 60.0  # covers the child's torch import on a busy 2-core machine


def _named_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    """40 small tensors of mixed dtype around one 1 MiB tensor (bigger than the test's buckets)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for i in range(40):
        dtype = torch.bfloat16 if i % 3 == 0 else torch.float32
        shape = (i % 5 + 1, 7) if i % 2 else (i + 1,)
        tensors.append((f"layers.{i}.weight", torch.randn(shape, generator=gen).to(dtype)))
        if i == 20:
            tensors.append(("embed.weight", torch.randn(512, 512, generator=gen)))  # 1 MiB of fp32
    tensors.append(("scalar", torch.tensor(3.5)))
    return tensors


def _through_one_buffer(tensors: list[tuple[str, torch.Tensor]]):
    """Yield each tensor as a view of one scratch buffer that the next tensor overwrites, as a released
    ZeRO-3 bucket is reused: a sender that kept a reference instead of copying at once would send garbage."""
    scratch = torch.empty(max(t.numel() * t.element_size() for _, t in tensors), dtype=torch.uint8)
    for name, tensor in tensors:
        view = scratch[: tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        yield name, view
        scratch.fill_(255)  # NaN in every float dtype


def _receiver(port: int, rounds: int, results: mp.Queue) -> None:
    try:
        group = WeightSyncGroup.create(
            "127.0.0.1", port, rank=1, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S
        )
        for seed in range(rounds):
            expected = dict(_named_tensors(seed))
            received = list(group.receive())
            mismatched = [
                name
                for name, t in received
                if t.dtype != expected[name].dtype
                or t.shape != expected[name].shape
                or not torch.equal(t, expected[name])
            ]
            results.put(
                ("round", sorted(n for n, _ in received) == sorted(expected), mismatched, group.last_stats.num_buckets)
            )
        # The sender stops sending: the next receive must fail fast with our error, not hang.
        group.timeout_s = 1.0
        try:
            list(group.receive())
            results.put(("timeout", None))
        except WeightSyncError as e:
            results.put(("timeout", str(e)))
        group.close()
    except Exception as e:  # report, so the test fails with the child's error instead of hanging
        results.put(("error", repr(e)))


def _receive_once(port: int, results: mp.Queue) -> None:
    """Receive one stream; report its payload bytes, or the error message."""
    group = WeightSyncGroup.create("127.0.0.1", port, rank=1, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S)
    try:
        results.put(sum(t.numel() * t.element_size() for _, t in group.receive()))
    except WeightSyncError as e:
        results.put(str(e))
    group.close()


def _start(target, *args) -> tuple[mp.Process, mp.Queue]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results), daemon=True)
    proc.start()
    return proc, results


def test_round_trip_is_exact_across_buckets_and_dtypes():
    port = free_port()
    proc, results = _start(_receiver, port, 2)
    group = WeightSyncGroup.create("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S)
    try:
        for seed in range(2):  # two rounds on one group: the handshake counter advances on both sides
            stats = group.send(_through_one_buffer(_named_tensors(seed)), bucket_bytes=64 * 1024)
            kind, names_match, mismatched, receiver_buckets = results.get(timeout=60)
            assert kind == "round"
            assert names_match and mismatched == []
            assert stats.num_tensors == 42
            # a bucket closes at each dtype change; the 1 MiB tensor travels alone
            assert stats.num_buckets == receiver_buckets >= 3
        kind, message = results.get(timeout=60)
        assert kind == "timeout" and message is not None and "rank 0 to start sending" in message
    finally:
        group.close()
        proc.join(timeout=30)
    assert proc.exitcode == 0


def test_each_bucket_holds_one_dtype_and_big_tensors_travel_alone():
    port = free_port()
    proc, results = _start(_receive_once, port)
    group = WeightSyncGroup.create("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S)
    tensors = [
        ("a", torch.zeros(10)),  # fp32 bucket 1
        ("b", torch.zeros(10, dtype=torch.bfloat16)),  # another dtype: closes bucket 1, opens a bf16 one
        ("big", torch.zeros(1000)),  # closes the bf16 bucket; 4000 B > 1024 B: travels alone
        ("c", torch.zeros(10)),  # closes "big"; fp32 bucket 4
    ]
    try:
        stats = group.send(tensors, bucket_bytes=1024)
        assert results.get(timeout=60) == 40 + 20 + 4000 + 40
        assert (stats.num_buckets, stats.num_tensors, stats.num_bytes) == (4, 4, 4100)
    finally:
        group.close()
        proc.join(timeout=30)


def test_a_failing_producer_aborts_the_receivers_at_once():
    def tensors():
        yield "w0", torch.zeros(300)
        yield "w1", torch.zeros(300)  # closes the first 1 KiB bucket, which is sent
        raise RuntimeError("ZeRO gather failed")

    port = free_port()
    proc, results = _start(_receive_once, port)
    group = WeightSyncGroup.create("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S)
    try:
        with pytest.raises(RuntimeError, match="ZeRO gather failed"):
            group.send(tensors(), bucket_bytes=1024)
        assert "rank 0 aborted the stream after 1 tensors" in results.get(timeout=30)  # not after the 60 s timeout
    finally:
        group.close()
        proc.join(timeout=30)


def test_join_times_out_when_the_peer_never_comes():
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="could not join within 1s"):
        WeightSyncGroup.create("127.0.0.1", free_port(), rank=0, world_size=2, backend="gloo", timeout_s=1.0)
    assert time.monotonic() - start < 30


def test_send_times_out_when_no_engine_receives():
    port = free_port()
    ctx = mp.get_context("spawn")
    # A receiver that joins and then never calls receive().
    proc = ctx.Process(target=_join_and_sleep, args=(port,), daemon=True)
    proc.start()
    group = WeightSyncGroup.create("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S)
    group.timeout_s = 1.0
    try:
        with pytest.raises(WeightSyncError, match="only 0 of 1 engines called receive"):
            group.send([("w", torch.zeros(3))], bucket_bytes=1024)
    finally:
        group.close()
        proc.terminate()
        proc.join(timeout=30)


def _join_and_sleep(port: int) -> None:
    group = WeightSyncGroup.create("127.0.0.1", port, rank=1, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S)
    time.sleep(60)
    group.close()


def test_bad_arguments_raise_our_error():
    with pytest.raises(WeightSyncError, match="not supported"):
        WeightSyncGroup.create("127.0.0.1", free_port(), rank=0, world_size=2, backend="mpi")
    with pytest.raises(WeightSyncError, match="outside 0..1"):
        WeightSyncGroup.create("127.0.0.1", free_port(), rank=2, world_size=2)


def test_bandwidth_is_measured(record_property):
    """128 MiB of fp32 in 32 MiB buckets over localhost gloo; logged, not asserted."""
    port = free_port()
    proc, results = _start(_receive_once, port)
    group = WeightSyncGroup.create("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S)
    tensors = [(f"w{i}", torch.randn(1024, 1024)) for i in range(32)]
    try:
        stats = group.send(tensors, bucket_bytes=32 << 20)
        assert results.get(timeout=120) == 128 << 20
    finally:
        group.close()
        proc.join(timeout=30)
    logger.info(
        "weight sync gloo localhost: %.0f MiB in %.3fs = %.2f GiB/s",
        stats.num_bytes / 2**20,
        stats.seconds,
        stats.gib_per_s,
    )
    record_property("weight_sync_gib_per_s", round(stats.gib_per_s, 3))


@pytest.mark.gpu
def test_nccl_group_builds_and_packs_cuda_buckets():
    """One rank only: a single GPU cannot hold two NCCL ranks, but this runs the NCCL code path."""
    group = WeightSyncGroup.create("127.0.0.1", free_port(), rank=0, world_size=1, backend="nccl", timeout_s=60)
    try:
        stats = group.send([(n, t.cuda()) for n, t in _named_tensors(0)], bucket_bytes=64 * 1024)
        assert group.device.type == "cuda"
        assert (stats.num_tensors, stats.num_buckets) == (42, 4)
    finally:
        group.close()


@pytest.mark.gpu
def test_gloo_sender_with_cuda_tensors():
    """A GPU trainer on the gloo transport: buckets are packed on the CPU from CUDA tensors."""
    port = free_port()
    proc, results = _start(_receiver, port, 1)
    group = WeightSyncGroup.create("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=_JOIN_TIMEOUT_S)
    try:
        group.send([(n, t.cuda()) for n, t in _named_tensors(0)], bucket_bytes=64 * 1024)
        kind, names_match, mismatched, _ = results.get(timeout=60)
        assert kind == "round" and names_match and mismatched == []
        assert results.get(timeout=60)[0] == "timeout"
    finally:
        group.close()
        proc.join(timeout=30)
