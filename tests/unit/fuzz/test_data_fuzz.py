"""Dataset fuzzing: malformed jsonl/json/csv/parquet files and column maps may only raise DataError
(or ConfigError for a bad setting), and a DataError names the file (and the row, when one row is at fault)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.config import DataConfig
from rlhf.data.datasets import load_records
from rlhf.data.examples import FORMATS, encode_dataset
from rlhf.data.prompts import load_prompt_dataset
from rlhf.errors import ConfigError, DataError

KEYS = ["prompt", "answer", "response", "completion", "messages", "text", "chosen", "rejected", "label", "margin", "x"]
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5),
        st.floats(allow_nan=True),
        st.text(max_size=8),
        st.sampled_from(["user", "assistant", "system", "yes", "true", "0"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["role", "content", "x", *KEYS]), children, max_size=3),
    ),
    max_leaves=6,
)
rows = st.lists(
    st.one_of(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5), json_values), min_size=0, max_size=4
)
garbage = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode))


@st.composite
def dataset_file(draw) -> tuple[str, bytes]:
    """(suffix, file content): well-formed containers of odd rows, or plain garbage."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
    if draw(st.booleans()):
        return suffix, draw(garbage)
    data = draw(rows)
    if suffix == ".jsonl":
        return suffix, "\n".join(json.dumps(r) for r in data).encode()
    if suffix == ".json":
        return suffix, json.dumps(draw(st.sampled_from([data, {"rows": data}, {"a": data, "b": data}]))).encode()
    if suffix == ".csv":
        lines = draw(
            st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12), max_size=4)
        )
        return suffix, "\n".join([",".join(draw(st.lists(st.sampled_from(KEYS), max_size=4))), *lines]).encode()
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    dicts = [r for r in data if isinstance(r, dict)]
    buffer = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(dicts), buffer)
    except (pa.ArrowException, TypeError, ValueError):  # mixed or empty column types: Arrow cannot store them
        buffer = io.BytesIO()
        pq.write_table(pa.table({"prompt": [json.dumps(r) for r in data]}), buffer)
    return suffix, buffer.getvalue()


column_maps = st.fixed_dictionaries(
    {
        "prompt_key": st.sampled_from(KEYS),
        "answer_key": st.sampled_from([*KEYS, None]),
    }
)


def write(directory: str, suffix: str, content: bytes) -> Path:
    path = Path(directory) / f"data{suffix}"
    path.write_bytes(content)
    return path


def assert_names_file(error: DataError, path: Path) -> None:
    assert path.name in str(error), f"DataError does not name the file: {error}"


@settings(max_examples=60, deadline=None)
@given(file=dataset_file(), keys=column_maps)
def test_prompt_loader_raises_only_data_errors(file, keys):
    with tempfile.TemporaryDirectory() as directory:
        path = write(directory, *file)
        try:
            load_prompt_dataset(str(path), **keys)
        except DataError as e:
            assert_names_file(e, path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rlhf.data.tiny_world import tiny_world_dir

    return AutoTokenizer.from_pretrained(tiny_world_dir().tokenizer_dir)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file=dataset_file(),
    kind=st.sampled_from([*FORMATS, "auto"]),
    keys=st.fixed_dictionaries({k: st.sampled_from(KEYS) for k in ("prompt_key", "response_key", "chosen_key")}),
    chat=st.booleans(),
)
def test_offline_loader_raises_only_data_errors(tokenizer, file, kind, keys, chat):
    with tempfile.TemporaryDirectory() as directory:
        path = write(directory, *file)
        cfg = DataConfig(max_length=16, use_chat_template=chat, **keys)
        try:
            encode_dataset(load_records(str(path), kind=kind), tokenizer, cfg, kind)
        except DataError as e:
            assert_names_file(e, path)
        except ConfigError as e:  # e.g. the same column chosen for two roles
            assert "data." in str(e)


@pytest.mark.parametrize(
    "suffix,content,where",
    [
        (".jsonl", b'{"prompt": "a"}\n{"prompt": \xff}\n', "line 2"),
        (".csv", b"prompt,answer\nok,1\n\xff\xfe,2\n", "data.csv"),
        (".parquet", b"PAR1 not really parquet", "data.parquet"),
        (".json", b"[" * 100_000, "data.json"),
        (".jsonl", b'{"prompt": {"role": "user"}}\n', "line 1"),
    ],
)
def test_known_malformed_files_name_file_and_row(tmp_path, suffix, content, where):
    path = write(str(tmp_path), suffix, content)
    with pytest.raises(DataError, match=where):
        load_prompt_dataset(str(path))
