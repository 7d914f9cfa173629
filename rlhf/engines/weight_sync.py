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

NCCL needs every rank on a GPU of its own: two ranks on one device fail at join with
"Duplicate GPU detected" (measured, NCCL 2.28 on one H100). A trainer and an engine colocated on
one GPU (cluster single_gpu) must use "gloo", which stages the buckets through host memory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf.errors import WeightSyncError
from rlhf.utils.distributed import free_port, node_ip

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "SyncStats", "WeightSyncGroup", "free_port", "node_ip"]

BACKENDS = ("gloo", "nccl")
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

    @property
    def gib_per_s(self) -> float:
        return self.num_bytes / max(self.seconds, 1e-9) / 2**30


class WeightSyncGroup:
    """One member of the weight-sync group; rank 0 sends, the other ranks receive."""

    def __init__(
        self,
        store: dist.Store,
        pg: dist.ProcessGroup,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float,
    ):
        self._store = store
        self._pg = pg
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self._round = 0
        self.last_stats = SyncStats()

    @classmethod
    def create(
        cls, host: str, port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 600.0
    ) -> WeightSyncGroup:
        """Join the group; blocks until all `world_size` ranks have joined (rank 0 hosts the store).

        Args:
            host: IP of rank 0's node (the trainer's rank 0; see `node_ip`).
            port: a free port on that node (see `free_port`), the same for every rank.
            rank: 0 for the sender, 1..world_size-1 for the engines.
            world_size: 1 + number of rollout engines.
            backend: "gloo" (CPU buffers) or "nccl" (buffers on the current CUDA device).
            timeout_s: limit for joining and for each later send/receive handshake and collective.
        """
        if backend not in BACKENDS:
            raise WeightSyncError(f"weight sync backend {backend!r} is not supported; use one of {BACKENDS}")
        if not 0 <= rank < world_size:
            raise WeightSyncError(f"weight sync rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        timeout = timedelta(seconds=timeout_s)
        what = f"weight sync rank {rank}/{world_size} ({backend}) at {host}:{port}"
        try:
            store = dist.TCPStore(host, port, world_size, rank == 0, timeout, wait_for_workers=False)
            store = dist.PrefixStore(_STORE_PREFIX, store)
            if backend == "gloo":
                pg, device = _gloo_group(store, rank, world_size, timeout), torch.device("cpu")
            else:
                pg, device = _nccl_group(store, rank, world_size, timeout)
            group = cls(store, pg, rank, world_size, device, timeout_s)
            # NCCL connects lazily, so every backend proves the group works with one tiny collective.
            group._broadcast(torch.zeros(1, dtype=torch.int64, device=device), "the join check")
        except WeightSyncError:
            raise
        except Exception as e:  # torch raises RuntimeError / DistError subclasses here
            raise WeightSyncError(
                f"{what} could not join within {timeout_s:g}s: {e}. Check that all {world_size} ranks call "
                f"WeightSyncGroup.create with the same host, port and world_size, that the port is free "
                f"on rank 0's node and reachable from the engines, or raise the timeout."
            ) from e
        logger.debug("%s joined", what)
        return group

    def send(self, named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int = 64 << 20) -> SyncStats:
        """Rank 0: stream `named_tensors` to every other rank in buckets of about `bucket_bytes`."""
        if self.rank != 0:
            raise WeightSyncError(f"only rank 0 sends weights; this is rank {self.rank}")
        if bucket_bytes <= 0:
            raise WeightSyncError(f"bucket_bytes must be positive, got {bucket_bytes}")
        start = time.perf_counter()
        self._round += 1
        self._wait_for_receivers()
        self._store.set(f"begin/{self._round}", "1")
        stats = SyncStats()
        try:
            self._send_buckets(named_tensors, bucket_bytes, stats)
        except WeightSyncError:
            raise  # the transport itself failed: the receivers see it too
        except BaseException:
            # The tensors' producer failed between buckets: release the receivers now, not at their timeout.
            self._broadcast(self._marker(_ABORTED), "the abort marker")
            raise
        self._broadcast(self._marker(_END_OF_STREAM), "the end-of-stream marker")
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        logger.info(
            "weight sync sent %d tensors, %.1f MiB in %d buckets, %.3fs (%.2f GiB/s)",
            stats.num_tensors,
            stats.num_bytes / 2**20,
            stats.num_buckets,
            stats.seconds,
            stats.gib_per_s,
        )
        return stats

    def receive(self) -> Iterator[tuple[str, Tensor]]:
        """Ranks > 0: yield (name, tensor) as buckets arrive, in the sender's order within a dtype.

        Tensors are views into a fresh buffer per bucket, so they stay valid after the next bucket
        arrives; copy them into the model and drop them. `last_stats` is set once the stream ends.
        """
        if self.rank == 0:
            raise WeightSyncError("rank 0 sends weights; receive() is for ranks > 0")
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
        """Drop the process group and the store connection (rank 0's store stops serving)."""
        pg, self._pg = self._pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception as e:  # best effort: the peer may already be gone
                logger.debug("weight sync group shutdown: %s", e)
        self._store = None

    # -- internals ---------------------------------------------------------------------------

    def _send_buckets(self, named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int, stats: SyncStats) -> None:
        """Pack tensors into one open bucket per dtype; send a bucket when the next tensor would overflow it."""
        pending: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
        pending_bytes: dict[torch.dtype, int] = {}
        for name, tensor in named_tensors:
            size = tensor.numel() * tensor.element_size()
            bucket = pending.setdefault(tensor.dtype, [])
            if bucket and pending_bytes[tensor.dtype] + size > bucket_bytes:
                self._send_bucket(bucket, stats)
                bucket.clear()
                pending_bytes[tensor.dtype] = 0
            bucket.append((name, tensor))
            pending_bytes[tensor.dtype] = pending_bytes.get(tensor.dtype, 0) + size
        for bucket in pending.values():
            if bucket:
                self._send_bucket(bucket, stats)

    def _marker(self, value: int) -> Tensor:
        return torch.tensor([value], dtype=torch.int64, device=self.device)

    def _send_bucket(self, bucket: list[tuple[str, Tensor]], stats: SyncStats) -> None:
        dtype = bucket[0][1].dtype
        entries, offset = [], 0
        for name, tensor in bucket:
            entries.append([name, list(tensor.shape), offset])
            offset += tensor.numel()
        flat = torch.empty(offset, dtype=dtype, device=self.device)
        for (_, tensor), (_, _, start) in zip(bucket, entries):
            flat[start : start + tensor.numel()].copy_(tensor.detach().reshape(-1))
        header = json.dumps({"dtype": str(dtype).removeprefix("torch."), "numel": offset, "entries": entries}).encode()
        header_tensor = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)
        self._broadcast(self._marker(len(header)), "a bucket header length")
        self._broadcast(header_tensor, "a bucket header")
        self._broadcast(flat.view(torch.uint8), "a bucket")
        stats.num_buckets += 1
        stats.num_tensors += len(bucket)
        stats.num_bytes += flat.numel() * flat.element_size()

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
