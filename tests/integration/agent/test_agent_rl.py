"""agent.env in the RL loop, in-process (real Ray, DeepSpeed policy, hf engine): GRPO on two-turn trajectories
whose rows hold the sampled ids and the environment's rendered ids side by side, the environment's tokens out of
the loss, the environment's rewards in the score."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import validate
from rlhf.errors import ConfigError
from rlhf.trainers.prepare import prepare
from rlhf.trainers.rl import RLTrainer
from rlhf.utils.metrics import read_metrics
from tests.integration.async_rl.conftest import compose_config, step_metrics

pytestmark = [pytest.mark.ray]

AGENT = (
    "agent.env=tests.fixtures.two_turn_env:TwoTurns",
    "+agent.env_kwargs.reply='=7'",
    "agent.max_turns=3",
    "run.total_steps=2",
    "data.eval=tiny:eval:copy+reverse",
    "run.eval_size=4",
)


class BatchRecorder(RLTrainer):
    batches: list

    def update(self, batch):
        self.batches.append(batch)
        return super().update(batch)


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_grpo_trains_on_two_turn_trajectories_with_the_environment_out_of_the_loss(ray_cluster, tmp_path, backend):
    trainer = BatchRecorder(prepare(compose_config(tmp_path, *AGENT, f"rollout.backend={backend}")))
    trainer.batches = []
    try:
        trainer.fit()
    finally:
        trainer.close()
    observation = trainer.tokenizer("=7", add_special_tokens=False)["input_ids"]
    for batch in trainer.batches:
        assert batch.loss_mask is not None
        for row in range(len(batch)):
            real = int(batch.response_mask[row].sum())
            ids = batch.response_ids[row, :real].tolist()
            mask = batch.loss_mask[row, :real].tolist()
            # model turn 1, the observation's ids as rendered (never re-tokenized with the turn), model turn 2
            first = mask.index(0)
            assert ids[first : first + len(observation)] == observation
            assert mask == [1] * first + [0] * len(observation) + [1] * (real - first - len(observation))
            assert (batch.rollout_logprobs[row, first : first + len(observation)] == 0).all()
        assert torch.isfinite(batch.advantages).all()
    rows = step_metrics(tmp_path)
    evaluation = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/accuracy" in r]
    assert evaluation and 0.0 <= evaluation[-1]["eval/accuracy"] <= 1.0  # held-out prompts as trajectories too
    for step in (1, 2):
        assert rows[step]["agent/turns_mean"] == 2.0 and rows[step]["agent/tool_calls"] == 1.0
        assert rows[step]["agent/end_done_frac"] == 1.0
        assert rows[step]["reward/env_mean"] == pytest.approx(0.75)  # 0.25 + 0.5 per trajectory
        assert 0 < rows[step]["agent/env_token_frac"] < 1
        # the first step's engine and trainer agree on the model's tokens (the contract holds on them alone)
        assert rows[step]["rollout/mismatch_kl"] < 1e-3
        assert torch.isfinite(torch.tensor(rows[step]["policy/loss"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["agent.env=nope"], r"agent.env: unknown environment 'nope'; known: .*calculator"),
        (["agent.env=tests.fixtures.two_turn_env:Missing"], r"has no attribute 'Missing'"),
        (["agent.env=calculator", "+agent.env_kwargs.precision=3"], r"cannot be built with agent.env_kwargs"),
        (["agent.env=calculator", "agent.max_turns=0"], r"agent.max_turns must be >= 1"),
        (["agent.env=calculator", "agent.observation_template=tool"], r"must contain \{observation\}"),
        (["agent.env=calculator", "stage=ppo"], r"algorithm.advantage=gae .*not built yet"),
        (["agent.env=calculator", "run.rollout_mode=one_step_off"], r"run.rollout_mode=sync only for now"),
        (["agent.env=calculator", "stage=sft"], r"stage=sft has no such rollout: leave agent.env unset"),
    ],
)
def test_bad_agent_settings_fail_before_any_cluster_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(tmp_path, *overrides))
