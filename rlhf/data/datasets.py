"""Offline datasets: load rows from files, the Hub or the tiny world; mix weighted sources; hold out eval rows.

Sources (`load_records`):
  a local .json/.jsonl/.csv/.parquet/.arrow file or a directory of them (rlhf.data.sources;
  `datasets.save_to_disk` directories included), a Hub dataset name (through `datasets`), or a
  tiny-world file "tiny:<kind>:<split>" with kind in pretrain, sft, preference, preference_hard,
  kto, carry_sft, carry_cot, cot and split in train, eval (rlhf.data.tiny_world). "tiny", "tiny:train" and
  "tiny:eval" (the RL defaults of data.train/data.eval) mean the tiny file of the stage's format:
  text → pretrain, instruction/messages → sft, preference → preference, kto → kto.

Mixing (`mix_records`, DataConfig.mixture): the mixture has as many rows as its sources
together (N = Σ n_i, after each source's max_rows). Source i gets c_i = w_i / Σw × N rows,
rounded down, with the rows left over going to the largest remainders (ties: the earlier
source). Its rows are drawn by shuffling them with random.Random("<seed>:mix:<i>") and taking
them in that order, reshuffling for another pass when c_i > n_i; so every row of a source
appears floor(c_i / n_i) or one more times. The mixture lists source 0's draws, then source 1's...;
the loader shuffles.

Held-out eval (`holdout`, DataConfig.eval_fraction with eval=None): round(fraction × n_i) rows
of each source, picked with random.Random("<seed>:holdout:<i>"), before mixing, so no eval row
is ever drawn into train.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf.data.examples import FORMATS, LOSS_ON, OVERLONG
from rlhf.data.sources import Record, read_records
from rlhf.errors import ConfigError

if TYPE_CHECKING:
    from rlhf.config import DataConfig

logger = logging.getLogger(__name__)

TINY_OFFLINE_KINDS = (
    "pretrain", "sft", "preference", "preference_hard", "kto", "carry_sft", "carry_cot", "cot", "tool_sft", "tool_plain",
)  # fmt: skip
"""tool_sft / tool_plain: the tool world's demonstrations with and without calculator calls (tiny_world.tool_file)."""
TINY_KIND_OF_FORMAT = {
    "text": "pretrain",
    "instruction": "sft",
    "messages": "sft",
    "preference": "preference",
    "kto": "kto",
}
EVAL_SPLIT = "test"
"""The split read when data.eval names a directory or a Hub dataset."""


@dataclass
class OfflineRecords:
    """The rows of an offline stage: train (mixed when a mixture is set) and eval (None: no evaluation)."""

    train: list[Record]
    eval: list[Record] | None


def check_data_config(data: DataConfig) -> None:
    """The offline fields of DataConfig; ConfigError saying what to change."""
    if data.format not in (*FORMATS, "auto"):
        raise ConfigError(f"data.format={data.format!r} is not one of auto, {', '.join(FORMATS)}")
    if data.overlong not in OVERLONG:
        raise ConfigError(f"data.overlong={data.overlong!r} is not one of {', '.join(OVERLONG)}")
    if data.loss_on not in LOSS_ON:
        raise ConfigError(f"data.loss_on={data.loss_on!r} is not one of {', '.join(LOSS_ON)}")
    if data.max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2 (one prompt and one response token), got {data.max_length}")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {data.eval_fraction}")
    if data.eval_fraction > 0 and data.eval:
        raise ConfigError(
            f"data.eval={data.eval!r} and data.eval_fraction={data.eval_fraction} both choose the eval rows; "
            "set data.eval=null to hold out a fraction of train, or data.eval_fraction=0"
        )
    for i, spec in enumerate(data.mixture):
        if not spec.path:
            raise ConfigError(f"data.mixture[{i}].path is empty; name a file, directory, Hub dataset or tiny source")
        if not spec.weight > 0:
            raise ConfigError(f"data.mixture[{i}].weight must be > 0 (got {spec.weight}); remove the source instead")
        if spec.max_rows is not None and spec.max_rows < 1:
            raise ConfigError(f"data.mixture[{i}].max_rows must be >= 1 or null (got {spec.max_rows})")


def load_offline_records(data: DataConfig, kind: str, *, seed: int = 0) -> OfflineRecords:
    """Train and eval rows of an offline stage whose rows have format `kind` (see the module docstring).

    Train is data.mixture when set, else data.train. Eval is data.eval (a directory or Hub
    dataset is read at its "test" split), or, when data.eval is None and data.eval_fraction > 0,
    rows held out of every train source; None when neither.
    """
    check_data_config(data)
    sources = [(s.path, s.weight, s.split, s.max_rows) for s in data.mixture] or [(data.train, 1.0, "train", None)]
    parts, weights, held_out = [], [], []
    for i, (path, weight, split, max_rows) in enumerate(sources):
        records = load_records(path, split=split, kind=kind)[:max_rows]
        if data.eval_fraction > 0:
            records, eval_part = holdout(records, data.eval_fraction, seed=seed, index=i, name=path)
            held_out += eval_part
        parts.append(records)
        weights.append(weight)
    train = mix_records(parts, weights, seed=seed) if data.mixture else parts[0]
    if data.eval:
        evaluation: list[Record] | None = load_records(data.eval, split=EVAL_SPLIT, kind=kind)
    else:
        evaluation = held_out or None
    logger.info(
        "offline data (%s): %d train rows from %s, %d eval rows",
        kind, len(train), ", ".join(s[0] for s in sources), len(evaluation or []),
    )  # fmt: skip
    return OfflineRecords(train, evaluation)


def load_records(source: str, *, split: str = "train", kind: str | None = None) -> list[Record]:
    """Rows of one source: a tiny-world name, or anything rlhf.data.sources.read_records reads.

    `kind` (a row format) resolves the RL tiny names "tiny", "tiny:train" and "tiny:eval" to the
    tiny file of that format; `split` applies to "tiny" and "tiny:<kind>", directories and Hub names.
    """
    source = str(source)
    if source == "tiny" or source.startswith("tiny:"):
        return read_records(_tiny_path(source, split, kind))
    return read_records(source, split=split)


def _tiny_path(source: str, split: str, kind: str | None):
    from rlhf.data.tiny_world import SPLITS, tiny_data_file

    parts = source.split(":")
    usage = (
        f"use 'tiny:<kind>:<split>' with kind in {', '.join(TINY_OFFLINE_KINDS)} and split in {', '.join(SPLITS)} "
        "(e.g. 'tiny:sft:train')"
    )
    if len(parts) <= 2 and (len(parts) == 1 or parts[1] in SPLITS):  # "tiny", "tiny:train", "tiny:eval"
        if kind not in TINY_KIND_OF_FORMAT:
            raise ConfigError(
                f"{source!r} names the tiny world's RL prompts; for offline data of format {kind!r}, {usage}"
            )
        parts = ["tiny", TINY_KIND_OF_FORMAT[kind], parts[1] if len(parts) == 2 else split]
    elif len(parts) == 2:  # "tiny:<kind>"
        parts.append(split)
    if len(parts) != 3 or parts[1] not in TINY_OFFLINE_KINDS or parts[2] not in SPLITS:
        raise ConfigError(f"unknown tiny offline source {source!r}; {usage}")
    return tiny_data_file(parts[1], parts[2])


def mix_records(parts: Sequence[Sequence[Record]], weights: Sequence[float], *, seed: int = 0) -> list[Record]:
    """Rows of several sources in proportion to `weights` (the rule is in the module docstring)."""
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"need one weight per source, got {len(parts)} sources and {len(weights)} weights")
    counts = mixture_counts([len(p) for p in parts], weights)
    mixed: list[Record] = []
    for i, (records, count) in enumerate(zip(parts, counts)):
        rng = random.Random(f"{seed}:mix:{i}")
        drawn: list[Record] = []
        while len(drawn) < count:
            order = list(records)
            rng.shuffle(order)
            drawn += order[: count - len(drawn)]
        mixed += drawn
    logger.info(
        "mixture: %s",
        ", ".join(f"source {i}: {c} rows drawn from {len(p)} (weight {w:g})" for i, (p, c, w) in enumerate(zip(parts, counts, weights))),
    )  # fmt: skip
    return mixed


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Rows each source contributes: weight shares of sum(sizes), largest remainder rounding."""
    total, weight_sum = sum(sizes), float(sum(weights))
    quotas = [w / weight_sum * total for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def holdout(
    records: Sequence[Record], fraction: float, *, seed: int = 0, index: int = 0, name: str = "train"
) -> tuple[list[Record], list[Record]]:
    """(train, eval): round(fraction × n) rows picked with a seeded RNG go to eval; both keep file order."""
    n_eval = round(fraction * len(records))
    if n_eval >= len(records):
        raise ConfigError(f"data.eval_fraction={fraction} holds out all {len(records)} rows of {name}; lower it")
    chosen = set(random.Random(f"{seed}:holdout:{index}").sample(range(len(records)), n_eval))
    train = [r for i, r in enumerate(records) if i not in chosen]
    evaluation = [r for i, r in enumerate(records) if i in chosen]
    return train, evaluation
