"""stage=generate on real Ray and the hf rollout backend, the tiny world's "tiny" policy.

Prompts are the first 12 of tiny:eval (mixed tasks), 4 samples each at temperature 1.
"""

from __future__ import annotations

import json

import pytest

from rlhf.data.tiny_world import check_answer
from rlhf.errors import ConfigError
from rlhf.trainers.generate import prepare_generation, read_rows, run_generate

from .conftest import compose_config

pytestmark = pytest.mark.ray

PROMPTS = ["data.train=tiny:eval", "generate.max_prompts=12", "generate.shard_size=4"]


def shard_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*")) if p.is_file()}


def test_generate_rejection_sampling_sets(ray_cluster, tmp_path):
    out = tmp_path / "gen"
    cfg = compose_config(
        "generate", tmp_path, *PROMPTS, f"generate.output={out}", "generate.keep=best", "generate.pairs=true"
    )
    result = run_generate(cfg)
    assert result["generate/complete"] == 1.0 and result["generate/rows"] == 12 * 4
    samples = [row for path in sorted((out / "samples").iterdir()) for row in read_rows(path)]
    assert [(r["prompt_index"], r["sample_index"]) for r in samples] == [(i, j) for i in range(12) for j in range(4)]
    for row in samples:
        assert row["score"] == float(check_answer(row["response"], row["answer"]))  # tiny_world reward
        assert row["finish_reason"] in ("stop", "length") and 1 <= row["response_tokens"] <= 8
        assert isinstance(row["prompt"], str) and row["prompt_tokens"] > 0 and "task" in row
    by_prompt = {i: [r for r in samples if r["prompt_index"] == i] for i in range(12)}
    sft = [row for path in sorted((out / "sft").iterdir()) for row in read_rows(path)]
    # best-of-4 keeps one correct sample per prompt that has one, the first correct by sample index
    solved = [i for i, rows in by_prompt.items() if any(r["score"] >= 1 for r in rows)]
    assert [r["prompt_index"] for r in sft] == solved
    for row in sft:
        first_correct = next(r for r in by_prompt[row["prompt_index"]] if r["score"] >= 1)
        assert row["sample_index"] == first_correct["sample_index"] and row["response"] == first_correct["response"]
    pairs = [row for path in sorted((out / "preference").iterdir()) for row in read_rows(path)]
    mixed = [i for i, rows in by_prompt.items() if len({r["score"] for r in rows}) > 1]
    assert [p["prompt_index"] for p in pairs] == mixed
    assert all(p["chosen_score"] > p["rejected_score"] and p["margin"] > 0 for p in pairs)
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 48 and manifest["sft_rows"] == len(sft)


def test_generated_sets_load_as_sft_and_preference_data(ray_cluster, scripted_checkpoint, tmp_path):
    """The SFT/DPO stages' loaders accept the written sets; Hugging Face `datasets` loads them too.

    The sets must not be empty whatever a trained model samples, so the model is scripted
    (rlhf.models.tiny.build_scripted_model): after the chat prompt's last token it writes "a" or "b",
    each with probability exactly 1/2, then ends its turn. Every prompt's answer is "a", so a sample
    is right or wrong by a coin flip: no right sample in 48 has probability 2^-48, no prompt with a
    right and a wrong one among its 4 samples (8^-12).
    """
    from datasets import load_dataset

    from rlhf.data.datasets import load_records
    from rlhf.data.examples import encode_dataset
    from rlhf.models.loading import load_tokenizer

    model = scripted_checkpoint({"\n": ["a", "b"], "a": "<|end|>", "b": "<|end|>"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"copy a{i}=", "answer": "a"}) + "\n" for i in range(12)))
    out = tmp_path / "gen"
    cfg = compose_config(
        "generate",
        tmp_path,
        f"model.path={model}",
        f"data.train={prompts}",
        "generate.shard_size=4",
        f"generate.output={out}",
        "generate.format=parquet",
        "generate.keep=above_threshold",
        "generate.pairs=true",
    )
    run_generate(cfg)
    rows = [row for path in sorted((out / "samples").iterdir()) for row in read_rows(path)]
    assert {(r["response"], r["score"]) for r in rows} == {("a", 1.0), ("b", 0.0)}
    mixed = [i for i in range(12) if len({r["response"] for r in rows if r["prompt_index"] == i}) == 2]
    tokenizer = load_tokenizer(model)
    samples = encode_dataset(load_records(str(out / "samples")), tokenizer, cfg.data, "auto")
    assert samples.kind == "instruction" and len(samples) == 48
    sft = encode_dataset(load_records(str(out / "sft")), tokenizer, cfg.data, "auto")
    assert sft.kind == "instruction" and len(sft) == sum(r["response"] == "a" for r in rows)
    pairs = encode_dataset(load_records(str(out / "preference")), tokenizer, cfg.data, "auto")
    assert pairs.kind == "preference" and len(pairs) == len(mixed)
    hf = load_dataset(str(out / "samples"), split="train")
    assert hf.num_rows == 48 and {"prompt", "response", "score", "finish_reason"} <= set(hf.column_names)
    written = load_dataset(str(out / "preference"), split="train")
    assert set(written["chosen"]) == {"a"} and set(written["rejected"]) == {"b"}


def test_interrupted_generation_resumes_to_identical_rows(ray_cluster, tmp_path, monkeypatch, crash_in_second_shard):
    """A crash after the first shard, plus a half-written temporary file, then a rerun: the same bytes."""
    whole = compose_config("generate", tmp_path, *PROMPTS, f"generate.output={tmp_path / 'whole'}")
    run_generate(whole)

    out = tmp_path / "resumed"
    cfg = compose_config("generate", tmp_path, *PROMPTS, f"generate.output={out}")
    crash_in_second_shard(out, "samples")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_generate(cfg)
    monkeypatch.undo()
    assert [p.name for p in sorted((out / "samples").iterdir())] == [
        ".train-00001-of-00003.jsonl.tmp",
        "train-00000-of-00003.jsonl",
    ]
    first_shard = (out / "samples" / "train-00000-of-00003.jsonl").read_bytes()
    # job slicing: one more shard, then the rest
    assert run_generate(compose_config("generate", tmp_path, *PROMPTS, f"generate.output={out}", "generate.max_shards_per_run=1"))["generate/complete"] == 0.0  # fmt: skip
    assert run_generate(cfg)["generate/complete"] == 1.0
    assert (out / "samples" / "train-00000-of-00003.jsonl").read_bytes() == first_shard  # not regenerated
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")


def test_other_settings_in_the_output_dir_are_refused(ray_cluster, tmp_path):
    out = tmp_path / "gen"
    cfg = compose_config("generate", tmp_path, *PROMPTS, f"generate.output={out}", "generate.max_shards_per_run=1")
    run_generate(cfg)
    changed = compose_config(
        "generate", tmp_path, *PROMPTS, f"generate.output={out}", "rollout.sampling.temperature=0.7"
    )
    with pytest.raises(ConfigError, match="other settings"):
        prepare_generation(changed)


def test_config_errors_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="generate.format"):
        prepare_generation(compose_config("generate", tmp_path, "generate.format=csv"))
    with pytest.raises(ConfigError, match="rank samples by their reward"):
        prepare_generation(compose_config("generate", tmp_path, "generate.keep=best", "reward.fn=null"))
    with pytest.raises(ConfigError, match="n_samples_per_prompt >= 2"):
        prepare_generation(
            compose_config("generate", tmp_path, "generate.pairs=true", "rollout.n_samples_per_prompt=1")
        )
