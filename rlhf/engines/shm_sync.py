"""A shared-memory segment for same-node weight sync: rank 0 writes the buckets, engines read views of them.

Over loopback gloo every byte is copied into a socket, through the kernel and out again (~0.3 GB/s
measured, benchmarks/README.md). When the trainer's rank 0 and every engine run on one node, a file in
a tmpfs (`/dev/shm`) mapped `MAP_SHARED` by all of them costs at most one copy on each side instead:
rank 0 copies each tensor into its place in the segment (straight from the ZeRO-3 gathered buffer or
the live parameter, as the exporter yields it), and the engines hand zero-copy views of it
to `load_weights(share=True)`. vLLM copies them into its own layout; the hf backend adopts the views
as its parameters, so there the sender's write is the whole transfer and the engines share one copy
of the weights (they change only inside the next `receive`, see weight_sync).

Lifecycle (see `WeightSyncGroup.create` for the handshake):
  1. rank 0 creates `<dir>/rlhf-wsync-<pid>-<random>` (O_EXCL, mode 0600), reserves `capacity` bytes
     with posix_fallocate (a full tmpfs fails here, not later with SIGBUS) and writes a random token;
  2. every engine on rank 0's Ray node (same node id; an engine elsewhere refuses without trying)
     opens the file by name and checks the token: the open proves they share the tmpfs (same
     /dev/shm mount), which a node id alone does not;
  3. rank 0 unlinks the name. The memory lives on while any process holds the descriptor or a
     mapping, and the kernel frees it when the last one exits, however it exits.
A name can only outlive its creator if rank 0 dies inside that join window; the pid in the name lets
the next `ShmSegment.create` on the node remove such leftovers (`remove_stale`).

Layout of one stream: buckets back to back from offset 0, each starting at a multiple of `ALIGN`;
a bucket holds tensors of one dtype packed in entry order (the same header as the collective path,
plus the bucket's byte offset). The segment grows (never shrinks) when a stream needs more room.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from rlhf.errors import WeightSyncError

logger = logging.getLogger(__name__)

__all__ = ["ALIGN", "PREFIX", "SHM_DIR", "SegmentBuckets", "ShmSegment", "read_bucket", "remove_stale"]

SHM_DIR = "/dev/shm"
PREFIX = "rlhf-wsync-"
ALIGN = 4096
TENSOR_ALIGN = 64
TOKEN_BYTES = 16


class ShmSegment:
    """One MAP_SHARED mapping of a tmpfs file; the owner (rank 0) writes and grows it, engines read it."""

    def __init__(self, fd: int, path: Optional[str], owner: bool, token: bytes, directory: str = SHM_DIR):
        self.fd = fd
        self.directory = directory
        self.path = path
        """The file's name while it still has one (None once unlinked)."""
        self.owner = owner
        self.token = token
        self._mm: Optional[mmap.mmap] = None
        self._buf: Optional[Tensor] = None
        self._reserved = 0
        """Owner: bytes known allocated (the writer asks per tensor; an fstat each time shows in a sync's time)."""

    @classmethod
    def create(cls, capacity: int, directory: str = SHM_DIR) -> ShmSegment:
        """A new named segment of at least `capacity` bytes, reserved now (WeightSyncError when it does not fit)."""
        remove_stale(directory)
        path = str(Path(directory) / f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise WeightSyncError(f"cannot create the weight-sync segment {path}: {e}") from e
        token = secrets.token_bytes(TOKEN_BYTES)
        segment = cls(fd, path, owner=True, token=token, directory=directory)
        try:
            segment.reserve(max(capacity, ALIGN))
            os.pwrite(fd, token, 0)
        except BaseException:
            segment.close()
            raise
        return segment

    @classmethod
    def open(cls, path: str, token: bytes) -> ShmSegment:
        """Open rank 0's segment by name; OSError/WeightSyncError when this process cannot see it."""
        fd = os.open(path, os.O_RDWR)
        if os.pread(fd, len(token), 0) != token:
            os.close(fd)
            raise WeightSyncError(f"{path} exists here but holds another segment (not the same node?)")
        return cls(fd, path=None, owner=False, token=token)

    @property
    def size(self) -> int:
        """Bytes in the file now (the owner may have grown it since this process mapped it)."""
        return os.fstat(self.fd).st_size

    def reserve(self, size: int) -> None:
        """Owner: make the file at least `size` bytes, with every page allocated."""
        if size <= self._reserved:
            return
        self._reserved = self.size
        if size <= self._reserved:
            return
        size = -(-size // ALIGN) * ALIGN
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            free = _free_bytes(self.directory)
            raise WeightSyncError(
                f"the weight-sync segment needs {size / 2**20:.0f} MiB of shared memory, the tmpfs has "
                f"{free / 2**20:.0f} MiB free ({e}). Enlarge /dev/shm (docker run --shm-size, a bigger "
                f"tmpfs) or set cluster.weight_sync_transport=collective."
            ) from e
        self._reserved = size

    def bytes(self, end: int) -> Tensor:
        """uint8 view of the segment's bytes [0, size), mapped again if it has grown past `end`."""
        if self._buf is None or self._buf.numel() < end:
            size = self.size
            if size < end:
                raise WeightSyncError(f"weight-sync segment is {size} bytes, a bucket ends at byte {end}")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            # Older views keep the old mapping alive; both map the same pages.
            self._mm = mmap.mmap(self.fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._buf = torch.frombuffer(self._mm, dtype=torch.uint8)
        return self._buf

    def unlink(self) -> None:
        """Remove the name (idempotent); the memory stays while descriptors or mappings do."""
        path, self.path = self.path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unlink the name if we still own one and drop our descriptor and mapping (views stay valid)."""
        if self.owner:
            self.unlink()
        self._buf, self._mm = None, None  # the mapping closes when the last view is gone
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class SegmentBuckets:
    """Rank 0's side of one stream (the target of `weight_sync.pack_buckets`): buckets back to back
    from offset 0, each tensor copied into its place as it arrives, each complete bucket's header
    handed to `publish` ({"offset", "dtype", "numel", "entries"}, the reader's `read_bucket` input)."""

    def __init__(self, segment: ShmSegment, publish: Callable[[dict[str, Any]], None]):
        self.segment = segment
        self.publish = publish
        self.offset = 0
        """Byte offset of the open bucket (a multiple of ALIGN)."""

    @staticmethod
    def tensor_start(numel: int, itemsize: int) -> int:
        """Element offset at which the next tensor of a bucket holding `numel` elements starts: each
        tensor starts on a TENSOR_ALIGN-byte boundary, so an engine may adopt the views as its weights."""
        step = max(1, TENSOR_ALIGN // itemsize)
        return -(-numel // step) * step

    def view(self, dtype: torch.dtype, numel: int) -> Tensor:
        """The open bucket as `numel` elements of `dtype` (the segment grows to hold them)."""
        end = self.offset + numel * dtype.itemsize
        self.segment.reserve(end)
        return self.segment.bytes(end)[self.offset : end].view(dtype)

    def emit(self, dtype: torch.dtype, numel: int, entries: list[list[Any]]) -> None:
        """The open bucket is complete: publish it; the next one starts after it."""
        header = {"offset": self.offset, "dtype": str(dtype).removeprefix("torch."), "numel": numel, "entries": entries}
        self.offset = aligned(self.offset + numel * dtype.itemsize)
        self.publish(header)


def read_bucket(segment: ShmSegment, header: dict[str, Any]) -> list[tuple[str, Tensor]]:
    """Zero-copy (name, tensor) views of a bucket `SegmentBuckets` published."""
    dtype = getattr(torch, header["dtype"])
    offset, numel = header["offset"], header["numel"]
    end = offset + numel * dtype.itemsize
    flat = segment.bytes(end)[offset:end].view(dtype)
    out = []
    for name, shape, start in header["entries"]:
        n = 1
        for d in shape:
            n *= d
        out.append((name, flat[start : start + n].view(shape)))
    return out


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def remove_stale(directory: str = SHM_DIR) -> list[str]:
    """Unlink segments whose creating process is gone (rank 0 died during a join); returns their paths."""
    removed = []
    try:
        candidates = list(Path(directory).glob(f"{PREFIX}*"))
    except OSError:
        return removed
    for path in candidates:
        pid_text = path.name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            path.unlink()
            removed.append(str(path))
        except OSError:
            continue
    if removed:
        logger.info("removed %d stale weight-sync segment(s): %s", len(removed), removed)
    return removed


def shm_available(directory: str = SHM_DIR) -> bool:
    return Path(directory).is_dir() and os.access(directory, os.W_OK)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize
