"""A run through the CLI with a custom reward given by import path, plus DAPO's overlong penalty as a component."""

from __future__ import annotations

import functools

import pytest

from rlhf.utils.metrics import read_metrics

# 2 prompts × 4 samples = 8 sequences per step; 2 ranks × micro 4 = one optimizer step.
SMALL = [
    "run.rollout_batch_size=2",
    "rollout.n_samples_per_prompt=4",
    "policy.train_batch_size=8",
    "policy.micro_batch_size=4",
    "rollout.sampling.max_new_tokens=8",
    "rollout.backend=hf",
    "run.eval_every=0",
    "run.eval_size=4",
    "run.progress_bar=false",
    "run.tensorboard=false",
]


@pytest.fixture
def run_cli(rlhf_cli):
    """The console script (tests/conftest.py) with this file's SMALL sizes first."""
    return functools.partial(rlhf_cli, defaults=SMALL)


@pytest.mark.ray
def test_custom_reward_by_import_path_with_overlong_penalty(run_cli, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        tmp_path,
        "reward.fn=tests.fixtures.my_reward:score",
        "reward.components=[{fn: overlong_penalty, weight: 0.5, kwargs: {buffer: 4}}]",
        "run.total_steps=2",
        f"run.output_dir={out}",
    )
    proc.assert_ok()
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "policy/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert 0.0 <= row["reward/score_mean"] <= 1.0
        assert -1.0 <= row["reward/overlong_penalty_mean"] <= 0.0
        expected = row["reward/score_mean"] + 0.5 * row["reward/overlong_penalty_mean"]
        assert row["reward/mean"] == pytest.approx(expected, abs=1e-5)
    assert "reward: 1 × score + 0.5 × overlong_penalty" in proc.stderr + proc.stdout


def test_wrong_arity_fails_before_ray(run_cli, tmp_path):
    proc = run_cli(tmp_path, "reward.fn=tests.fixtures.my_reward:two_args", f"run.output_dir={tmp_path / 'bad'}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert (
        "reward.fn: reward function 'tests.fixtures.my_reward:two_args' must take (prompts, responses, metadata)"
        in text
    )
    assert not proc.used_ray
