"""Seed-prompt expansion (generate.expand) on real Ray and the hf rollout backend, the tiny "tiny" policy.

Seeds: the first 6 prompts of tiny:eval:copy+reverse ("copy dcbec=", ...), one shown per attempt with
the bare template "{examples}", sampled at temperature 1. The tiny policy answers "Task 1: copy dcbec="
with short letter strings, often the same one twice and sometimes nothing, so exact duplicates, empty
and cut-off (unparseable) instructions all occur for real; the similarity maths is checked by hand in
tests/unit/data/test_expansion.py.
"""

from __future__ import annotations

import json
from itertools import combinations

import pytest

from rlhf.data.expansion import REJECT_REASONS, choose_shots, normalize, rouge_l, words
from rlhf.errors import ConfigError
from rlhf.trainers import expand as expand_module
from rlhf.trainers import generate as generate_module
from rlhf.trainers.generate import prepare_generation, read_rows, run_generate

from .conftest import compose_config

pytestmark = pytest.mark.ray

SEEDS = ["copy dcbec=", "copy cdab=", "copy ceb=", "copy bddcae=", "copy beecc=", "copy cbbe="]
EXPAND = [
    "data.train=tiny:eval:copy+reverse",
    "generate.max_prompts=6",
    "generate.shard_size=8",
    "reward.fn=null",
    "generate.expand.enabled=true",
    "generate.expand.num_new=8",
    "generate.expand.max_attempts=16",
    "generate.expand.shots=1",
    "generate.expand.template='{examples}'",
    "generate.expand.sampling.temperature=1.0",
    "generate.expand.sampling.top_p=1.0",
    "generate.expand.sampling.max_new_tokens=12",
]


def rows_of(root, subset):
    return [row for path in sorted((root / subset).glob("*.jsonl")) for row in read_rows(path)]


def set_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("expanded*/*")) if p.is_file()}


@pytest.fixture(scope="module")
def expanded_then_sampled(ray_cluster, tmp_path_factory):
    """One uninterrupted run: expansion, then 2 samples per seed and per kept instruction."""
    out = tmp_path_factory.mktemp("expand") / "gen"
    overrides = [f"generate.output={out}", "generate.expand.then_generate=true", "rollout.n_samples_per_prompt=2"]
    cfg = compose_config("generate", out.parent, *EXPAND, *overrides)
    return out, run_generate(cfg)


def test_expansion_writes_deduplicated_prompts_with_provenance(expanded_then_sampled):
    out, result = expanded_then_sampled
    kept, rejected = rows_of(out, "expanded"), rows_of(out, "expanded_rejected")
    summary = json.loads((out / "expansion.json").read_text())
    assert summary["complete"] and summary["num_seeds"] == 6

    # the counts add up, on disk and in the metrics: every attempt 0..N-1 is in exactly one set, once
    counts = summary["counts"]
    assert counts["accepted"] == len(kept) == result["expand/accepted"]
    assert all(counts[r] == sum(row["reason"] == r for row in rejected) for r in REJECT_REASONS)
    assert summary["attempts"] == len(kept) + len(rejected) == sum(counts.values()) == result["expand/attempts"]
    assert sorted(r["attempt"] for r in kept + rejected) == list(range(summary["attempts"]))
    assert len(kept) == 8 or summary["attempts"] == 16  # stopped at num_new or at max_attempts
    # dedup and filters ran for real on the tiny model's output
    assert len(kept) >= 1 and counts["exact_duplicate"] >= 1 and counts["empty"] + counts["unparseable"] >= 1

    # no duplicates: not of a seed, not of each other, exactly or by ROUGE-L > 0.7
    keys = [normalize(r["prompt"]) for r in kept]
    assert len(set(keys)) == len(keys) and not set(keys) & {normalize(s) for s in SEEDS}
    for a, b in combinations([r["prompt"] for r in kept] + SEEDS, 2):
        assert rouge_l(words(a), words(b)) <= 0.7
    for row in rejected:
        if row["reason"] == "exact_duplicate":
            assert normalize(row["instruction"]) == normalize(row["closest"]) and row["similarity"] == 1.0
        if row["reason"] in ("empty", "unparseable"):
            assert row["instruction"] is None

    # provenance: the seed shown to each attempt, as drawn from (run.seed, attempt)
    for index, row in enumerate(kept):
        assert row["expansion_index"] == index and row["prompt_tokens"] > 0
        assert row["seed_indices"] == choose_shots(6, 1, run_seed=0, attempt=row["attempt"])
    assert all(len(r["seed_indices"]) == 1 and 0 <= r["seed_indices"][0] < 6 for r in rejected)


def test_then_generate_samples_the_seeds_and_the_new_prompts(expanded_then_sampled):
    out, result = expanded_then_sampled
    kept = rows_of(out, "expanded")
    samples = rows_of(out, "samples")
    assert result["generate/complete"] == 1.0 and len(samples) == (6 + len(kept)) * 2
    prompts = [row["prompt"] for row in samples[::2]]
    assert prompts == SEEDS + [r["prompt"] for r in kept]
    assert [row["origin"] for row in samples[::2]] == ["seed"] * 6 + ["expanded"] * len(kept)
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["num_prompts"] == 6 + len(kept) and manifest["rows"] == len(samples)


def test_interrupted_expansion_resumes_without_duplicate_rows(expanded_then_sampled, tmp_path, monkeypatch):
    """A crash while writing round 1, then a rerun: the same rows as the uninterrupted run, none twice."""
    whole, _ = expanded_then_sampled
    out = tmp_path / "gen"
    cfg = compose_config("generate", tmp_path, *EXPAND, f"generate.output={out}")
    real_write, calls = generate_module.ShardStore.write, []

    def crash_in_second_round(store, k, subsets):
        calls.append(k)
        if len(calls) == 2:
            real_write(store, k, {"expanded_rejected": subsets["expanded_rejected"]})  # half a round on disk
            (out / "expanded" / f".{store.path('expanded', k).name}.tmp").write_text('{"half": ')
            raise RuntimeError("simulated crash")
        real_write(store, k, subsets)

    monkeypatch.setattr(generate_module.ShardStore, "write", crash_in_second_round)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_generate(cfg)
    monkeypatch.undo()
    assert [p.name for p in sorted((out / "expanded").iterdir())] == [
        ".train-00001-of-00002.jsonl.tmp",
        "train-00000-of-00002.jsonl",
    ]
    result = run_generate(cfg)
    assert set_bytes(out) == set_bytes(whole)  # round 1 rewritten whole, nothing appended twice
    assert not (out / "samples").exists() and result["expand/accepted"] == len(rows_of(whole, "expanded"))

    # a finished expansion rerun reads its rows back and starts no engines
    def no_engines(*args, **kwargs):
        raise AssertionError("engines started for a finished expansion")

    monkeypatch.setattr(generate_module.SampleEngines, "__init__", no_engines)
    assert run_generate(cfg) == result


def test_expansion_config_errors_before_ray(tmp_path):
    def prepare(*overrides):
        return prepare_generation(compose_config("generate", tmp_path, *EXPAND, *overrides))

    with pytest.raises(ConfigError, match="shots=7 but data.train has 6 seed prompts"):
        prepare("generate.expand.shots=7")
    with pytest.raises(ConfigError, match="max_attempts 5 < num_new 8"):
        prepare("generate.expand.max_attempts=5")
    with pytest.raises(ConfigError, match="must contain \\{examples\\}"):
        prepare("generate.expand.template='Task {next}:'")
    with pytest.raises(ConfigError, match="similarity_threshold"):
        prepare("generate.expand.similarity_threshold=0")
    with pytest.raises(ConfigError, match="no reference answer"):
        prepare("generate.expand.then_generate=true", "reward.fn=tiny_world")
    out = tmp_path / "gen"
    out.mkdir()
    (out / expand_module.SUMMARY).write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(ConfigError, match="expansion made with other settings"):
        prepare(f"generate.output={out}")
