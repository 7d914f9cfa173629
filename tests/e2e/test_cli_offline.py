"""The console script on offline stages: real Ray (started by the CLI), 2 DeepSpeed ranks, tiny world."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from rlhf.utils.metrics import read_metrics

pytestmark = [pytest.mark.ray]


# 8 examples per optimizer step (2 ranks × micro 2 × 2 accumulation steps)
SMALL = [
    "policy.train_batch_size=8",
    "policy.micro_batch_size=2",
    "policy.optim.warmup_steps=0",
    "policy.optim.scheduler=constant",
    "run.eval_size=16",
    "run.eval_every=0",
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
]


@pytest.fixture
def run_cli(rlhf_cli):
    """The console script (tests/conftest.py) with this file's SMALL sizes first."""
    return functools.partial(rlhf_cli, defaults=SMALL)


@pytest.mark.slow  # SFT through the CLI with resume: tests/e2e/test_pipelines.py (default)
def test_sft_runs_saves_and_resumes(run_cli, tmp_path):
    out = tmp_path / "sft"
    common = ["stage=sft", "data.mixture=[{path:'tiny:sft:train',max_rows:64}]", f"run.output_dir={out}"]
    run_cli(tmp_path, *common, "offline.max_steps=2", "run.save_every=2", "policy.optim.lr=1e-4").assert_ok()
    assert (out / "checkpoints" / "step_00000002" / "trainer_state.json").exists()
    assert (out / "final" / "model.safetensors").exists() and (out / "config.yaml").exists()
    # resume=auto continues at step 3 with the same loader position and optimizer state; then
    # run.final_eval samples the saved final model on 8 held-out prompts (2 samples + 1 greedy each)
    final_eval = ["run.final_eval=true", "eval.max_prompts=8", "eval.n_samples=2", "eval.k=[1,2]",
                  "rollout.backend=hf", "rollout.sampling.max_new_tokens=8"]  # fmt: skip
    run_cli(tmp_path, *common, "offline.max_steps=4", "policy.optim.lr=1e-4", *final_eval).assert_ok()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "sft/loss" in r]
    assert steps == [1, 2, 3, 4]
    results = json.loads((out / "final_eval" / "eval_results.json").read_text())
    assert Path(results["model"]).resolve() == (out / "final").resolve() and results["prompts"] == 8
    assert 0.0 <= results["metrics"]["eval/pass@1"] <= results["metrics"]["eval/pass@2"] <= 1.0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final").config.model_type == "qwen2"


def test_dpo_runs_with_precomputed_reference(run_cli, tmp_path):
    out = tmp_path / "dpo"
    proc = run_cli(
        tmp_path,
        "stage=dpo",
        "data.mixture=[{path:'tiny:preference_hard:train',max_rows:32}]",
        "offline.max_steps=3",
        f"run.output_dir={out}",
    )
    proc.assert_ok()
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "dpo/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # step 1 trains from the reference's weights: h = 0, loss = log 2 (float noise of two forwards)
    assert train[0]["dpo/loss"] == pytest.approx(0.6931, abs=1e-3)
    assert any("eval/reward_accuracy" in r for r in rows)
    assert (out / "final" / "model.safetensors").exists()


def test_config_error_exits_before_ray_starts(run_cli, tmp_path):
    proc = run_cli(tmp_path, "stage=kto", "policy.train_batch_size=10", "policy.micro_batch_size=4")
    text = proc.stderr + proc.stdout
    assert proc.returncode == 2, text[-3000:]
    assert "policy.train_batch_size 10 examples is not divisible by policy.micro_batch_size 4 × " in text
    assert not proc.used_ray
