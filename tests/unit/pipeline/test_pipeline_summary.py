"""The summary lines a recipe ends with: per step first -> last held-out metrics and reward trend, per recipe the accuracy chain."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.pipeline import recipe_summary, step_summary


def write_metrics(step_dir: Path, rows: list[dict]) -> Path:
    step_dir.mkdir(parents=True)
    (step_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return step_dir


def test_offline_step_shows_its_first_and_last_evaluation_and_final_accuracy(tmp_path):
    rows = [{"step": 0, "eval/loss": 0.6931, "eval/reward_accuracy": 0.0}]
    rows += [{"step": s, "dpo/loss": 0.5} for s in range(1, 4)]
    rows += [{"step": 4, "eval/loss": 0.25, "eval/reward_accuracy": 0.9}]
    step_dir = write_metrics(tmp_path / "dpo", rows)
    line = step_summary("dpo", step_dir, {"final_eval/accuracy": 0.9056, "final_eval/sampled_accuracy": 0.784})
    assert line == (
        "step dpo: eval/loss 0.693 -> 0.250; eval/reward_accuracy 0.000 -> 0.900; held-out accuracy 0.906 (sampled 0.784)"
    )


def test_rl_step_follows_the_raw_reward_model_score_not_the_whitened_mean(tmp_path):
    # reward/mean of batch-whitened reward-model scores is ~0 every step; the raw score is what moves
    rows = [{"step": s, "reward/mean": 1e-9 * (-1) ** s, "reward/model_raw_mean": 0.1 * s} for s in range(1, 21)]
    rows[9]["eval/accuracy"], rows[19]["eval/accuracy"] = 0.7, 0.8
    line = step_summary("ppo", write_metrics(tmp_path / "ppo", rows), {})
    # first 10 steps: mean of 0.1..1.0 = 0.55; last 10: mean of 1.1..2.0 = 1.55
    assert (
        line
        == "step ppo: eval/accuracy 0.700 -> 0.800; reward/model_raw_mean first 10 steps 0.550 -> last 10 steps 1.550"
    )


def test_recipe_line_chains_the_held_out_accuracy_of_the_steps_that_measured_it():
    results = {
        "sft": {"final_eval/accuracy": 0.65},
        "rm": {"eval/accuracy": 0.99},
        "ppo": {"final_eval/accuracy": 0.83},
    }
    assert recipe_summary("sft_rm_ppo", results) == (
        "recipe sft_rm_ppo: held-out accuracy (greedy, run.final_eval) sft 0.650 -> ppo 0.830 (+0.180)"
    )
    assert "no step measured" in recipe_summary("x", {"sft": {"eval/loss": 1.0}})


def test_step_without_metrics_file_says_so(tmp_path):
    assert step_summary("a", tmp_path / "missing", {}) == "step a: no held-out metrics logged"
