"""Bucketed weight broadcast from the trainer's rank 0 to the rollout engines.

The transport is a process group of its own, built directly on a `TCPStore` that rank 0 hosts:
it never touches (and never needs) the default torch.distributed group that DeepSpeed may already
own in the trainer's process. `ray.util.collective` and `dist.new_group` are not usable there
(STACK.md), so the backend object is constructed by hand: `ProcessGroupGloo` on CPU,
`ProcessGroupNCCL` on GPU.

Ranks:
  0        the trainer's rank 0 (sender; gathers ZeRO-3 / merges LoRA before calling `send`)
  1..N     one per rollout engine process (receivers)
A vLLM engine with tensor_parallel_size > 1 runs its shards in several processes; this module
still gives the engine a single rank, and the engine forwards what it receives to its shards
(see `rlhf.engines.rollout.vllm_backend`). Giving every TP shard its own rank is the faster
design for large models and would only change the world size the controller computes.

Wire format of one `send`, per bucket (every bucket holds tensors of a single dtype):
  1. int64[1]          length L of the header in bytes (-1: end of stream; -2: rank 0 aborted)
  2. uint8[L]          JSON header: {"dtype": ..., "numel": ..., "entries": [[name, shape, offset], ...]}
  3. uint8[numel * itemsize]  the flat bucket, tensors packed back to back in entry order
Before the first bucket the ranks shake hands through the store (receivers check in, rank 0
announces the stream), so a missing peer raises `WeightSyncError` after `timeout_s` on every
backend instead of hanging in a collective. A tensor larger than `bucket_bytes` travels alone.
Buffers go over the wire as bytes, so any dtype works on gloo and NCCL alike.

Transports (`create(transport=...)`; rank 0 decides, the engines follow):
  collective  the bucketed broadcast above, over gloo or NCCL (any placement);
  shm         the same buckets written once into a shared-memory segment that every engine maps
              (`rlhf.engines.shm_sync`): at most one copy per side, no socket. Needs the
              engines on rank 0's node: the join checks that each engine has rank 0's node id
              (`rlhf.utils.distributed.node_id`, Ray's node id) and can open rank 0's segment;
  auto        shm when every engine is on rank 0's node and could open the segment, else collective.
              The node id decides even where two Ray nodes share one tmpfs (several nodes on one
              machine): the decision follows Ray's placement, so a simulated multi-node cluster takes
              the multi-node path.
On shm, per bucket rank 0 copies the tensors into the segment and publishes the header under the store
key `shm/<round>/<seq>` ({"offset", "dtype", "numel", "entries"}, {"end": true} or {"aborted": n});
engines set `shm/<round>/ready/<rank>`, yield zero-copy views while rank 0 writes the next bucket, and
set `shm/<round>/done/<rank>` (empty, or why they stopped) at the end.
Views stay valid until the engine's next `receive` (vLLM's layer-wise reload keeps them until the
layer is complete; the hf backend keeps them as its weights): rank 0 only writes the segment again
after every engine has called `receive` for the next round. An engine whose stream was aborted holds
weights that must be synced again, as on the collective path. Timeouts and aborts raise the same
`WeightSyncError`s as the collective path.

NCCL needs every rank on a GPU of its own: two ranks on one device fail at join with
"Duplicate GPU detected" (measured, NCCL 2.28 on one H100). A trainer and an engine colocated on
one GPU (cluster single_gpu) must use "gloo", which stages the buckets through host memory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf.engines.checksum import Checksums, tensor_checksum
from rlhf.engines.shm_sync import SHM_DIR, SegmentBuckets, ShmSegment, read_bucket, shm_available
from rlhf.errors import WeightSyncError
from rlhf.utils.distributed import free_port, node_id, node_ip

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "TRANSPORTS",
    "ParallelCopy",
    "SyncStats",
    "WeightSyncGroup",
    "free_port",
    "node_ip",
    "pack_buckets",
]

BACKENDS = ("gloo", "nccl")
TRANSPORTS = ("collective", "shm", "auto")
_END_OF_STREAM = -1
_ABORTED = -2
_STORE_PREFIX = "rlhf_weight_sync"
_POLL_S = 0.005


@dataclass
class SyncStats:
    """What one `send` or `receive` moved."""

    num_tensors: int = 0
    """Tensors transferred."""
    num_bytes: int = 0
    """Payload bytes (headers excluded)."""
    num_buckets: int = 0
    """Flat buffers broadcast."""
    seconds: float = 0.0
    """Wall time from handshake to end-of-stream."""
    checksums: Checksums = field(default_factory=list)
    """The sender's: (name, checksum) of every tensor as it was packed (rlhf.engines.checksum)."""

    @property
    def gib_per_s(self) -> float:
        return self.num_bytes / max(self.seconds, 1e-9) / 2**30


class WeightSyncGroup:
    """One member of the weight-sync group; rank 0 sends, the other ranks receive."""

    def __init__(
        self,
        store: dist.Store,
        pg: Optional[dist.ProcessGroup],
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float,
        segment: Optional[ShmSegment] = None,
        copy_threads: int = 1,
    ):
        self._store = store
        self._pg = pg
        self._segment = segment
        self.transport = "collective" if segment is None else "shm"
        """The transport the group uses: "collective" or "shm" (what rank 0 decided at join)."""
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self._round = 0
        self._published = 0  # store keys the last shm round wrote, deleted at the next
        self._copy = ParallelCopy(copy_threads)
        self.last_stats = SyncStats()

    @classmethod
    def create(
        cls,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
        transport: str = "collective",
        shm_bytes: int = 0,
        shm_dir: str = SHM_DIR,
        node: Optional[str] = None,
        copy_threads: int = 1,
    ) -> WeightSyncGroup:
        """Join the group; blocks until all `world_size` ranks have joined (rank 0 hosts the store).

        Args:
            host: IP of rank 0's node (the trainer's rank 0; see `node_ip`).
            port: a free port on that node (see `free_port`), the same for every rank.
            rank: 0 for the sender, 1..world_size-1 for the engines.
            world_size: 1 + number of rollout engines.
            backend: "gloo" (CPU buffers) or "nccl" (buffers on the current CUDA device).
            timeout_s: limit for joining and for each later send/receive handshake and collective.
            transport: rank 0's choice, "collective", "shm" or "auto" (module docstring); the
                engines' value is ignored, they follow rank 0.
            shm_bytes: rank 0, shm/auto: bytes to reserve now (the full model's size), so that a
                tmpfs too small for it makes "auto" fall back here instead of failing a later send.
            shm_dir: the tmpfs holding the segment.
            node: this process's node id (None: `node_id()`, Ray's node id inside Ray); shm needs
                every engine's to equal rank 0's.
            copy_threads: rank 0 on shm, threads that copy a group of tensors into the segment (`ParallelCopy`).
        """
        if backend not in BACKENDS:
            raise WeightSyncError(f"weight sync backend {backend!r} is not supported; use one of {BACKENDS}")
        if transport not in TRANSPORTS:
            raise WeightSyncError(f"weight sync transport {transport!r} is not supported; use one of {TRANSPORTS}")
        if not 0 <= rank < world_size:
            raise WeightSyncError(f"weight sync rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        timeout = timedelta(seconds=timeout_s)
        what = f"weight sync rank {rank}/{world_size} ({backend}) at {host}:{port}"
        segment = None
        try:
            store = dist.TCPStore(host, port, world_size, rank == 0, timeout, wait_for_workers=False)
            store = dist.PrefixStore(_STORE_PREFIX, store)
            node = node_id() if node is None else node
            segment = _choose_transport(store, rank, world_size, transport, shm_bytes, shm_dir, timeout, node)
            if segment is not None:  # the handshake was the join barrier; no process group needed
                group = cls(store, None, rank, world_size, torch.device("cpu"), timeout_s, segment, copy_threads)
                logger.debug("%s joined (shared memory)", what)
                return group
            if backend == "gloo":
                pg, device = _gloo_group(store, rank, world_size, timeout), torch.device("cpu")
            else:
                pg, device = _nccl_group(store, rank, world_size, timeout)
            group = cls(store, pg, rank, world_size, device, timeout_s, copy_threads=copy_threads)
            # NCCL connects lazily, so every backend proves the group works with one tiny collective.
            group._broadcast(torch.zeros(1, dtype=torch.int64, device=device), "the join check")
        except WeightSyncError:
            if segment is not None:
                segment.close()
            raise
        except Exception as e:  # torch raises RuntimeError / DistError subclasses here
            if segment is not None:
                segment.close()
            raise WeightSyncError(
                f"{what} could not join within {timeout_s:g}s: {e}. Check that all {world_size} ranks call "
                f"WeightSyncGroup.create with the same host, port and world_size, that the port is free "
                f"on rank 0's node and reachable from the engines, or raise the timeout."
            ) from e
        logger.debug("%s joined", what)
        return group

    def send(self, named_tensors: Iterable[Any], bucket_bytes: int = 64 << 20, *, grouped: bool = False) -> SyncStats:
        """Rank 0: stream `named_tensors` to every other rank in buckets of about `bucket_bytes`.

        `named_tensors` yields (name, tensor) pairs, each read before the next is asked for; with
        `grouped`, lists of pairs, each list valid until the next is asked for
        (`iter_full_parameter_groups`), whose tensors are copied together on `copy_threads` threads.
        """
        groups = named_tensors if grouped else ([pair] for pair in named_tensors)
        if self.rank != 0:
            raise WeightSyncError(f"only rank 0 sends weights; this is rank {self.rank}")
        if bucket_bytes <= 0:
            raise WeightSyncError(f"bucket_bytes must be positive, got {bucket_bytes}")
        start = time.perf_counter()
        self._round += 1
        stats = SyncStats()
        if self._segment is not None:
            self._send_shm(groups, bucket_bytes, stats)
            stats.seconds = time.perf_counter() - start
            self.last_stats = stats
            self._log_sent(stats)
            return stats
        self._wait_for_receivers()
        self._store.set(f"begin/{self._round}", "1")
        try:
            # one copy thread: the socket, not the copy into the bucket, bounds the broadcast
            pack_buckets(groups, bucket_bytes, _BroadcastBuckets(self, bucket_bytes), stats)
        except WeightSyncError:
            raise  # the transport itself failed: the receivers see it too
        except BaseException:
            # The tensors' producer failed between buckets: release the receivers now, not at their timeout.
            self._broadcast(self._marker(_ABORTED), "the abort marker")
            raise
        self._broadcast(self._marker(_END_OF_STREAM), "the end-of-stream marker")
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        self._log_sent(stats)
        return stats

    def _log_sent(self, stats: SyncStats) -> None:
        logger.info(
            "weight sync (%s) sent %d tensors, %.1f MiB in %d buckets, %.3fs (%.2f GiB/s)",
            self.transport,
            stats.num_tensors,
            stats.num_bytes / 2**20,
            stats.num_buckets,
            stats.seconds,
            stats.gib_per_s,
        )

    def receive(self) -> Iterator[tuple[str, Tensor]]:
        """Ranks > 0: yield (name, tensor) as buckets arrive, in the sender's order within a dtype.

        Tensors are views into a fresh buffer per bucket, so they stay valid after the next bucket
        arrives; copy them into the model and drop them. `last_stats` is set once the stream ends.
        """
        if self.rank == 0:
            raise WeightSyncError("rank 0 sends weights; receive() is for ranks > 0")
        if self._segment is not None:
            yield from self._receive_shm()
            return
        start = time.perf_counter()
        self._round += 1
        self._store.add(f"ready/{self._round}", 1)
        self._wait_key(f"begin/{self._round}", "rank 0 to start sending")
        stats = SyncStats()
        while True:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._broadcast(length, "a bucket header length")
            n = int(length.item())
            if n == _END_OF_STREAM:
                break
            if n == _ABORTED:
                raise WeightSyncError(
                    f"weight sync rank {self.rank}: rank 0 aborted the stream after {stats.num_tensors} tensors "
                    f"(its error is in the trainer's traceback); the engine holds a mix of old and new weights"
                )
            raw = torch.empty(n, dtype=torch.uint8, device=self.device)
            self._broadcast(raw, "a bucket header")
            header = json.loads(bytes(raw.cpu().numpy()).decode())
            dtype = getattr(torch, header["dtype"])
            flat = torch.empty(header["numel"], dtype=dtype, device=self.device)
            self._broadcast(flat.view(torch.uint8), "a bucket")
            stats.num_buckets += 1
            stats.num_bytes += flat.numel() * flat.element_size()
            for name, shape, offset in header["entries"]:
                numel = _numel(shape)
                stats.num_tensors += 1
                yield name, flat[offset : offset + numel].view(shape)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats

    def close(self) -> None:
        """Drop the process group or segment and the store connection (rank 0's store stops serving)."""
        self._copy.close()
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
        pg, self._pg = self._pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception as e:  # best effort: the peer may already be gone
                logger.debug("weight sync group shutdown: %s", e)
        self._store = None

    # -- shared-memory transport ---------------------------------------------------------------

    def _send_shm(self, groups: Iterable[Sequence[tuple[str, Tensor]]], bucket_bytes: int, stats: SyncStats) -> None:
        """Write every bucket into the segment (the engines read while the next one is written), then
        wait until every engine has read the whole stream. Any failure releases the engines at once.

        Every wait is a blocking store call (no polling): under CPU contention each handshake costs a
        scheduling round trip, so a round has three of them plus one per bucket.
        """
        round_ = self._round
        engines = range(1, self.world_size)
        self._wait_all([f"shm/{round_}/ready/{k}" for k in engines], "called receive()")
        previous, self._published = self._published, 0
        try:
            pack_buckets(groups, bucket_bytes, SegmentBuckets(self._segment, self._publish), stats, self._copy)
        except BaseException:
            try:
                self._publish({"aborted": stats.num_tensors})
            except Exception as e:  # the store itself failed: the engines time out instead
                logger.debug("weight sync: could not publish the abort: %s", e)
            raise
        self._publish({"end": True})
        self._forget_round(round_ - 1, previous)  # while the engines read the last bucket
        done = [f"shm/{round_}/done/{k}" for k in engines]
        self._wait_all(done, "finished reading the shared-memory stream")
        reasons = [f"rank {k}: {r.decode()}" for k, r in zip(engines, self._store.multi_get(done)) if r]
        if reasons:
            raise WeightSyncError(f"weight sync: engine(s) stopped reading the stream: {'; '.join(reasons)}")

    def _publish(self, header: dict) -> None:
        self._store.set(f"shm/{self._round}/{self._published}", json.dumps(header))
        self._published += 1

    def _wait_all(self, keys: list[str], what: str) -> None:
        """Block until every engine's key exists; WeightSyncError naming how many did after `timeout_s`."""
        if not keys:
            return
        try:
            self._store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception as e:
            arrived = sum(self._store.check([key]) for key in keys)
            raise WeightSyncError(
                f"weight sync: only {arrived} of {len(keys)} engines {what} within {self.timeout_s:g}s; "
                f"start receive_weights on every engine together with send (an engine died or stopped "
                f"consuming receive()): {e}"
            ) from e

    def _forget_round(self, round_: int, published: int) -> None:
        """Delete the store keys of a finished round (every engine has started the next one)."""
        if round_ < 1:
            return
        keys = [f"shm/{round_}/{seq}" for seq in range(published)]
        keys += [f"shm/{round_}/{kind}/{k}" for kind in ("ready", "done") for k in range(1, self.world_size)]
        for key in keys:
            self._store.delete_key(key)

    def _receive_shm(self) -> Iterator[tuple[str, Tensor]]:
        start = time.perf_counter()
        self._round += 1
        round_ = self._round
        self._store.set_timeout(timedelta(seconds=self.timeout_s))  # bounds each blocking get below
        self._store.set(f"shm/{round_}/ready/{self.rank}", "1")
        stats, seq, reason = SyncStats(), 0, "stopped reading"
        try:
            while True:
                header = json.loads(self._get(f"shm/{round_}/{seq}", seq))
                seq += 1
                if header.get("end"):
                    break
                if "aborted" in header:
                    raise WeightSyncError(
                        f"weight sync rank {self.rank}: rank 0 aborted the stream after {header['aborted']} tensors "
                        f"(its error is in the trainer's traceback); the engine holds a mix of old and new weights"
                    )
                views = read_bucket(self._segment, header)
                stats.num_buckets += 1
                stats.num_bytes += sum(t.numel() * t.element_size() for _, t in views)
                for name, tensor in views:
                    stats.num_tensors += 1
                    yield name, tensor
            reason = ""
            stats.seconds = time.perf_counter() - start
            self.last_stats = stats
        except GeneratorExit:
            reason = f"stopped reading after {stats.num_tensors} tensors (the engine's error says why)"
            raise
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}"
            raise
        finally:
            if self._store is not None:
                try:  # done, or why not: rank 0 waits for every engine's answer
                    self._store.set(f"shm/{round_}/done/{self.rank}", reason)
                except Exception as e:  # rank 0 (the store's host) is gone
                    logger.debug("weight sync rank %d: could not report the end of the stream: %s", self.rank, e)

    def _get(self, key: str, seq: int) -> bytes:
        try:
            return self._store.get(key)
        except Exception as e:
            what = "rank 0's next bucket" if seq else "rank 0 to start sending"
            raise WeightSyncError(
                f"weight sync rank {self.rank}: waited {self.timeout_s:g}s for {what}: {e}. "
                f"Call the trainer's sync together with receive_weights on the engines."
            ) from e

    def _marker(self, value: int) -> Tensor:
        return torch.tensor([value], dtype=torch.int64, device=self.device)

    def _broadcast(self, tensor: Tensor, what: str) -> None:
        if self._pg is None:
            raise WeightSyncError(f"weight sync rank {self.rank} is closed; create a new group")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        opts.timeout = timedelta(seconds=self.timeout_s)
        try:
            self._pg.broadcast([tensor], opts).wait()
        except Exception as e:
            raise WeightSyncError(
                f"weight sync rank {self.rank}/{self.world_size}: broadcast of {what} failed (timeout "
                f"{self.timeout_s:g}s): {e}. On a timeout, a peer died or stopped calling send/receive."
            ) from e

    def _wait_for_receivers(self) -> None:
        key, expected = f"ready/{self._round}", self.world_size - 1
        deadline = time.monotonic() + self.timeout_s
        while (ready := self._store.add(key, 0)) < expected:
            if time.monotonic() > deadline:
                raise WeightSyncError(
                    f"weight sync: only {ready} of {expected} engines called receive() within "
                    f"{self.timeout_s:g}s; start receive_weights on every engine together with send."
                )
            time.sleep(_POLL_S)

    def _wait_key(self, key: str, what: str) -> None:
        try:
            self._store.wait([key], timedelta(seconds=self.timeout_s))
        except Exception as e:
            raise WeightSyncError(
                f"weight sync rank {self.rank}: waited {self.timeout_s:g}s for {what}: {e}. "
                f"Call the trainer's sync together with receive_weights on the engines."
            ) from e


class BucketTarget(Protocol):
    """Where `pack_buckets` puts the open bucket: a flat buffer per bucket, emitted when complete."""

    def tensor_start(self, numel: int, itemsize: int) -> int:
        """Element offset of the next tensor in a bucket that holds `numel` elements."""
        ...

    def view(self, dtype: torch.dtype, numel: int) -> Tensor:
        """The open bucket's first `numel` elements (earlier tensors' elements kept)."""
        ...

    def emit(self, dtype: torch.dtype, numel: int, entries: list[list[Any]]) -> None:
        """The open bucket is complete ([name, shape, element offset] per tensor); send it."""
        ...


def pack_buckets(
    groups: Iterable[Sequence[tuple[str, Tensor]]],
    bucket_bytes: int,
    target: BucketTarget,
    stats: SyncStats,
    copy: Optional[ParallelCopy] = None,
) -> None:
    """Place each tensor in the open bucket, and emit the bucket when the next tensor has another dtype
    or would overflow it (a tensor larger than `bucket_bytes` travels alone).

    `groups` yields lists of (name, tensor); the tensors of one list are copied into the target
    together (`copy`, in parallel), before the bucket is emitted and before the next list is asked
    for: the producer may hand out views of memory it releases or reuses afterwards (the ZeRO-3
    gathered buffers of `iter_full_parameter_groups`). That copy is the only one the sender makes.
    A list's tensors are placed in their sources' memory order (`_source_order`), not the list's.
    One bucket is open at a time, so a bucket holds one dtype and the shared-memory layout stays
    contiguous.
    """
    copy = copy or ParallelCopy(1)
    dtype: Optional[torch.dtype] = None
    entries: list[list[Any]] = []
    pending: list[tuple[Tensor, Tensor]] = []  # (destination, source) of this list, not yet copied
    numel = payload = 0

    def emit() -> None:  # stats count what was handed to the transport
        copy(pending)
        pending.clear()
        flat = target.view(dtype, numel)  # type: ignore[arg-type]
        target.emit(dtype, numel, entries)  # type: ignore[arg-type]
        # what was packed, read once the receivers have the bucket (shm: they read while this runs); the
        # bucket is not written again before the next emit
        for name, shape, start in entries:
            stats.checksums.append((name, tensor_checksum(flat[start : start + _numel(shape)])))
        stats.num_buckets += 1
        stats.num_tensors += len(entries)
        stats.num_bytes += payload

    for group in groups:
        for name, tensor in sorted(group, key=_source_order):
            itemsize = tensor.element_size()
            start = target.tensor_start(numel, itemsize)
            if entries and (tensor.dtype != dtype or (start + tensor.numel()) * itemsize > bucket_bytes):
                emit()
                entries, numel, payload, start = [], 0, 0, 0
            dtype = tensor.dtype
            end = start + tensor.numel()
            # a view of the open bucket; the target may only move a bucket that is empty (`view`), and an
            # empty bucket has no pending copies
            pending.append((target.view(dtype, end)[start:end].view(tensor.shape), tensor.detach()))
            entries.append([name, list(tensor.shape), start])
            numel = end
            payload += tensor.numel() * itemsize
        copy(pending)
        pending.clear()
    if entries:
        emit()


def _source_order(pair: tuple[str, Tensor]) -> tuple[str, int, int]:
    """Where a tensor's bytes lie: a list placed in this order follows its sources' layout (DeepSpeed's flat
    buffers hold a param group's partitions back to back, weight-decay and no-decay groups apart), so
    `ParallelCopy` merges most of it into a few long runs. Receivers look tensors up by name."""
    tensor = pair[1]
    return str(tensor.dtype), tensor.untyped_storage().data_ptr(), tensor.storage_offset()


class ParallelCopy:
    """Copies a list of (destination, source) CPU tensors on `threads` threads: runs of pairs that lie back
    to back on both sides are merged first (`_coalesce`), then the list's bytes are cut into equal lanes
    (a long run split between lanes), one fork and join per list.

    Per-tensor parallelism (torch's intra-op threads) pays a fork and join for every tensor, which on a
    model's few-MiB tensors costs more than it gains (measured on 2 cores, a 30M-parameter model's
    tensors: 2 intra-op threads 0.020 s, 1 thread 0.017 s, 2 lanes 0.012 s; one flat 2-thread copy of
    the same bytes 0.009 s). torch releases the GIL while it copies, so Python threads run the lanes.
    """

    MIN_LANE_BYTES = 1 << 20
    """Least bytes per lane: a smaller list uses fewer threads (under 2 MiB, only the calling one)."""

    def __init__(self, threads: int):
        if threads < 1:
            raise WeightSyncError(f"copy threads must be >= 1, got {threads}")
        self.threads = threads
        self._pool: Optional[ThreadPoolExecutor] = None

    def __call__(self, jobs: Sequence[tuple[Tensor, Tensor]]) -> None:
        jobs = _coalesce(jobs)
        total = sum(src.numel() * src.element_size() for _, src in jobs)
        lanes = min(self.threads, max(1, total // self.MIN_LANE_BYTES))
        if lanes == 1 or any(dst.device.type != "cpu" for dst, _ in jobs):  # device copies queue asynchronously
            _copy_lane(jobs)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="weight-sync-copy")
        split = _split_lanes(jobs, lanes, total)
        futures = [self._pool.submit(_copy_lane, lane) for lane in split[1:]]
        try:
            _copy_lane(split[0])
        finally:
            for future in futures:
                future.result()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _coalesce(jobs: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """`jobs` with each run of pairs whose sources and destinations both lie back to back in one storage
    merged into one flat pair: DeepSpeed keeps a group's partitions in one flat buffer, the buckets
    hold tensors back to back, so most of a model copies in a few long runs instead of a copy per tensor."""
    out: list[tuple[Tensor, Tensor]] = []
    for dst, src in jobs:
        if out and _adjacent(out[-1][0], dst) and _adjacent(out[-1][1], src):
            (prev_dst, prev_src), numel = out[-1], out[-1][1].numel() + src.numel()
            out[-1] = (_flat_run(prev_dst, numel), _flat_run(prev_src, numel))
        else:
            out.append((dst, src))
    return out


def _adjacent(first: Tensor, second: Tensor) -> bool:
    """Whether `second` starts where `first` ends, both contiguous, in one storage of one dtype."""
    return (
        first.dtype == second.dtype
        and first.is_contiguous()
        and second.is_contiguous()
        and second.storage_offset() == first.storage_offset() + first.numel()
        and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    )


def _flat_run(start: Tensor, numel: int) -> Tensor:
    return start.as_strided((numel,), (1,), start.storage_offset())


def _copy_lane(jobs: Sequence[tuple[Tensor, Tensor]]) -> None:
    for dst, src in jobs:
        dst.copy_(src)


def _split_lanes(jobs: Sequence[tuple[Tensor, Tensor]], lanes: int, total: int) -> list[list[tuple[Tensor, Tensor]]]:
    """`jobs` cut in order into `lanes` runs of about `total / lanes` bytes; a pair of contiguous
    tensors may be split between two lanes, any other pair goes whole into the lane it starts in."""
    share = -(-total // lanes)
    out: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(lanes)]
    lane = filled = 0  # the lane being filled, and its bytes so far

    def advance() -> None:
        nonlocal lane, filled
        if filled >= share and lane < lanes - 1:
            lane, filled = lane + 1, 0

    for dst, src in jobs:
        itemsize, numel = src.element_size(), src.numel()
        advance()
        if not (dst.is_contiguous() and src.is_contiguous()):
            out[lane].append((dst, src))
            filled += numel * itemsize
            continue
        flat_dst, flat_src = dst.view(-1), src.view(-1)
        offset = 0
        while offset < numel:
            advance()
            take = numel - offset
            if lane < lanes - 1:
                take = min(take, -(-(share - filled) // itemsize))
            out[lane].append((flat_dst[offset : offset + take], flat_src[offset : offset + take]))
            offset += take
            filled += take * itemsize
    return [run for run in out if run]


class _BroadcastBuckets:
    """The collective transport's target: a flat buffer per dtype, reused bucket after bucket during one
    send (no allocation and page faulting per bucket), broadcast with its header when complete."""

    def __init__(self, group: WeightSyncGroup, bucket_bytes: int):
        self.group = group
        self.bucket_bytes = bucket_bytes
        self._buffers: dict[torch.dtype, Tensor] = {}

    @staticmethod
    def tensor_start(numel: int, itemsize: int) -> int:
        return numel  # packed back to back: the receiver copies out of its buffer

    def view(self, dtype: torch.dtype, numel: int) -> Tensor:
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            itemsize = dtype.itemsize
            grown = torch.empty(max(numel, self.bucket_bytes // itemsize), dtype=dtype, device=self.group.device)
            if buffer is not None:
                grown[: buffer.numel()].copy_(buffer)
            self._buffers[dtype] = buffer = grown
        return buffer[:numel]

    def emit(self, dtype: torch.dtype, numel: int, entries: list[list[Any]]) -> None:
        header = {"dtype": str(dtype).removeprefix("torch."), "numel": numel, "entries": entries}
        encoded = json.dumps(header).encode()
        group = self.group
        group._broadcast(group._marker(len(encoded)), "a bucket header length")
        group._broadcast(torch.frombuffer(bytearray(encoded), dtype=torch.uint8).to(group.device), "a bucket header")
        group._broadcast(self._buffers[dtype][:numel].view(torch.uint8), "a bucket")


def _choose_transport(
    store: dist.Store,
    rank: int,
    world_size: int,
    transport: str,
    shm_bytes: int,
    shm_dir: str,
    timeout: timedelta,
    node: str,
) -> Optional[ShmSegment]:
    """Rank 0 offers a segment and its node id, every engine on that node opens it, rank 0 decides;
    the shm segment or None.

    Rank 0 unlinks the segment's name as soon as every engine has answered, so nothing is left in the
    tmpfs whatever happens to the processes later.
    """
    if rank != 0:
        return _answer_offer(store, rank, timeout, node)
    segment, why = None, ""
    if transport != "collective":
        if not shm_available(shm_dir):
            why = f"{shm_dir} is not a writable directory"
        else:
            try:
                segment = ShmSegment.create(shm_bytes, shm_dir)
            except WeightSyncError as e:
                why = str(e)
    offer = "" if segment is None else json.dumps({"path": segment.path, "token": segment.token.hex(), "node": node})
    try:
        store.set("transport/offer", offer)
        replies = {}
        for k in range(1, world_size):
            store.wait([f"transport/probe/{k}"], timeout)
            replies[k] = store.get(f"transport/probe/{k}").decode()
    except BaseException:
        if segment is not None:
            segment.close()
        raise
    if segment is not None:
        segment.unlink()
    refused = {k: r for k, r in replies.items() if r != "ok"}
    if segment is not None and not refused:
        store.set("transport/decision", "shm")
        return segment
    if segment is not None:
        segment.close()
        segment = None
        why = "; ".join(f"engine rank {k} {r}" for k, r in refused.items())
    if transport == "shm":
        message = (
            f"weight sync transport 'shm' needs every engine on rank 0's node, sharing {shm_dir}: {why}. "
            f"Set cluster.weight_sync_transport=auto (falls back to the collective) or collective."
        )
        store.set("transport/decision", "error:" + message)
        _await_engines_read_error(store, world_size, timeout)
        raise WeightSyncError(message)
    if transport == "auto":
        logger.info("weight sync: shared memory not usable (%s); using the %s broadcast", why, "collective")
    store.set("transport/decision", "collective")
    return None


def _answer_offer(store: dist.Store, rank: int, timeout: timedelta, node: str) -> Optional[ShmSegment]:
    store.wait(["transport/offer"], timeout)
    offer, segment, reply = store.get("transport/offer").decode(), None, "skip"
    spec = json.loads(offer) if offer else None
    if spec is not None and spec["node"] != node:
        reply = f"is on node {node}, not on rank 0's node {spec['node']}"
    elif spec is not None:
        try:
            segment, reply = ShmSegment.open(spec["path"], bytes.fromhex(spec["token"])), "ok"
        except (OSError, WeightSyncError) as e:
            reply = f"cannot open {spec['path']}: {e}"
    try:
        store.set(f"transport/probe/{rank}", reply)
        store.wait(["transport/decision"], timeout)
        decision = store.get("transport/decision").decode()
    except BaseException:
        if segment is not None:
            segment.close()
        raise
    if decision == "shm" and segment is not None:
        return segment
    if segment is not None:
        segment.close()
    if decision.startswith("error:"):
        store.set(f"transport/error_read/{rank}", "1")  # rank 0 keeps the store up until every engine has read it
        raise WeightSyncError(decision.removeprefix("error:"))
    return None


def _await_engines_read_error(store: dist.Store, world_size: int, timeout: timedelta) -> None:
    """Hold rank 0's store open until the engines have read the refusal (else they see 'connection reset')."""
    limit = min(timeout, timedelta(seconds=30))
    try:
        store.wait([f"transport/error_read/{k}" for k in range(1, world_size)], limit)
    except Exception:  # an engine that died or hangs: rank 0's own error is what matters
        logger.debug("weight sync: not every engine confirmed reading the transport refusal", exc_info=True)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _gloo_group(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> dist.ProcessGroup:
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    device = (
        dist.ProcessGroupGloo.create_device(interface=iface)
        if iface
        else dist.ProcessGroupGloo.create_device(hostname=node_ip())
    )
    opts._devices = [device]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def _nccl_group(
    store: dist.Store, rank: int, world_size: int, timeout: timedelta
) -> tuple[dist.ProcessGroup, torch.device]:
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        raise WeightSyncError("weight sync backend 'nccl' needs CUDA and an NCCL build of torch; use 'gloo' on CPU")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    device = torch.device("cuda", torch.cuda.current_device())
    return dist.ProcessGroupNCCL(store, rank, world_size, opts), device
