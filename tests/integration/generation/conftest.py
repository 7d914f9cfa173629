"""Generation/eval test set-up: configs composed from conf/ like the CLI, small sizes, the hf rollout backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR
from rlhf.config import RLHFConfig
from rlhf.trainers import generate as generate_module

SMALL = [
    "model.path=tiny",
    "rollout.backend=hf",
    "rollout.num_engines=1",
    "rollout.n_samples_per_prompt=4",
    "rollout.sampling.max_new_tokens=8",
    "rollout.eval_sampling.max_new_tokens=8",
    "cluster.rollout.num_cpus=0.5",
    "run.progress_bar=false",
]


def compose_config(stage: str, output_dir: Path, *overrides: str) -> RLHFConfig:
    """The config `rlhf stage=<stage> <SMALL> run.output_dir=<output_dir> <overrides>` would run."""
    with initialize_config_dir(CONF_DIR, version_base=None):
        raw = compose("config", overrides=[f"stage={stage}", *SMALL, f"run.output_dir={output_dir}", *overrides])
    return OmegaConf.to_object(raw)  # type: ignore[return-value]


@pytest.fixture
def crash_in_second_shard(monkeypatch) -> Callable[..., None]:
    """`crash_in_second_shard(out, subset, written=())`: the second ShardStore.write of the run writes only
    the `written` subsets of its shard, leaves a half-written temporary file of `subset`'s shard under
    `out`, and raises RuntimeError("simulated crash"). `monkeypatch.undo()` restores the real write."""

    def install(out: Path, subset: str, written: tuple[str, ...] = ()) -> None:
        real_write, calls = generate_module.ShardStore.write, []

        def write(store, k, subsets):
            calls.append(k)
            if len(calls) == 2:
                if written:
                    real_write(store, k, {name: subsets[name] for name in written})
                (out / subset / f".{store.path(subset, k).name}.tmp").write_text('{"half": ')
                raise RuntimeError("simulated crash")
            real_write(store, k, subsets)

        monkeypatch.setattr(generate_module.ShardStore, "write", write)

    return install
