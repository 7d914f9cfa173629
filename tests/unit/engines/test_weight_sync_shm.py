"""Shared-memory weight sync: the segment writer/reader in one process, then WeightSyncGroup across processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.engines import shm_sync, weight_sync
from rlhf.engines.shm_sync import ALIGN, PREFIX, SegmentBuckets, ShmSegment, read_bucket, remove_stale
from rlhf.engines.weight_sync import ParallelCopy, SyncStats, WeightSyncGroup, _split_lanes, free_port, pack_buckets
from rlhf.errors import WeightSyncError

_JOIN_TIMEOUT_S = 60.0  # covers the child's torch import on a busy 2-core machine
# Every process here is on one node. Named explicitly: `node_id()` is Ray's node id in a process where an
# earlier test started Ray (this one) and the hostname in a fresh child, which would look like two nodes.
_NODE = "this-machine"


def _mixed_buckets() -> list[list[tuple[str, torch.Tensor]]]:
    """One bucket per dtype, with the shapes that break naive packing: 0-d, empty, non-contiguous, odd sizes."""
    gen = torch.Generator().manual_seed(0)
    return [
        [("f32.a", torch.randn(3, 5, generator=gen)), ("f32.t", torch.randn(4, 6, generator=gen).t())],
        [("bf16.a", torch.randn(7, generator=gen).bfloat16()), ("bf16.scalar", torch.tensor(1.5).bfloat16())],
        [("f16.a", torch.randn(2, 3, 3, generator=gen).half()), ("f16.empty", torch.empty(0, 4).half())],
        [("i64.a", torch.randint(-(2**40), 2**40, (5,), generator=gen))],
        [("bool.a", torch.rand(9, generator=gen) > 0.5)],
        [("u8.a", torch.randint(0, 256, (13,), generator=gen, dtype=torch.uint8))],
    ]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _write_stream(
    segment: ShmSegment,
    tensors: list[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    group_size: int = 1,
    copy: ParallelCopy | None = None,
) -> list[dict]:
    """The sender's streaming write (pack_buckets into the segment, `group_size` tensors per producer
    list); the published bucket headers."""
    headers: list[dict] = []
    groups = [tensors[i : i + group_size] for i in range(0, len(tensors), group_size)]
    pack_buckets(groups, bucket_bytes, SegmentBuckets(segment, headers.append), SyncStats(), copy)
    return headers


def test_segment_round_trip_is_byte_exact_for_mixed_dtypes_and_grows(tmp_path):
    writer = ShmSegment.create(ALIGN, str(tmp_path))  # one page: the stream grows it
    reader = ShmSegment.open(writer.path, writer.token)
    writer.unlink()
    assert list(tmp_path.iterdir()) == []  # the name is gone, the memory is not
    tensors = [t for bucket in _mixed_buckets() for t in bucket]
    tensors.append(("big", torch.arange(3 * ALIGN, dtype=torch.float32)))
    headers = _write_stream(writer, tensors, bucket_bytes=1024)
    assert [len(h["entries"]) for h in headers] == [len(b) for b in _mixed_buckets()] + [1]  # one dtype each
    assert all(h["offset"] % ALIGN == 0 for h in headers)
    assert writer.size >= headers[-1]["offset"] + 3 * ALIGN * 4 > ALIGN
    received = [view for header in headers for view in read_bucket(reader, header)]
    assert [n for n, _ in received] == [n for n, _ in tensors]
    for (_, got), (_, sent) in zip(received, tensors):
        assert _same_bytes(got, sent)
        assert got.data_ptr() % shm_sync.TENSOR_ALIGN == 0  # an engine may adopt it as a weight
    # zero-copy: the reader's views see the writer's next stream in place
    view = read_bucket(reader, headers[0])[0][1]
    _write_stream(writer, [("f32.a", torch.full((3, 5), 7.0))], bucket_bytes=1024)
    assert torch.equal(view, torch.full((3, 5), 7.0))
    writer.close()
    reader.close()


def test_lists_copied_on_several_threads_carry_every_tensor_exactly(tmp_path, monkeypatch):
    # lanes of a few hundred bytes, so that 3 threads split the small tensors too, mid-tensor
    monkeypatch.setattr(ParallelCopy, "MIN_LANE_BYTES", 64)
    tensors = [t for bucket in _mixed_buckets() for t in bucket]
    tensors += [("big", torch.arange(3 * ALIGN, dtype=torch.float32)), ("big.t", torch.randn(40, 30).t())]
    one_by_one = ShmSegment.create(ALIGN, str(tmp_path))
    expected = _write_stream(one_by_one, tensors, bucket_bytes=1024)
    parallel = ShmSegment.create(ALIGN, str(tmp_path))
    copy = ParallelCopy(3)
    for group_size in (1, 3, len(tensors)):
        headers = _write_stream(parallel, tensors, bucket_bytes=1024, group_size=group_size, copy=copy)
        if group_size == 1:
            assert headers == expected  # lists of one: the stream's order and layout
        # a longer list is placed in its sources' memory order: the same tensors, found by name
        received = {name: view for header in headers for name, view in read_bucket(parallel, header)}
        assert sorted(received) == sorted(name for name, _ in tensors)
        for name, sent in tensors:
            assert _same_bytes(received[name], sent), name
            assert received[name].data_ptr() % shm_sync.TENSOR_ALIGN == 0
    copy.close()
    for segment in (one_by_one, parallel):
        segment.close()


def test_a_list_is_placed_in_its_sources_order_so_its_copies_merge(tmp_path):
    # one flat buffer, handed out in another order (as a module's order interleaves DeepSpeed's
    # weight-decay and no-decay groups): the segment follows the buffer, and the copy is one run
    flat = torch.arange(4 * 64, dtype=torch.float32)
    parts = [("c", flat[128:192]), ("a", flat[0:64]), ("d", flat[192:256]), ("b", flat[64:128])]
    segment = ShmSegment.create(ALIGN, str(tmp_path))
    runs = []

    class Recording(ParallelCopy):
        def __call__(self, jobs):
            runs.append(len(weight_sync._coalesce(jobs)))
            super().__call__(jobs)

    headers = _write_stream(segment, parts, bucket_bytes=1 << 20, group_size=len(parts), copy=Recording(1))
    assert [entry[0] for entry in headers[0]["entries"]] == ["a", "b", "c", "d"]
    assert [r for r in runs if r] == [1]  # one copy (the emit after it has nothing left)
    assert torch.equal(read_bucket(segment, headers[0])[0][1], flat[:64])
    segment.close()


def test_lanes_cover_every_element_once_in_order_with_equal_bytes():
    contiguous = [(torch.empty(n), torch.arange(n, dtype=torch.float32)) for n in (1000, 7, 2500, 1)]
    transposed = (torch.empty(30, 20), torch.randn(20, 30).t())  # not splittable: goes whole
    jobs = contiguous[:2] + [transposed] + contiguous[2:]
    total = sum(src.numel() * 4 for _, src in jobs)
    lanes = _split_lanes(jobs, 3, total)
    assert len(lanes) == 3
    pieces = [piece for lane in lanes for piece in lane]
    # in order: each job is one piece, or (contiguous) consecutive flat pieces of it back to back
    i = 0
    for dst, src in jobs:
        if not src.is_contiguous():
            assert pieces[i][0] is dst and pieces[i][1] is src
            i += 1
            continue
        covered = 0
        while covered < src.numel():
            d, s = pieces[i]
            assert d.data_ptr() == dst.data_ptr() + covered * 4
            assert torch.equal(s, src.reshape(-1)[covered : covered + s.numel()])
            covered += s.numel()
            i += 1
        assert covered == src.numel()
    assert i == len(pieces)
    share = -(-total // 3)
    sizes = [sum(s.numel() * 4 for _, s in lane) for lane in lanes]
    assert sum(sizes) == total
    assert all(size <= share + 600 * 4 for size in sizes)  # over by at most the unsplittable job


def test_a_full_tmpfs_fails_at_create_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_sync.os, "posix_fallocate", no_space)
    with pytest.raises(WeightSyncError, match="weight_sync_transport=collective"):
        ShmSegment.create(1 << 30, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_stale_segments_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"{PREFIX}{dead_pid}-0123456789abcdef"
    live = tmp_path / f"{PREFIX}{os.getpid()}-0123456789abcdef"
    other = tmp_path / "someone-elses-file"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert remove_stale(str(tmp_path)) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


# -- WeightSyncGroup over shared memory, across processes ------------------------------------


def _tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes in several 1 KiB buckets, plus one tensor bigger than a bucket."""
    tensors = [t for bucket in _mixed_buckets() for t in bucket]
    gen = torch.Generator().manual_seed(seed)
    tensors += [(f"layers.{i}.weight", torch.randn(40 + i, generator=gen)) for i in range(20)]
    tensors.append(("embed.weight", torch.randn(64, 64, generator=gen)))  # 16 KiB: grows the segment
    return tensors


def _receiver(port: int, rank: int, world_size: int, shm_dir: str, rounds: int, results: mp.Queue) -> None:
    try:
        group = WeightSyncGroup.create(
            "127.0.0.1", port, rank=rank, world_size=world_size, timeout_s=_JOIN_TIMEOUT_S, shm_dir=shm_dir,
            node=_NODE,
        )  # fmt: skip
        results.put(("transport", rank, group.transport))
        for seed in range(rounds):
            expected = _tensors(seed)
            received = [(n, t.clone()) for n, t in group.receive()]
            exact = sorted(n for n, _ in received) == sorted(n for n, _ in expected) and all(
                _same_bytes(t, dict(expected)[n]) for n, t in received
            )
            results.put(("round", rank, exact, group.last_stats.num_buckets))
        group.timeout_s = 1.0  # the sender stops: the next receive fails fast with our error
        try:
            list(group.receive())
            results.put(("timeout", rank, None))
        except WeightSyncError as e:
            results.put(("timeout", rank, str(e)))
        group.close()
    except Exception as e:  # report, so the test fails with the child's error instead of hanging
        results.put(("error", rank, repr(e)))


def _start(target, *args) -> tuple[mp.Process, mp.Queue]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results), daemon=True)
    proc.start()
    return proc, results


def _start_receivers(target, port: int, world_size: int, *args) -> tuple[list[mp.Process], mp.Queue]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(port, rank, world_size, *args, results), daemon=True)
        for rank in range(1, world_size)
    ]
    for proc in procs:
        proc.start()
    return procs, results


def _sender(port: int, world_size: int, shm_dir: str, transport: str = "shm") -> WeightSyncGroup:
    return WeightSyncGroup.create(
        "127.0.0.1",
        port,
        rank=0,
        world_size=world_size,
        timeout_s=_JOIN_TIMEOUT_S,
        transport=transport,
        shm_bytes=ALIGN,
        shm_dir=shm_dir,
        node=_NODE,
    )


def test_two_engines_read_one_segment_exactly_over_two_rounds(tmp_path):
    port = free_port()
    procs, results = _start_receivers(_receiver, port, 3, str(tmp_path), 2)
    group = _sender(port, 3, str(tmp_path))
    try:
        assert group.transport == "shm"
        assert list(tmp_path.iterdir()) == []  # unlinked once both engines had it open
        assert sorted(results.get(timeout=60) for _ in range(2)) == [("transport", 1, "shm"), ("transport", 2, "shm")]
        for seed in range(2):  # the second round rewrites the same segment
            stats = group.send(_tensors(seed), bucket_bytes=1024)
            rows = sorted(results.get(timeout=60) for _ in range(2))
            assert rows == [("round", 1, True, stats.num_buckets), ("round", 2, True, stats.num_buckets)]
            assert stats.num_tensors == len(_tensors(seed)) and stats.num_buckets >= 8
        for _ in range(2):
            kind, _, message = results.get(timeout=60)
            assert kind == "timeout" and "rank 0 to start sending" in message
    finally:
        group.close()
        for proc in procs:
            proc.join(timeout=30)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert list(tmp_path.iterdir()) == []


def _receive_twice(port: int, rank: int, world_size: int, shm_dir: str, results: mp.Queue) -> None:
    """Round 1: fail while loading the 4th tensor; round 2: read what comes. Report each error."""
    group = WeightSyncGroup.create(
        "127.0.0.1", port, rank=rank, world_size=world_size, timeout_s=_JOIN_TIMEOUT_S, shm_dir=shm_dir, node=_NODE
    )
    for stop_after in (3, -1):
        try:
            for i, (name, _) in enumerate(group.receive()):
                if i == stop_after:
                    raise ValueError(f"weight {name!r} is not in the rollout model")
            results.put("complete")
        except (WeightSyncError, ValueError) as e:
            results.put(str(e))
    group.close()


def test_failures_on_either_side_release_the_other_at_once(tmp_path):
    def failing_producer():
        yield "w0", torch.zeros(300)
        yield "w1", torch.zeros(300)  # closes the first 1 KiB bucket, which is published
        raise RuntimeError("ZeRO gather failed")

    port = free_port()
    procs, results = _start_receivers(_receive_twice, port, 2, str(tmp_path))
    group = _sender(port, 2, str(tmp_path))
    try:
        start = time.monotonic()
        # the engine's load_weights raises: the send fails with the engine's rank, not at the 60 s timeout
        with pytest.raises(
            WeightSyncError, match=r"engine\(s\) stopped reading the stream: rank 1: stopped reading after 4"
        ):
            group.send(_tensors(0), bucket_bytes=1024)
        assert "is not in the rollout model" in results.get(timeout=30)
        # the trainer's gather raises: the engine is released with our error; both sides go on to round 2
        with pytest.raises(RuntimeError, match="ZeRO gather failed"):
            group.send(failing_producer(), bucket_bytes=1024)
        assert "rank 0 aborted the stream after 1 tensors" in results.get(timeout=30)
        assert time.monotonic() - start < 30
        # the engine is done receiving: the next send times out at the ready handshake, with our error
        procs[0].join(timeout=30)
        group.timeout_s = 1.0
        with pytest.raises(WeightSyncError, match=r"only 0 of 1 engines called receive\(\) within 1s"):
            group.send(_tensors(0), bucket_bytes=1024)
    finally:
        group.close()
        procs[0].join(timeout=30)
    assert procs[0].exitcode == 0


def _blind_receiver(port: int, rank: int, world_size: int, shm_dir: str, results: mp.Queue) -> None:
    """An engine that cannot see rank 0's tmpfs (another node): first an auto group, then an shm one."""

    def cannot_open(path, token):
        raise FileNotFoundError(2, "No such file or directory", path)

    ShmSegment.open = cannot_open  # this process only
    try:
        group = WeightSyncGroup.create(
            "127.0.0.1", port, rank, world_size, timeout_s=_JOIN_TIMEOUT_S, shm_dir=shm_dir, node=_NODE
        )
        results.put((group.transport, [n for n, _ in group.receive()]))
        group.close()
        WeightSyncGroup.create(
            "127.0.0.1", port + 1, rank, world_size, timeout_s=_JOIN_TIMEOUT_S, shm_dir=shm_dir, node=_NODE
        )
        results.put("joined")
    except WeightSyncError as e:
        results.put(str(e))


def test_auto_falls_back_to_the_collective_when_an_engine_cannot_open_the_segment(tmp_path):
    port = free_port()
    while not _port_free(port + 1):
        port = free_port()
    procs, results = _start_receivers(_blind_receiver, port, 2, str(tmp_path))
    group = _sender(port, 2, str(tmp_path), transport="auto")
    try:
        assert group.transport == "collective"
        group.send([("w", torch.ones(3))], bucket_bytes=1024)
        assert results.get(timeout=60) == ("collective", ["w"])
        group.close()
        with pytest.raises(WeightSyncError, match="engine rank 1 cannot open"):
            _sender(port + 1, 2, str(tmp_path), transport="shm")
        assert "needs every engine on rank 0's node" in results.get(timeout=60)
    finally:
        group.close()
        procs[0].join(timeout=30)
    assert list(tmp_path.iterdir()) == []


def _receiver_on_node(port: int, rank: int, world_size: int, shm_dir: str, node: str, results: mp.Queue) -> None:
    """An engine that shares rank 0's tmpfs but is on another node (two Ray nodes on one machine)."""
    try:
        group = WeightSyncGroup.create(
            "127.0.0.1", port, rank, world_size, timeout_s=_JOIN_TIMEOUT_S, shm_dir=shm_dir, node=node
        )
        results.put((group.transport, [n for n, _ in group.receive()]))
        group.close()
        WeightSyncGroup.create(
            "127.0.0.1", port + 1, rank, world_size, timeout_s=_JOIN_TIMEOUT_S, shm_dir=shm_dir, node=node
        )
        results.put("joined")
    except WeightSyncError as e:
        results.put(str(e))


def test_an_engine_on_another_node_gets_the_collective_even_when_it_shares_the_tmpfs(tmp_path):
    """Several Ray nodes on one machine share /dev/shm: the node id decides, so auto takes the multi-node path."""
    port = free_port()
    while not _port_free(port + 1):
        port = free_port()
    procs, results = _start_receivers(_receiver_on_node, port, 2, str(tmp_path), "node-b")

    def sender(port: int, transport: str) -> WeightSyncGroup:
        return WeightSyncGroup.create(
            "127.0.0.1", port, 0, 2, timeout_s=_JOIN_TIMEOUT_S, transport=transport, shm_bytes=ALIGN,
            shm_dir=str(tmp_path), node="node-a",
        )  # fmt: skip

    group = sender(port, "auto")
    try:
        assert group.transport == "collective"
        group.send([("w", torch.ones(3))], bucket_bytes=1024)
        assert results.get(timeout=60) == ("collective", ["w"])
        group.close()
        with pytest.raises(WeightSyncError, match="engine rank 1 is on node node-b, not on rank 0's node node-a"):
            sender(port + 1, "shm")
        assert "needs every engine on rank 0's node" in results.get(timeout=60)
    finally:
        group.close()
        procs[0].join(timeout=30)
    assert list(tmp_path.iterdir()) == []


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_bad_transport_raises_our_error():
    with pytest.raises(WeightSyncError, match="transport 'tcp' is not supported"):
        WeightSyncGroup.create("127.0.0.1", free_port(), rank=0, world_size=2, transport="tcp")


def test_the_default_shm_dir_exists_here():
    """The tests above use tmp dirs; production uses /dev/shm, which must be a writable tmpfs on Linux CI."""
    if not sys.platform.startswith("linux"):
        pytest.skip("/dev/shm is Linux-only")
    assert shm_sync.shm_available() and Path(shm_sync.SHM_DIR).is_dir()
