"""`rlhf stage=online_dpo` end to end: real Ray, a DeepSpeed policy, a reference actor, HF rollout, the tiny world."""

from __future__ import annotations

import functools

import pytest

from rlhf.utils.metrics import read_metrics

pytestmark = [pytest.mark.ray]

SMALL = [
    "stage=online_dpo",
    "data.train=tiny:train:copy+reverse",
    "data.eval=tiny:eval:copy+reverse",
    "run.rollout_batch_size=8",
    "rollout.n_samples_per_prompt=4",
    "rollout.backend=hf",
    "rollout.sampling.max_new_tokens=8",
    "policy.num_workers=1",
    "policy.train_batch_size=2",
    "policy.micro_batch_size=2",
    "policy.optim.lr=3e-5",
    "run.eval_size=8",
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
]


@pytest.fixture
def run_cli(rlhf_cli):
    """The console script (tests/conftest.py) with this file's SMALL sizes first."""
    return functools.partial(rlhf_cli, defaults=SMALL)


@pytest.mark.slow  # tests/integration/online_dpo runs two rounds and a resume in the default suite
def test_two_rounds_end_to_end(run_cli, tmp_path):
    out = tmp_path / "run"
    # reference=previous here: the integration tests train with a reference model (initial)
    proc = run_cli(tmp_path, "run.total_steps=2", "online_dpo.reference=previous", f"run.output_dir={out}")
    proc.assert_ok()
    rounds = [r for r in read_metrics(out / "metrics.jsonl") if "online_dpo/pairs" in r]
    assert [r["step"] for r in rounds] == [1, 2]
    assert all("reward/mean" in r and "eval/accuracy" in r for r in rounds)  # stage yaml: eval_every 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert (out / "final" / "model.safetensors").exists() and (out / "config.yaml").exists()


def test_config_error_fails_before_ray(run_cli, tmp_path):
    proc = run_cli(tmp_path, "policy.train_batch_size=16", f"run.output_dir={tmp_path / 'bad'}", timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "ConfigError: a round pairs at most one best/worst sample per prompt" in text
    assert not proc.used_ray
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
