"""Every RL algorithm learns: run from its stage config on the tiny world, the rule reward goes up.

Task: one-digit subtraction (`tiny:train:sub_1d`, 44 prompts; the warmed-up policy samples the right
answer about 7% of the time, with enough entropy to explore). Each case composes the config exactly
as `rlhf stage=<name> ...` would, with the small sizes below, and runs it in this process on the
session's Ray cluster (one Ray start-up for all cases). The check: the mean task reward
(`reward/tiny_world_mean`, 1 for a right answer, else 0; DAPO's total also holds its overlong
penalty) of the last WINDOW steps minus that of the first WINDOW steps exceeds the case's margin.
Margins are the smaller gain measured over seeds 0 and 1, halved; the test runs seed 0 (runs are
deterministic: the suite reproduced the seed-0 gains to 3 decimals). Learning rates are the tiny
model's (2e-4; at 5e-4 GRPO gained half as much here and collapsed on copy/reverse), not the papers'.
DAPO's gain is not like-for-like: dynamic sampling draws 2-3 rounds of prompts per step.
Cost: all 8 cases took 3 min 31 s on the 2-core machine at load ~5 (4 min 32 s at load ~8); PPO and
GRPO stay in the default suite, the other six run in `make test-all`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf.utils.metrics import read_metrics

pytestmark = [pytest.mark.ray]

STEPS = 50
WINDOW = 12

# 8 prompts × 8 samples = 64 sequences per step, 4 optimizer steps of 16; one policy rank.
SMALL = [
    "data.train=tiny:train:sub_1d",
    "data.eval=null",
    "run.rollout_batch_size=8",
    "rollout.n_samples_per_prompt=8",
    "rollout.backend=hf",
    "rollout.sampling.max_new_tokens=4",
    "policy.num_workers=1",
    "policy.train_batch_size=16",
    "policy.micro_batch_size=16",
    "policy.optim.lr=2e-4",
    "critic.num_workers=1",
    "critic.train_batch_size=16",
    "critic.micro_batch_size=16",
    f"run.total_steps={STEPS}",
    "run.eval_every=0",
    "run.progress_bar=false",
    "run.tensorboard=false",
]


@dataclass(frozen=True)
class Case:
    margin: float
    """Required gain of the last WINDOW steps' mean reward over the first WINDOW steps'."""
    measured: tuple[float, float]
    """Gains measured with seeds 0 and 1 (margin = min / 2)."""
    extra: tuple[str, ...] = ()
    """Overrides beyond SMALL (none: the stage file as shipped)."""


# Gains measured 2026-11 on the 2-core CPU machine (first 12 -> last 12 of 50 steps, seeds 0 and 1).
CASES = {
    "ppo": Case(margin=0.08, measured=(0.176, 0.182)),  # 0.130 -> 0.306 | 0.126 -> 0.309
    "grpo": Case(margin=0.07, measured=(0.233, 0.147)),  # 0.129 -> 0.362 | 0.135 -> 0.283
    "dr_grpo": Case(margin=0.05, measured=(0.115, 0.112)),  # 0.115 -> 0.229 | 0.151 -> 0.263
    "dapo": Case(  # overlong buffer 1 of the 4 new tokens here (the stage's 4 of 16: the paper's 20%)
        margin=0.11, measured=(0.231, 0.240), extra=("reward.components.0.kwargs.buffer=1",)
    ),  # 0.144 -> 0.375 | 0.167 -> 0.406
    "rloo": Case(margin=0.06, measured=(0.208, 0.138)),  # 0.113 -> 0.322 | 0.135 -> 0.273
    "reinforce_pp": Case(margin=0.07, measured=(0.204, 0.144)),  # 0.128 -> 0.332 | 0.132 -> 0.276
    "reinforce_pp_baseline": Case(margin=0.07, measured=(0.234, 0.146)),  # 0.124 -> 0.358 | 0.135 -> 0.281
    "gspo": Case(margin=0.06, measured=(0.135, 0.137)),  # 0.124 -> 0.259 | 0.121 -> 0.258
}
FAST = ["ppo", "grpo"]
"""Cases in the default suite (the critic path and the group path); the others are marked slow for the
default suite's time budget and run in `make test-all`."""


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from rlhf.cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))
    finally:
        GlobalHydra.instance().clear()


def train_rewards(stage: str, out: Path, *extra: str, seed: int = 0) -> list[dict]:
    """Run `stage` in-process on the session's Ray cluster; the per-step metric rows."""
    from rlhf.cli import train

    cfg = compose([f"stage={stage}", *SMALL, *extra, f"run.seed={seed}", f"run.output_dir={out}"])
    assert cfg.stage == stage
    train(cfg)
    return [row for row in read_metrics(out / "metrics.jsonl") if "policy/loss" in row]


def first_and_last(rows: list[dict]) -> tuple[float, float]:
    """Mean task reward of the first and of the last WINDOW steps."""
    rewards = [row["reward/tiny_world_mean"] for row in rows]
    first, last = rewards[:WINDOW], rewards[-WINDOW:]
    return sum(first) / WINDOW, sum(last) / WINDOW


@pytest.mark.parametrize(
    "stage", [s if s in FAST else pytest.param(s, marks=pytest.mark.slow) for s in CASES], ids=list(CASES)
)
def test_algorithm_raises_rule_reward(ray_cluster, tmp_path, stage):
    """Mean reward of the last 12 of 50 steps beats the first 12 by the case's margin (seed 0).

    Measured gains (seeds 0, 1) and margins are in CASES.
    """
    case = CASES[stage]
    rows = train_rewards(stage, tmp_path / stage, *case.extra)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    first, last = first_and_last(rows)
    assert last - first > case.margin, (
        f"{stage}: reward first {WINDOW} steps {first:.3f} -> last {WINDOW} steps {last:.3f} "
        f"(gain {last - first:+.3f}, required > {case.margin}; measured {case.measured})"
    )
    if stage == "dapo":  # dynamic sampling did its job: more rounds when groups were uninformative
        assert all(1 <= row["rollout/generation_rounds"] <= 3 for row in rows)
        assert any(row["rollout/generation_rounds"] > 1 for row in rows)
        assert sum(row["rollout/filtered_groups"] for row in rows) > 0
        assert all("reward/overlong_mean" in row for row in rows)
