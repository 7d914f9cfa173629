"""The one way a prepared training run meets the cluster: save its config, start Ray, fit, close.

Every training stage prepares (validates, loads and tokenises) before calling this, so user errors
never reach Ray; the trainer's `close()` runs even when `fit()` raises, so actors never outlive it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rlhf.config import RLHFConfig


class Trainer(Protocol):
    def fit(self) -> dict[str, float]: ...

    def close(self) -> None: ...


def fit_on_cluster(cfg: RLHFConfig, output_dir: Path, make_trainer: Callable[[], Trainer]) -> dict[str, Any]:
    """Write <output_dir>/config.yaml (secrets masked), then build the trainer inside a Ray session and fit it."""
    from rlhf.utils.ray_session import ray_session
    from rlhf.utils.redact import save_config

    save_config(cfg, output_dir / "config.yaml")
    with ray_session(cfg.cluster, deterministic=cfg.run.deterministic):
        trainer = make_trainer()
        try:
            return trainer.fit()
        finally:
            trainer.close()
