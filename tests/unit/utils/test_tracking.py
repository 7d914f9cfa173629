"""The metrics sink writes metrics.jsonl always and mirrors it into real TensorBoard, W&B and MLflow stores."""

from __future__ import annotations

import math

import pytest

from rlhf.config import RunConfig, TrackingConfig
from rlhf.utils.metrics import MetricsSink, read_metrics

STEPS = [{"reward/mean": 0.25, "policy/loss": 1.5}, {"reward/mean": 0.5, "policy/loss": float("nan")}]


def log_two_steps(sink: MetricsSink) -> None:
    for step, metrics in enumerate(STEPS, start=1):
        sink.log(step, metrics)
    sink.close()


def test_jsonl_is_always_written_and_keeps_non_finite_values(tmp_path):
    sink = MetricsSink(tmp_path, tensorboard=False)
    assert sink.trackers == []
    log_two_steps(sink)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward/mean"] == 0.25 and math.isnan(rows[1]["policy/loss"])


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_two_steps(MetricsSink(tmp_path, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25), (2, 0.5)]
    assert [e.step for e in events.Scalars("policy/loss")] == [1]  # NaN is not mirrored


def test_wandb_offline_run_is_written_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunConfig(tensorboard=False, wandb=True, tracking=TrackingConfig(project="rlhf-test", run_name="unit"))
    sink = MetricsSink.for_run(tmp_path, run, config={"algorithm": {"kl_coef": 0.01}})
    assert sink.trackers == ["wandb"]
    log_two_steps(sink)
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb")), "the offline run holds no .wandb data file"


def test_mlflow_file_store_records_metrics_and_flattened_config(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = RunConfig(tensorboard=False, mlflow=True, tracking=TrackingConfig(project="rlhf-test", run_name="unit"))
    sink = MetricsSink.for_run(tmp_path, run, config={"algorithm": {"kl_coef": 0.01}, "stage": "grpo"})
    assert sink.trackers == ["mlflow"]
    uri = sink._trackers[0].tracking_uri
    run_id = sink._trackers[0].run_id
    log_two_steps(sink)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    finished = client.get_run(run_id)
    assert finished.data.params == {"algorithm.kl_coef": "0.01", "stage": "grpo"}
    assert finished.info.status == "FINISHED"
