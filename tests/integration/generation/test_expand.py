"""Seed-prompt expansion (generate.expand) on real Ray and the hf rollout backend, with a scripted model.

Which case a sampled continuation hits must not depend on what a trained model happens to write, so
the model here is a bigram automaton built by hand (rlhf.models.tiny.build_scripted_model): its next
token depends only on the current one. Prompts are plain text (no chat template) and the template is
the bare "{examples}" with one shot, so an attempt's prompt is "Task 1: <seed>" and what the model
writes is fixed by the seed's last character (SCRIPT). Sampling stays at temperature 1, top_p 1: every
unscripted token has probability exactly 0. Each filter is forced by construction:

  seed       writes (the line)  verdict
  "long 0"   "abcdefghijk"      too_long: 11 tokens > data.max_prompt_length 10
  "cut 1"    "zzz..."           unparseable: the 12-token limit cuts the line
  "new 2"    "pq"               accepted the first time, then exact_duplicate of the kept "pq"
  "rs tu 3"  "rs tu"            near_duplicate of the seed: ROUGE-L F1 0.8 > 0.7
  "unused 4" ""                 empty (end of turn at once); never shown in the 16 attempts
  "none 5"   ""                 empty

(each line ends in a newline, expansion's stop string, except the cut one),

and which seed attempt a shows is choose_shots(6, 1, run.seed=0, a), a pure function. The filters
themselves are checked on fixed strings in tests/unit/data/test_expansion.py and tests/unit/trainers/test_expand.py.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations

import pytest

from rlhf.data.expansion import REJECT_REASONS, choose_shots, normalize, rouge_l, words
from rlhf.errors import ConfigError
from rlhf.trainers import expand as expand_module
from rlhf.trainers import generate as generate_module
from rlhf.trainers.generate import prepare_generation, read_rows, run_generate

from .conftest import compose_config

pytestmark = pytest.mark.ray

SEEDS = ["long 0", "cut 1", "new 2", "rs tu 3", "unused 4", "none 5"]
CHAIN = "abcdefghijk"
SCRIPT: dict[str, str | list[str]] = {
    **{a: b for a, b in zip("0" + CHAIN, CHAIN + "\n")},  # 0 -> a -> b -> ... -> k -> newline
    "1": "z",
    "z": "z",
    **{a: b for a, b in zip("2pq", "pq\n")},
    **{a: b for a, b in zip("3rs tu", "rs tu\n")},
    "4": "<|end|>",
    "5": "<|end|>",
    "\n": "<|end|>",
}
MAX_NEW_TOKENS = 12
LINES = {0: CHAIN, 1: "z" * MAX_NEW_TOKENS, 2: "pq", 3: "rs tu", 4: "", 5: ""}
"""What the scripted model writes after seed i, up to expansion's stop string (a newline) or its token limit."""
VERDICTS = {0: "too_long", 1: "unparseable", 2: "accepted", 3: "near_duplicate", 4: "empty", 5: "empty"}
"""The verdict on seed i's continuation the first time (an accepted one is an exact duplicate after that)."""
ATTEMPTS = 16
EXPAND = [
    "generate.max_prompts=6",
    "generate.shard_size=8",
    "reward.fn=null",
    "data.use_chat_template=false",
    "data.max_prompt_length=10",
    "generate.expand.enabled=true",
    "generate.expand.num_new=8",
    f"generate.expand.max_attempts={ATTEMPTS}",
    "generate.expand.shots=1",
    "generate.expand.template='{examples}'",
    "generate.expand.sampling.temperature=1.0",
    "generate.expand.sampling.top_p=1.0",
    f"generate.expand.sampling.max_new_tokens={MAX_NEW_TOKENS}",
]


def expected_verdicts() -> list[tuple[int, int, str]]:
    """(attempt, seed shown, verdict) of every attempt, from the script alone."""
    rows, accepted = [], set()
    for attempt in range(ATTEMPTS):
        (seed,) = choose_shots(len(SEEDS), 1, run_seed=0, attempt=attempt)
        verdict = VERDICTS[seed]
        if verdict == "accepted":
            verdict = "exact_duplicate" if seed in accepted else verdict
            accepted.add(seed)
        rows.append((attempt, seed, verdict))
    return rows


@pytest.fixture(scope="module")
def expand_args(scripted_checkpoint, tmp_path_factory) -> list[str]:
    """EXPAND plus the scripted model and the seed file."""
    seeds = tmp_path_factory.mktemp("seeds") / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in SEEDS))
    return [f"model.path={scripted_checkpoint(SCRIPT)}", f"data.train={seeds}", *EXPAND]


def rows_of(root, subset):
    return [row for path in sorted((root / subset).glob("*.jsonl")) for row in read_rows(path)]


def set_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("expanded*/*")) if p.is_file()}


@pytest.fixture(scope="module")
def expanded_then_sampled(ray_cluster, expand_args, tmp_path_factory):
    """One uninterrupted run: expansion, then 2 samples per seed and per kept instruction."""
    out = tmp_path_factory.mktemp("expand") / "gen"
    overrides = [f"generate.output={out}", "generate.expand.then_generate=true", "rollout.n_samples_per_prompt=2"]
    cfg = compose_config("generate", out.parent, *expand_args, *overrides)
    return out, run_generate(cfg)


def test_every_filter_sees_the_continuation_it_is_built_for(expanded_then_sampled):
    out, result = expanded_then_sampled
    kept, rejected = rows_of(out, "expanded"), rows_of(out, "expanded_rejected")
    summary = json.loads((out / "expansion.json").read_text())
    assert summary["complete"] and summary["num_seeds"] == 6

    # every attempt got the verdict the script forces, in attempt order, with the seed it was shown
    expected = expected_verdicts()
    by_attempt = sorted(kept + rejected, key=lambda r: r["attempt"])
    assert [(r["attempt"], r["seed_indices"], r.get("reason", "accepted")) for r in by_attempt] == [
        (a, [seed], verdict) for a, seed, verdict in expected
    ]
    # 16 attempts, one instruction kept (num_new 8 is never reached), every rejection reason occurs
    counts = Counter(verdict for _, _, verdict in expected)
    assert counts == {
        "accepted": 1,
        "exact_duplicate": 4,
        "too_long": 6,
        "unparseable": 2,
        "near_duplicate": 2,
        "empty": 1,
    }
    assert summary["counts"] == {"accepted": 1, **{r: counts[r] for r in REJECT_REASONS}}
    assert summary["attempts"] == ATTEMPTS == sum(summary["counts"].values()) == result["expand/attempts"]
    assert result["expand/accepted"] == 1 and all(result[f"expand/{r}"] == counts[r] for r in REJECT_REASONS)

    # each rejected row carries the model's text and the filter's evidence
    for row in rejected:
        (seed,) = row["seed_indices"]
        assert row["response"] == LINES[seed]
        assert row["finish_reason"] == ("length" if seed == 1 else "stop")
        evidence = {k: row[k] for k in ("instruction", "prompt_tokens", "similarity", "closest")}
        assert evidence == {
            "too_long": {"instruction": CHAIN, "prompt_tokens": 11, "similarity": None, "closest": None},
            "unparseable": {"instruction": None, "prompt_tokens": None, "similarity": None, "closest": None},
            "empty": {"instruction": None, "prompt_tokens": None, "similarity": None, "closest": None},
            "exact_duplicate": {"instruction": "pq", "prompt_tokens": 2, "similarity": 1.0, "closest": "pq"},
            # [rs, tu] vs [rs, tu, 3]: LCS 2, P = 1, R = 2/3, F = 0.8
            "near_duplicate": {"instruction": "rs tu", "prompt_tokens": 5, "similarity": pytest.approx(0.8), "closest": "rs tu 3"},
        }[row["reason"]]  # fmt: skip

    # the kept instruction, with its provenance: the seed shown to attempt 0, as drawn from (run.seed, attempt)
    assert kept == [
        {"expansion_index": 0, "prompt": "pq", "prompt_tokens": 2, "attempt": 0, "seed_indices": [2],
         "similarity": 0.0, "closest": None}
    ]  # fmt: skip
    for a, b in combinations([r["prompt"] for r in kept] + SEEDS, 2):
        assert normalize(a) != normalize(b) and rouge_l(words(a), words(b)) <= 0.7


def test_then_generate_samples_the_seeds_and_the_new_prompts(expanded_then_sampled):
    out, result = expanded_then_sampled
    samples = rows_of(out, "samples")
    assert result["generate/complete"] == 1.0 and len(samples) == (6 + 1) * 2
    assert [row["prompt"] for row in samples[::2]] == [*SEEDS, "pq"]
    assert [row["origin"] for row in samples[::2]] == ["seed"] * 6 + ["expanded"]
    # rollout.sampling: 8 new tokens and no stop string; "pq" ends in q, which the script follows with a newline
    responses = ["abcdefgh", "z" * 8, "pq\n", "rs tu\n", "", "", "\n"]
    assert [row["response"] for row in samples] == [r for r in responses for _ in range(2)]
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["num_prompts"] == 7 and manifest["rows"] == len(samples)


def test_interrupted_expansion_resumes_without_duplicate_rows(
    expanded_then_sampled, expand_args, tmp_path, monkeypatch, crash_in_second_shard
):
    """A crash while writing round 1, then a rerun: the same rows as the uninterrupted run, none twice.

    Round 1 (attempts 8-15) holds an exact duplicate of round 0's kept "pq" (attempt 12), so the rerun
    matches only if it replays round 0's kept rows into the dedup pool.
    """
    whole, _ = expanded_then_sampled
    out = tmp_path / "gen"
    cfg = compose_config("generate", tmp_path, *expand_args, f"generate.output={out}")
    crash_in_second_shard(out, "expanded", written=("expanded_rejected",))  # half a round on disk
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_generate(cfg)
    monkeypatch.undo()
    assert [p.name for p in sorted((out / "expanded").iterdir())] == [
        ".train-00001-of-00002.jsonl.tmp",
        "train-00000-of-00002.jsonl",
    ]
    result = run_generate(cfg)
    assert set_bytes(out) == set_bytes(whole)  # round 1 rewritten whole, nothing appended twice
    assert [r["reason"] for r in rows_of(out, "expanded_rejected") if r["attempt"] == 12] == ["exact_duplicate"]
    assert not (out / "samples").exists() and result["expand/accepted"] == len(rows_of(whole, "expanded"))

    # a finished expansion rerun reads its rows back and starts no engines
    def no_engines(*args, **kwargs):
        raise AssertionError("engines started for a finished expansion")

    monkeypatch.setattr(generate_module.SampleEngines, "__init__", no_engines)
    assert run_generate(cfg) == result


def test_expansion_config_errors_before_ray(expand_args, tmp_path):
    def prepare(*overrides):
        return prepare_generation(compose_config("generate", tmp_path, *expand_args, *overrides))

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
