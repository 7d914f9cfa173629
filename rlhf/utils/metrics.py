"""One path for metrics: console (logging), metrics.jsonl, and TensorBoard / W&B / MLflow when chosen.

Stats stay tensors or floats until the end of a step; `log` makes them plain floats once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def to_float(value: Any) -> float:
    if hasattr(value, "item"):
        return float(value.item())
    return float(value)


class MetricsSink:
    """Appends one JSON line per step and mirrors the scalars to the chosen trackers.

    metrics.jsonl is always written (the source of truth for plots, sweep summaries and tests);
    TensorBoard, W&B and MLflow are mirrors. A tracker that cannot start (package missing) is
    skipped with a warning rather than losing the run.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        mlflow: bool = False,
        tracking: Any = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        self._trackers: list[_Tracker] = []
        if tensorboard:
            self._start(_TensorBoard, "tensorboard")
        if wandb:
            self._start(_WandB, "wandb", tracking, config)
        if mlflow:
            self._start(_MLflow, "mlflow", tracking, config)

    @classmethod
    def for_run(cls, output_dir: str | Path, run_cfg: Any, config: Mapping[str, Any] | None = None) -> MetricsSink:
        """The sink a run's `run.*` settings ask for; `config` (plain dict) is recorded by W&B/MLflow."""
        return cls(
            output_dir,
            tensorboard=run_cfg.tensorboard,
            wandb=run_cfg.wandb,
            mlflow=run_cfg.mlflow,
            tracking=run_cfg.tracking,
            config=config,
        )

    def _start(self, tracker_cls: type[_Tracker], name: str, *args: Any) -> None:
        try:
            self._trackers.append(tracker_cls(self.output_dir, *args))
        except ImportError:
            logger.warning(
                "%s is not installed (pip install 'rlhf[tracking]'); metrics go to %s", name, self.jsonl_path
            )

    @property
    def trackers(self) -> list[str]:
        return [t.name for t in self._trackers]

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        values = {key: to_float(v) for key, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._jsonl.flush()
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        for tracker in self._trackers:
            tracker.log(step, finite)
        logger.info("step %d | %s", step, format_metrics(values))
        return values

    def close(self) -> None:
        self._jsonl.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


class _Tracker:
    name = ""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _TensorBoard(_Tracker):
    name = "tensorboard"

    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, v in values.items():
            self.writer.add_scalar(key, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB(_Tracker):
    """Weights & Biases; offline mode writes <output_dir>/wandb/ for a later `wandb sync`."""

    name = "wandb"

    def __init__(self, output_dir: Path, tracking: Any, config: Mapping[str, Any] | None):
        import wandb

        self.run = wandb.init(
            project=tracking.project,
            name=tracking.run_name or output_dir.name,
            dir=str(output_dir),
            mode=tracking.wandb_mode,
            config=dict(config or {}),
            reinit="create_new",
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow(_Tracker):
    """MLflow through its client API (no global active run, so several sinks can coexist)."""

    name = "mlflow"

    def __init__(self, output_dir: Path, tracking: Any, config: Mapping[str, Any] | None):
        from mlflow.tracking import MlflowClient

        uri = tracking.mlflow_tracking_uri
        if uri is None:
            # the issue asks for a local file store; MLflow 3 keeps it behind this opt-in (a database
            # store needs sqlalchemy, which mlflow-skinny does not bring)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(tracking.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(tracking.project)
        run = self.client.create_run(experiment_id, run_name=tracking.run_name or output_dir.name)
        self.run_id = run.info.run_id
        self.tracking_uri = uri
        from mlflow.entities import Param

        params = [Param(k[:250], str(v)[:500]) for k, v in _flatten(config or {}).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow metric names allow [A-Za-z0-9_-. /]; ours already fit (e.g. reward/mean)
        metrics = [Metric(key, v, now, step) for key, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_HEADLINE = (
    "reward/mean",
    "eval/accuracy",
    "policy/loss",
    "policy/kl",
    "policy/entropy",
    "rollout/response_length",
    "sft/loss",
    "dpo/loss",
    "dpo/margin",
    "rm/loss",
    "kto/loss",
    "simpo/loss",
    "orpo/loss",
    "distill/loss",
    "eval/loss",
    "timing/step",
)


def format_metrics(values: Mapping[str, float]) -> str:
    """A short console line: the headline metrics first, when present."""
    keys = [k for k in _HEADLINE if k in values]
    return " ".join(f"{k}={values[k]:.4g}" for k in keys)


class PhaseTimer:
    """Seconds per named phase of one step, reported as timing/<phase>."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{phase}": s for phase, s in self.seconds.items()}


def reward_trend(values: list[float], window: int = 10) -> tuple[float, float] | None:
    """(mean of the first `window` values, mean of the last `window`); None with fewer than 2 × window values."""
    if len(values) < 2 * window:
        return None
    return sum(values[:window]) / window, sum(values[-window:]) / window


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """All rows of a metrics.jsonl file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
