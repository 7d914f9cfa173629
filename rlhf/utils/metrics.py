"""One path for metrics: console (logging), metrics.jsonl, and TensorBoard when chosen.

Stats stay tensors or floats until the end of a step; `log` makes them plain floats once.
"""

from __future__ import annotations

import json
import logging
import math
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
    """Appends one JSON line per step and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed; metrics go to %s only", self.jsonl_path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        values = {key: to_float(v) for key, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(key, v, step)
            self._tb.flush()
        logger.info("step %d | %s", step, format_metrics(values))
        return values

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


_HEADLINE = (
    "reward/mean",
    "eval/accuracy",
    "policy/loss",
    "policy/kl",
    "policy/entropy",
    "rollout/response_length",
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


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """All rows of a metrics.jsonl file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
