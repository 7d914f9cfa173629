"""Offline sources, weighted mixing and held-out eval rows: seeded, and counted by hand."""

import json
from collections import Counter

import pytest

from rlhf.config import DataConfig, DatasetSpec
from rlhf.data.datasets import (
    check_data_config,
    holdout,
    load_offline_records,
    load_records,
    mix_records,
    mixture_counts,
)
from rlhf.data.sources import Record, read_records
from rlhf.errors import ConfigError, DataError


def _rows(name, n):
    return [Record({"text": f"{name}{i}"}, f"{name}.jsonl, line {i + 1}") for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Mixing


def test_mixture_counts_are_weight_shares_of_all_rows():
    # 4 + 8 = 12 rows; weights 3:1 → 9 and 3
    assert mixture_counts([4, 8], [3, 1]) == [9, 3]
    # 3 + 4 = 7 rows; weights 1:2 → quotas 2.33, 4.67 → floors 2, 4; the one left over goes to the larger remainder
    assert mixture_counts([3, 4], [1, 2]) == [2, 5]
    # 1 + 2 = 3 rows; quotas 1.5, 1.5 → a tie goes to the earlier source
    assert mixture_counts([1, 2], [1, 1]) == [2, 1]


def test_mix_repeats_whole_passes_of_a_small_source_and_samples_a_large_one():
    a, b = _rows("a", 4), _rows("b", 8)
    mixed = mix_records([a, b], [3, 1], seed=0)
    assert len(mixed) == 12
    from_a = Counter(r.fields["text"] for r in mixed if r.fields["text"].startswith("a"))
    from_b = Counter(r.fields["text"] for r in mixed if r.fields["text"].startswith("b"))
    # 9 draws from 4 rows: two full passes and one more row → every row 2 or 3 times
    assert sorted(from_a.values()) == [2, 2, 2, 3]
    # 3 draws from 8 rows: 3 distinct rows
    assert sorted(from_b.values()) == [1, 1, 1]
    assert all(r.where.startswith("a.jsonl") for r in mixed[:9])


def test_mix_is_seeded():
    a, b = _rows("a", 5), _rows("b", 5)
    first = [r.fields["text"] for r in mix_records([a, b], [1, 1], seed=3)]
    assert first == [r.fields["text"] for r in mix_records([a, b], [1, 1], seed=3)]
    assert first != [r.fields["text"] for r in mix_records([a, b], [1, 1], seed=4)]
    assert sorted(first) == sorted(
        f"{s}{i}" for s in "ab" for i in range(5)
    )  # equal weights, equal sizes: one pass each


# ---------------------------------------------------------------------------------------------
# Held-out eval rows


def test_holdout_takes_a_seeded_fraction_and_keeps_file_order():
    rows = _rows("a", 10)
    train, evaluation = holdout(rows, 0.2, seed=0)
    assert len(train) == 8 and len(evaluation) == 2
    assert {r.where for r in train} | {r.where for r in evaluation} == {r.where for r in rows}
    assert [r.where for r in train] == [r.where for r in rows if r in train]
    assert holdout(rows, 0.2, seed=0) == (train, evaluation)
    assert holdout(rows, 0.2, seed=1)[1] != evaluation
    with pytest.raises(ConfigError, match="holds out all 1 rows"):
        holdout(rows[:1], 0.9)


def test_eval_fraction_holds_out_rows_of_every_source_before_mixing(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(20)])
    data = DataConfig(eval=None, eval_fraction=0.1, mixture=[DatasetSpec(a, 1.0), DatasetSpec(b, 1.0)])
    records = load_offline_records(data, "text", seed=0)
    assert records.eval is not None and len(records.eval) == 1 + 2
    # train mixes the 9 + 18 rows left: 27 rows, half of them from each source
    assert len(records.train) == 27
    held_out = {r.fields["text"] for r in records.eval}
    assert not held_out & {r.fields["text"] for r in records.train}


# ---------------------------------------------------------------------------------------------
# Sources


def test_tiny_names_follow_the_stage_format(tiny_paths):
    records = load_offline_records(DataConfig(), "instruction")  # the RL defaults: train="tiny", eval="tiny:eval"
    assert records.train[0].where.startswith(str(tiny_paths.data("sft", "train")))
    assert records.eval is not None and records.eval[0].where.startswith(str(tiny_paths.data("sft", "eval")))
    kto = load_records("tiny:kto:eval")
    assert kto[0].where.startswith(str(tiny_paths.data("kto", "eval")))
    assert load_records("tiny:pretrain", split="eval")[0].where.startswith(str(tiny_paths.data("pretrain", "eval")))


@pytest.mark.parametrize("source", ["tiny:rl:train", "tiny:sft:test", "tiny:sft:train:x"])
def test_unknown_tiny_sources(source):
    with pytest.raises(
        ConfigError, match=r"use 'tiny:<kind>:<split>' with kind in pretrain, sft, preference, preference_hard, kto"
    ):
        load_records(source)


def test_rl_tiny_names_need_a_format():
    with pytest.raises(
        ConfigError, match=r"'tiny' names the tiny world's RL prompts; for offline data of format 'auto'"
    ):
        load_records("tiny", kind="auto")


def test_mixture_max_rows_and_a_tiny_source(tmp_path):
    local = _write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "1+1=", "response": "2"}] * 3)
    data = DataConfig(eval=None, mixture=[DatasetSpec("tiny:sft:train", 1.0, max_rows=5), DatasetSpec(local, 1.0)])
    records = load_offline_records(data, "instruction")
    assert records.eval is None
    # 5 + 3 = 8 rows, weights 1:1 → 4 each
    assert sum("extra.jsonl" in r.where for r in records.train) == 4
    assert len(records.train) == 8


def test_arrow_files_and_save_to_disk_directories(tmp_path):
    import datasets
    import pyarrow as pa

    table = pa.Table.from_pylist([{"text": "a"}, {"text": "b"}])
    with pa.OSFile(str(tmp_path / "rows.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    records = load_records(str(tmp_path / "rows.arrow"))
    assert [r.fields for r in records] == [{"text": "a"}, {"text": "b"}]
    assert records[1].where == f"{tmp_path / 'rows.arrow'}, row 2"
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"text": "t"}]), test=datasets.Dataset.from_list([{"text": "e"}])
    )
    splits.save_to_disk(str(tmp_path / "saved"))  # arrow shards next to dataset_dict.json/state.json
    assert [r.fields["text"] for r in read_records(tmp_path / "saved", split="test")] == ["e"]
    (tmp_path / "broken.arrow").write_text("not arrow")
    with pytest.raises(DataError, match=r"broken.arrow: not an Arrow IPC stream or file"):
        load_records(str(tmp_path / "broken.arrow"))


# ---------------------------------------------------------------------------------------------
# Config checks


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "chat"}, r"data.format='chat' is not one of auto, text"),
        ({"overlong": "cut"}, r"data.overlong='cut'"),
        ({"loss_on": "prompt"}, r"data.loss_on='prompt'"),
        ({"max_length": 1}, r"data.max_length must be >= 2"),
        ({"eval_fraction": 1.0}, r"data.eval_fraction must be in \[0, 1\)"),
        ({"eval_fraction": 0.1}, r"data.eval='tiny:eval' and data.eval_fraction=0.1 both choose"),
        ({"mixture": [DatasetSpec("a.jsonl", 0.0)]}, r"data.mixture\[0\].weight must be > 0"),
        ({"mixture": [DatasetSpec("", 1.0)]}, r"data.mixture\[0\].path is empty"),
        ({"mixture": [DatasetSpec("a.jsonl", 1.0, max_rows=0)]}, r"data.mixture\[0\].max_rows must be >= 1"),
    ],
)
def test_config_errors_say_what_to_change(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_data_config(DataConfig(**changes))
