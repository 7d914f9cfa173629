"""The rollout/trainer contract of the RL loop (rlhf.trainers.rl.RLTrainer.check_rollout_contract), by construction.

The engine's and the trainer's logprobs of the same tokens are set by hand: equal, apart by float noise, or apart
by ln 2 per token (KL(engine || trainer) by k3 = 0.5 + ln 2 - 1 = 0.19 per token, above the default 0.1).
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from rlhf.config import RLHFConfig
from rlhf.errors import RolloutMismatchError
from rlhf.trainers.rl import RLTrainer

APART = 0.5 + math.log(2) - 1


def batch(gap: float) -> SimpleNamespace:
    engine = torch.full((4, 3), -1.0)
    return SimpleNamespace(rollout_logprobs=engine, old_logprobs=engine - gap, response_mask=torch.ones(4, 3))


def trainer(**algorithm) -> SimpleNamespace:
    cfg = RLHFConfig()
    for name, value in algorithm.items():
        setattr(cfg.algorithm, name, value)
    return SimpleNamespace(cfg=cfg, contract_checked=False)


def check(owner: SimpleNamespace, gap: float, step: int) -> dict:
    return RLTrainer.check_rollout_contract(owner, batch(gap), step)


def test_matching_logprobs_pass_and_are_reported():
    owner = trainer()
    stats = check(owner, 1e-6, 0)
    assert owner.contract_checked
    assert set(stats) == {"rollout/logprob_diff", "rollout/mismatch_kl", "rollout/mismatch_kl_max"}
    assert float(stats["rollout/logprob_diff"]) == pytest.approx(1e-6, rel=0.1)  # 1 - 1e-6 in float32


def test_a_mismatch_on_the_first_step_is_an_error_naming_the_likely_causes():
    with pytest.raises(RolloutMismatchError, match=r"step 6: .*KL\(engine \|\| trainer\) 0\.193 .*first step") as error:
        check(trainer(mismatch_action="warn"), math.log(2), 5)  # first step of a resumed run: step 6
    for cause in ("dtype", "tokenizer or chat template", "temperature", "model.path"):
        assert cause in str(error.value)


def test_later_steps_warn_or_stop_by_mismatch_action(caplog):
    warned = trainer()
    check(warned, 0.0, 0)
    with caplog.at_level(logging.WARNING, logger="rlhf.trainers.rl"):
        stats = check(warned, math.log(2), 1)
    assert float(stats["rollout/mismatch_kl"]) == pytest.approx(APART, rel=1e-5)
    assert "step 2: " in caplog.text and "mismatch_action=warn" in caplog.text

    stopped = trainer(mismatch_action="stop")
    check(stopped, 0.0, 0)
    with pytest.raises(RolloutMismatchError, match="step 2: .*mismatch_action=stop. Did the weight sync reach"):
        check(stopped, math.log(2), 1)
    check(trainer(mismatch_kl_threshold=0.2), math.log(2), 0)  # 0.193 is within a looser threshold
