"""Per-tensor checksums of a weight sync: what the trainer sent against what each engine loaded.

A sync that "succeeds" but leaves an engine on other weights (an adapter that never reached it, a tensor
the loader skipped or transposed, a shared-memory bucket overwritten before it was read) makes the engines
sample from a policy the trainer does not train: nothing crashes, the run learns wrongly. Every sync
therefore fingerprints each tensor on both sides (`weight_sync/checksums`) and the controller compares them.

The checksum reads the tensor's bytes as integer words w_i (as wide as its elements) and sums, with int64 wrap-around,

    s1 = Σ w_i        s2 = Σ w_i · (1 + i mod 65521)

so a changed word changes s1 and s2, and a permutation of the words (a transposed square matrix) changes s2.
It runs with torch ops on the tensor's own device, in chunks (bounded temporaries), one host sync per tensor:
a pass over the weights at memory bandwidth, next to the copy the sync makes anyway. Not a cryptographic
hash: it guards against bugs, not adversaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_CHUNK = 1 << 22  # words per chunk: two int64 temporaries of 32 MiB
_MODULUS = 65521  # the largest prime below 2^16 (Adler-32's): position weights stay small

_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16}
Checksums = list[tuple[str, str]]
"""(tensor name, checksum) in the order the tensors travelled."""


def tensor_checksum(tensor: Tensor) -> str:
    """ "<s1>:<s2>" in hex of the tensor's bytes (module docstring); equal bytes give equal checksums."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return "0:0"
    # words as wide as the dtype's elements: a view into a bucket is always aligned to those, so the same bytes
    # give the same words wherever they sit
    words = flat.view(_WORDS.get(flat.element_size(), torch.uint8))
    s1 = torch.zeros((), dtype=torch.int64, device=words.device)
    s2 = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start : start + _CHUNK].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=words.device)
        s1 += chunk.sum()
        s2 += (chunk * (position % _MODULUS + 1)).sum()
    both = torch.stack([s1, s2]).tolist()
    return f"{both[0] & (2**64 - 1):x}:{both[1] & (2**64 - 1):x}"


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
