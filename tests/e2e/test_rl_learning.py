"""Every RL algorithm learns: run from its stage config on the tiny world, the rule reward goes up.

Task: one-digit subtraction (`tiny:train:sub_1d`, 44 prompts; the warmed-up policy samples the right
answer about 10% of the time, with enough entropy to explore). Each case composes the config exactly
as `rlhf stage=<name> ...` would, with the small sizes below, and runs it in this process on the
session's Ray cluster (one Ray start-up for all cases). The check: the final policy's expected rule
reward on the 44 train prompts (the `task_accuracy` fixture: 64 samples per prompt at temperature 1,
4 new tokens as in training, the same sample seeds for both models) exceeds the initial policy's by
the case's margin. That is the whole gain, free of the sampling noise of the rewards logged during
training (standard error of the difference ~0.011, a tenth of the margins). Margins are the smaller
gain measured over seeds 0 and 1, halved; the test runs seed 0. Learning rates are the tiny model's
(2e-4; at 5e-4 GRPO gained half as much here and collapsed on copy/reverse), not the papers'.
DAPO's gain is not like-for-like: dynamic sampling draws 2-3 rounds of prompts per step.
Cost: all 8 cases took 3 min 31 s on the 2-core machine at load ~5 (4 min 32 s at load ~8), plus
~5 s per evaluated policy; PPO and GRPO stay in the default suite, the other six run in `make test-all`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf.utils.metrics import read_metrics

pytestmark = [pytest.mark.ray]

STEPS = 50
TASK = "sub_1d"
"""The task trained and measured (`task_accuracy`)."""

# 8 prompts × 8 samples = 64 sequences per step, 4 optimizer steps of 16; one policy rank.
SMALL = [
    f"data.train=tiny:train:{TASK}",
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
    """Required gain of the final policy's task accuracy over the initial policy's."""
    measured: tuple[float, float]
    """Gains measured with seeds 0 and 1 (margin = min / 2)."""
    extra: tuple[str, ...] = ()
    """Overrides beyond SMALL (none: the stage file as shipped)."""


# Task accuracy gains measured 2026-12 on the 2-core CPU machine (initial 0.105 -> final policy, seeds 0 and 1).
CASES = {
    "ppo": Case(margin=0.10, measured=(0.238, 0.205)),  # 0.105 -> 0.344 | 0.310
    "grpo": Case(margin=0.11, measured=(0.296, 0.227)),  # 0.105 -> 0.402 | 0.333
    "dr_grpo": Case(margin=0.05, measured=(0.116, 0.214)),  # 0.105 -> 0.222 | 0.320
    "dapo": Case(  # overlong buffer 1 of the 4 new tokens here (the stage's 4 of 16: the paper's 20%)
        margin=0.14, measured=(0.333, 0.292), extra=("reward.components.0.kwargs.buffer=1",)
    ),  # 0.105 -> 0.439 | 0.398
    "rloo": Case(margin=0.11, measured=(0.220, 0.233)),  # 0.105 -> 0.326 | 0.338
    "reinforce_pp": Case(margin=0.08, measured=(0.270, 0.170)),  # 0.105 -> 0.376 | 0.276
    "reinforce_pp_baseline": Case(margin=0.11, measured=(0.275, 0.239)),  # 0.105 -> 0.380 | 0.344
    "gspo": Case(margin=0.09, measured=(0.182, 0.197)),  # 0.105 -> 0.287 | 0.303
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


@pytest.mark.parametrize(
    "stage", [s if s in FAST else pytest.param(s, marks=pytest.mark.slow) for s in CASES], ids=list(CASES)
)
def test_algorithm_raises_rule_reward(ray_cluster, task_accuracy, tmp_path, stage):
    """The final policy's task accuracy beats the initial policy's by the case's margin (seed 0).

    Measured gains (seeds 0, 1) and margins are in CASES.
    """
    case = CASES[stage]
    rows = train_rewards(stage, tmp_path / stage, *case.extra)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    before, after = task_accuracy("tiny", TASK), task_accuracy(str(tmp_path / stage / "final"), TASK)
    assert after - before > case.margin, (
        f"{stage}: task accuracy {before:.3f} -> {after:.3f} (gain {after - before:+.3f}, "
        f"required > {case.margin}; measured {case.measured})"
    )
    if stage == "dapo":  # dynamic sampling did its job: more rounds when groups were uninformative
        assert all(1 <= row["rollout/generation_rounds"] <= 3 for row in rows)
        assert any(row["rollout/generation_rounds"] > 1 for row in rows)
        assert sum(row["rollout/filtered_groups"] for row in rows) > 0
        assert all("reward/overlong_mean" in row for row in rows)
