"""Reading rows from local files and directories, with locations for error messages."""

import json

import pytest

from rlhf.config import DatasetSpec, RLHFConfig
from rlhf.data.sources import check_dataset_paths, looks_like_path, read_records
from rlhf.errors import ConfigError, DataError

ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        path.write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    "kind, first", [("jsonl", "line 1"), ("json", "row 1"), ("csv", "line 2"), ("parquet", "row 1")]
)
def test_every_file_type_reads_the_same_rows(tmp_path, kind, first):
    path = _write(tmp_path / f"prompts.{kind}", ROWS, kind)
    records = read_records(str(path))
    assert [r.fields for r in records] == ROWS
    assert records[0].where == f"{path}, {first}"


def test_json_lines_in_a_json_file_and_a_wrapped_list(tmp_path):
    (tmp_path / "a.json").write_text('{"prompt": "x", "answer": "1"}\n{"prompt": "y", "answer": "2"}\n')
    assert len(read_records(tmp_path / "a.json")) == 2
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    assert [r.fields for r in read_records(tmp_path / "b.json")] == ROWS


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert [r.where.rsplit(", ", 1)[1] for r in read_records(path)] == ["line 1", "line 3"]


def test_directory_picks_the_split_files(tmp_path):
    _write(tmp_path / "train.jsonl", ROWS, "jsonl")
    _write(tmp_path / "eval.jsonl", ROWS[:1], "jsonl")
    assert len(read_records(tmp_path, split="train")) == 2
    assert len(read_records(tmp_path, split="eval")) == 1
    with pytest.raises(DataError, match="no file for split 'test'.*eval.jsonl, train.jsonl"):
        read_records(tmp_path, split="test")


def test_directory_without_split_names_is_the_train_split(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "part-0.jsonl", ROWS, "jsonl")
    _write(tmp_path / "part-1.csv", ROWS, "csv")
    assert len(read_records(tmp_path)) == 4


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b",}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_records(path)


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n["b"]\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: expected a JSON object.*got list"):
        read_records(path)


def test_missing_path_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        read_records("./data/nope")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        read_records(tmp_path / "empty.jsonl")


@pytest.mark.parametrize(
    "source, is_path",
    [
        ("openai/gsm8k", False),
        ("gsm8k", False),
        ("./gsm8k", True),
        ("/data/x", True),
        ("~/x", True),
        ("a/b/c", True),
        ("prompts.jsonl", True),
    ],
)
def test_looks_like_path(source, is_path):
    assert looks_like_path(source) is is_path


def test_dataset_fields_must_exist_when_they_can_only_be_local_paths(tmp_path):
    cfg = RLHFConfig()
    cfg.data.train = str(_write(tmp_path / "train.jsonl", ROWS, "jsonl"))
    cfg.eval.data = "openai/gsm8k"  # a Hub name: checked when loaded
    check_dataset_paths(cfg)  # data.eval "tiny:eval": the tiny world's
    cfg.data.mixture = [DatasetSpec(path=str(tmp_path / "missing.parquet"))]
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].path='.*missing.parquet': no dataset file or directory"):
        check_dataset_paths(cfg)
    check_dataset_paths(cfg, produced=[tmp_path.resolve()])  # an earlier pipeline step writes it
