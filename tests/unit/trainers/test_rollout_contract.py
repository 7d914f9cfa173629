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
from rlhf.errors import RolloutMismatchError, StaleSampleError
from rlhf.trainers.rl import RLTrainer

APART = 0.5 + math.log(2) - 1


def batch(gap: float, version: int = 0, loss_mask: torch.Tensor | None = None) -> SimpleNamespace:
    engine = torch.full((4, 3), -1.0)
    return SimpleNamespace(
        rollout_logprobs=engine,
        old_logprobs=engine - gap,
        response_mask=torch.ones(4, 3),
        effective_loss_mask=torch.ones(4, 3) if loss_mask is None else loss_mask,
        versions=torch.full((4,), version),
    )


def trainer(**algorithm) -> SimpleNamespace:
    cfg = RLHFConfig()
    for name, value in algorithm.items():
        setattr(cfg.algorithm, name, value)
    owner = SimpleNamespace(cfg=cfg, contract_checked=False, policy_version=0, rollout_is="off", switched=[])
    owner.set_rollout_is = lambda mode: (owner.switched.append(mode), setattr(owner, "rollout_is", mode))
    return owner


def check(owner: SimpleNamespace, gap: float, step: int, version: int = 0) -> dict:
    owner.policy_version = max(owner.policy_version, step)
    return RLTrainer.check_rollout_contract(owner, batch(gap, version if version else owner.policy_version), step)


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


def test_correct_switches_truncated_importance_weights_on_once(caplog):
    owner = trainer(mismatch_action="correct")
    check(owner, 0.0, 0)
    with caplog.at_level(logging.WARNING, logger="rlhf.trainers.rl"):
        check(owner, math.log(2), 1)
    assert owner.switched == ["truncate"] and owner.rollout_is == "truncate"
    assert "truncated importance weights (cap 2) correct the policy loss" in caplog.text
    check(owner, math.log(2), 2)  # already on: a warning, no second switch
    assert owner.switched == ["truncate"]


def test_samples_of_older_weights_are_measured_not_held_to_the_contract():
    """one_step_off trains on samples of the previous weights: apart by an update, not a broken contract
    (importance weights correct it); a batch of the current weights is held to it, the first one strictly."""
    owner = trainer(mismatch_action="stop")
    owner.policy_version = 5
    stats = check(owner, math.log(2), 5, version=4)
    assert float(stats["rollout/mismatch_kl"]) == pytest.approx(APART, rel=1e-5)
    assert not owner.contract_checked
    with pytest.raises(RolloutMismatchError, match="first step"):
        check(owner, math.log(2), 6)


def staleness(policy_version: int, versions: list[int], mode: str = "one_step_off", max_staleness: int = 1):
    cfg = RLHFConfig()
    cfg.run.rollout_mode, cfg.run.max_staleness = mode, max_staleness
    owner = SimpleNamespace(
        cfg=cfg, policy_version=policy_version, max_staleness=max_staleness if mode != "sync" else 0
    )
    return RLTrainer.check_staleness(owner, SimpleNamespace(versions=torch.tensor(versions)), 3)


def test_staleness_is_reported_and_bounded_on_the_version_tags():
    stats = staleness(4, [3, 3, 4, 4])
    assert float(stats["rollout/staleness_mean"]) == 0.5 and float(stats["rollout/staleness_max"]) == 1.0
    with pytest.raises(StaleSampleError, match=r"step 4: .*version 4 .*versions \[2, 4\], 2 updates old.*bound of 1"):
        staleness(4, [2, 4])
    with pytest.raises(StaleSampleError, match="bound of 0 .*rollout_mode=sync"):
        staleness(4, [3], mode="sync")
    with pytest.raises(StaleSampleError, match="newer than the policy"):
        staleness(4, [5])


def test_environment_tokens_are_outside_the_contract():
    """Multi-turn rows: the environment's tokens (loss_mask 0) carry engine logprob 0, which is no mismatch."""
    rows = batch(0.0, loss_mask=torch.tensor([[1.0, 0.0, 1.0]] * 4))
    rows.rollout_logprobs[:, 1] = 0.0  # an environment token: no engine logprob
    stats = RLTrainer.check_rollout_contract(trainer(), rows, 0)
    assert float(stats["rollout/mismatch_kl"]) == 0.0
