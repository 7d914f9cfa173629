"""Reading dataset rows from local files, directories or the Hugging Face Hub, with locations.

Local json/jsonl/csv/parquet/arrow files are read directly rather than through `datasets`, for two
reasons: every row keeps a human-readable location ("prompts.jsonl, line 4") that validation
errors quote, and a row whose field has an unexpected type reaches our validation (which says
which field of which row to fix) instead of failing Arrow schema inference with a message that
names neither. Hub datasets go through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
DATASETS_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files `datasets.save_to_disk` writes next to its .arrow shards; they describe rows, hold none."""


@dataclass(frozen=True)
class Record:
    """One dataset row and where it came from, for error messages."""

    fields: dict[str, Any]
    where: str  # e.g. "data/prompts.jsonl, line 4" or "openai/gsm8k [train], row 7"


def looks_like_path(source: str) -> bool:
    """True for strings that can only mean a local path (a Hub name is "name" or "org/name")."""
    return source.startswith(("/", "~", ".")) or source.count("/") > 1 or "\\" in source or source.endswith(SUFFIXES)


DATASET_FIELDS = ("data.train", "data.eval", "eval.data", "eval.samples")
"""Config fields that name a dataset a run reads (besides data.mixture[i].path); see `check_dataset_paths`."""


def check_dataset_paths(cfg: Any, produced: Collection[Path] = ()) -> None:
    """ConfigError naming the field when a dataset field (DATASET_FIELDS, data.mixture[i].path) can only
    be a local path (`looks_like_path`) and nothing exists there, unless the path lies in one of the
    `produced` directories (what an earlier pipeline step writes). Hub names and tiny-world names pass:
    they are checked when the run loads them."""
    values = [(field, _field_value(cfg, field)) for field in DATASET_FIELDS]
    values += [(f"data.mixture[{i}].path", spec.path) for i, spec in enumerate(cfg.data.mixture)]
    for field, source in values:
        if not source or not looks_like_path(source) or Path(source).expanduser().exists():
            continue
        if is_produced(source, produced):
            continue
        raise ConfigError(
            f"{field}={source!r}: no dataset file or directory there (relative paths start from {Path.cwd()}); "
            "fix the path, or give a Hub dataset name like 'openai/gsm8k'"
        )


def is_produced(path: str | Path, produced: Collection[Path]) -> bool:
    """`path` is, or lies inside, one of the `produced` directories (given resolved)."""
    resolved = Path(path).expanduser().resolve()
    return any(resolved == p or p in resolved.parents for p in produced)


def _field_value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def read_records(source: str | Path, *, split: str = "train") -> list[Record]:
    """Rows of a local file, a local directory of files, or a Hub dataset (`split` picks one).

    A directory holds files with a suffix in SUFFIXES (searched recursively); those whose path
    names the split ("train.jsonl", "data/test-00000.parquet") are read, or every file when none
    does and split is "train".
    """
    path = Path(source).expanduser()
    if path.is_file():
        records = _read_file(path)
    elif path.is_dir():
        records = [r for f in _split_files(path, split) for r in _read_file(f)]
    elif isinstance(source, Path) or looks_like_path(source):
        raise DataError(
            f"dataset file or directory {str(source)!r} does not exist; check the path (relative paths start from {Path.cwd()})"
        )
    else:
        records = _read_hub(source, split)
    if not records:
        raise DataError(f"dataset {str(source)!r} (split {split!r}) has no rows")
    return records


def _split_files(directory: Path, split: str) -> list[Path]:
    files = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES) and p.name not in DATASETS_METADATA
    )
    if not files:
        raise DataError(f"directory {str(directory)!r} holds no {'/'.join(SUFFIXES)} files")
    names_split = re.compile(rf"(^|[\W_]){re.escape(split)}([\W_]|$)")
    chosen = [f for f in files if names_split.search(str(f.relative_to(directory)))]
    if chosen:
        return chosen
    if split == "train":
        return files
    listing = ", ".join(str(f.relative_to(directory)) for f in files[:10])
    raise DataError(
        f"directory {str(directory)!r} has no file for split {split!r} (files: {listing}); name one after the split, e.g. {split}.jsonl"
    )


def _read_file(path: Path) -> list[Record]:
    if path.name.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.name.endswith(".json"):
        return _read_json(path)
    if path.name.endswith(".csv"):
        return _read_csv(path)
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e}); write it with pyarrow or pandas") from None
        return [Record(row, f"{path}, row {i + 1}") for i, row in enumerate(table.to_pylist())]
    if path.name.endswith(".arrow"):
        return [Record(row, f"{path}, row {i + 1}") for i, row in enumerate(_read_arrow(path).to_pylist())]
    raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; DataError naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: byte {data[e.start : e.start + 1]!r} is not UTF-8 text; re-save the file as UTF-8"
        ) from None


def _read_csv(path: Path) -> list[Record]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    records = []
    try:
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if None in row:  # more values than header columns
                raise DataError(
                    f"{where}: {len(row[None]) + len(reader.fieldnames or [])} values but the header has "
                    f"{len(reader.fieldnames or [])} columns ({', '.join(reader.fieldnames or []) or 'none'}); "
                    "quote values that contain commas"
                )
            records.append(Record(dict(row), where))
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
    return records


def _read_arrow(path: Path):
    """An Arrow IPC file: the stream format `datasets.save_to_disk` writes, or the random-access file format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        pass
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid as e:
        raise DataError(
            f"{path}: not an Arrow IPC stream or file ({e}); write it with pyarrow or datasets.save_to_disk"
        ) from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):  # not splitlines: U+2028 is valid in JSON
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None
        except RecursionError:
            raise DataError(f"{path}, line {number}: JSON nested too deeply to read") from None
        records.append(_as_record(row, f"{path}, line {number}"))
    return records


def _read_json(path: Path) -> list[Record]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json suffix, as many Hub datasets are
            return _read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON list of row objects (or an object with one list of rows), got an object with keys {sorted(data)}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    return [_as_record(row, f"{path}, row {i + 1}") for i, row in enumerate(data)]


def _as_record(row: Any, where: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected a JSON object with named fields, got {type(row).__name__} {str(row)[:60]!r}"
        )
    return Record(row, where)


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # the Hub raises many types (connection, missing split, missing repo...)
        raise DataError(
            f"could not load dataset {name!r} split {split!r} from the Hugging Face Hub: {e}. "
            "For a local file or directory, give a path that exists"
        ) from e
    return [Record(dict(row), f"{name} [{split}], row {i + 1}") for i, row in enumerate(dataset)]
