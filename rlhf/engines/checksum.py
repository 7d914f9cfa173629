"""Per-tensor checksums of a weight sync: what the trainer sent against what each engine loaded.

A sync that "succeeds" but leaves an engine on other weights (an adapter that never reached it, a tensor
the loader skipped or transposed, a shared-memory bucket overwritten before it was read) makes the engines
sample from a policy the trainer does not train: nothing crashes, the run learns wrongly. Every sync
therefore fingerprints each tensor on both sides (`weight_sync/checksums`) and the controller compares them.

The checksum reads the tensor's bytes as integer words w_i (as wide as its elements) and sums them, and
for two widths W (1024 and the prime 1021) the column sums of the words laid out W to a row, weighted by column:

    s = Σ w_i        c_W = Σ_i w_i · (1 + i mod W)        (int64, wrap-around)

so a changed word changes s, and moved words (a transposed square matrix, swapped blocks) change c_1024 or
c_1021. Each is one reduction pass with torch ops on the tensor's own device and no temporary the size of the
tensor; integer sums do not depend on the summation order, so the CPU and a GPU agree. ~0.06 s per 27M float32
parameters on one CPU thread, next to the copy the sync makes anyway. Not a cryptographic hash: it guards
against bugs, not adversaries.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_WIDTHS = (1024, 1021)  # row widths of the column-weighted sums: a power of two and a prime near it

_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16}
Checksums = list[tuple[str, str]]
"""(tensor name, checksum) in the order the tensors travelled."""


def tensor_checksum(tensor: Tensor) -> str:
    """ "<s>:<c_1024>:<c_1021>" in hex of the tensor's bytes (module docstring): equal bytes, equal checksums."""
    flat = tensor.detach().contiguous().reshape(-1)
    # words as wide as the dtype's elements: a view into a bucket is always aligned to those, so the same bytes
    # give the same words wherever they sit
    words = flat.view(_WORDS.get(flat.element_size(), torch.uint8))
    n = words.numel()
    if n <= min(_WIDTHS):  # one row at either width: c_1024 = c_1021, one pass (biases, norms)
        wide = words.to(torch.int64)
        values = torch.stack([wide.sum(), (wide * _positions(n, words.device)).sum()]).tolist()
        values.append(values[1])
    else:
        total, weighted = None, []
        for width in _WIDTHS:
            rows = n // width
            columns = words[: rows * width].view(rows, width).sum(0, dtype=torch.int64)
            tail = words[rows * width :]
            columns[: tail.numel()] += tail.to(torch.int64)
            weighted.append((columns * _positions(width, words.device)).sum())
            total = columns.sum()
        values = torch.stack([total, *weighted]).tolist()
    return ":".join(f"{v & (2**64 - 1):x}" for v in values)


@functools.lru_cache(maxsize=16)
def _positions(count: int, device: torch.device) -> Tensor:
    """1, 2, ..., count as int64 on `device` (cached: the same few lengths recur for every tensor)."""
    return torch.arange(1, count + 1, dtype=torch.int64, device=device)


def checksums(named_tensors: Iterable[tuple[str, Tensor]]) -> Checksums:
    return [(name, tensor_checksum(tensor)) for name, tensor in named_tensors]


def differences(sent: Checksums, loaded: Checksums) -> tuple[list[str], list[str], list[str]]:
    """(names whose checksums differ, names sent but not loaded, names loaded but never sent)."""
    expected, got = dict(sent), dict(loaded)
    differ = [name for name, value in sent if name in got and got[name] != value]
    missing = [name for name, _ in sent if name not in got]
    extra = [name for name, _ in loaded if name not in expected]
    return differ, missing, extra


def describe(names: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
