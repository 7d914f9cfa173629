"""`rlhf stage=distill` end to end: real Ray, a 2-rank DeepSpeed student, a teacher actor, the tiny world."""

from __future__ import annotations

import functools

import pytest

from rlhf.utils.metrics import read_metrics

pytestmark = [pytest.mark.ray]

SMALL = [
    "stage=distill",
    "policy.num_workers=2",
    "policy.micro_batch_size=4",
    "policy.train_batch_size=8",
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


@pytest.mark.slow  # the distill trainer: tests/integration/distill (default); the CLI path: the other e2e tests
def test_offline_distill_runs_end_to_end(run_cli, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(tmp_path, "distill.loss=jsd", "distill.top_k=16", "run.total_steps=2", f"run.output_dir={out}")
    proc.assert_ok()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "distill/jsd" in r] == [1, 2]
    assert rows[0]["step"] == 0 and "eval/forward_kl" in rows[0] and "eval/forward_kl" in rows[-1]
    assert (out / "final" / "model.safetensors").exists() and (out / "config.yaml").exists()


@pytest.mark.slow  # three CLI runs; the offline and RL resume tests keep the mechanism in the default suite
def test_offline_distill_resumes_from_its_last_checkpoint(run_cli, tmp_path):
    """Stopped after step 2 and rerun with resume=auto, step 3's loss equals an uninterrupted run's."""
    common = [
        "distill.top_k=16",
        "policy.optim.lr=1e-3",
        "policy.optim.warmup_steps=0",
        "policy.optim.scheduler=constant",  # the same LR at step 3 whatever run.total_steps says
        "data.eval=null",
        "run.save_every=1",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    for out, steps in ((full, 3), (part, 2), (part, 4)):
        proc = run_cli(tmp_path, *common, f"run.total_steps={steps}", f"run.output_dir={out}")
        proc.assert_ok()
    assert "resuming from" in proc.stdout + proc.stderr
    a = {r["step"]: r for r in read_metrics(full / "metrics.jsonl") if "distill/loss" in r}
    b = {r["step"]: r for r in read_metrics(part / "metrics.jsonl") if "distill/loss" in r}
    assert sorted(b) == [1, 2, 3, 4]  # 1-2 from the first run, 3-4 from the resumed one
    assert b[3]["distill/loss"] == pytest.approx(a[3]["distill/loss"], rel=1e-4)
    assert b[2]["distill/loss"] == pytest.approx(a[2]["distill/loss"], rel=1e-4)
    assert b[4]["distill/loss"] != pytest.approx(b[3]["distill/loss"], rel=1e-4)  # it kept training
    # keep_last=2 of the step directories, each complete
    kept = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert kept == ["step_00000003", "step_00000004"]
    assert (part / "checkpoints" / "step_00000004" / "trainer_state.json").exists()
    assert (part / "final" / "model.safetensors").exists()


def test_vocabulary_mismatch_fails_before_ray(run_cli, tmp_path):
    from rlhf.models.tiny import build_tiny_model, save_tiny_model

    teacher = save_tiny_model(build_tiny_model("qwen2", vocab_size=64), None, tmp_path / "teacher-64")
    proc = run_cli(tmp_path, f"distill.teacher_path={teacher}", f"run.output_dir={tmp_path / 'bad'}", timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "ConfigError: vocabulary sizes differ" in text and "teacher" in text
    assert not proc.used_ray
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
