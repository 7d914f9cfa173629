"""agent.env in the RL loop, in-process (real Ray, DeepSpeed policy, hf engine): GRPO on two-turn trajectories
whose rows hold the sampled ids and the environment's rendered ids side by side, the environment's tokens out of
the loss, the environment's rewards in the score."""

from __future__ import annotations

import pytest
import torch

from rlhf.algorithms.advantages import compute_gae_advantages
from rlhf.errors import ConfigError
from rlhf.trainers.prepare import prepare
from rlhf.trainers.rl import RLTrainer
from rlhf.utils.metrics import read_metrics
from tests.integration.async_rl.conftest import Recorder, compose_config, fit, step_metrics
from tests.integration.async_rl.test_async import run_async

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


class KillsEngineWhileTrajectoriesRunAhead(Recorder):
    """Kills engine 0 right after step 1 started the trajectories of step 2 in the driver's thread."""

    def generate_ahead(self, step):
        ahead = super().generate_ahead(step)
        if step == 1:
            self.kill_engine()
        return ahead


def test_one_step_off_runs_trajectories_during_the_update_and_survives_a_dead_engine(ray_cluster, tmp_path):
    """run.rollout_mode=one_step_off with agent.env: the next step's trajectories run in a driver thread while the
    policy trains; an engine killed meanwhile is restarted once no update is in flight and the lost trajectories
    are generated again (each prompt trains once, every trajectory whole: two model turns around the observation)."""
    mode = ("run.rollout_mode=one_step_off", "run.total_steps=3", "rollout.max_restarts=1")
    trainer = fit(KillsEngineWhileTrajectoriesRunAhead, compose_config(tmp_path, *AGENT, *mode))
    rows = step_metrics(tmp_path)
    assert [rows[s]["faults/rollout_restarts"] for s in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert rows[1]["rollout/staleness_max"] == 0.0 and rows[3]["rollout/staleness_max"] == 1.0
    trained = [p for step in trainer.trained for p in step]
    assert len(set(trained)) == len(trained) == 6
    for step in (1, 2, 3):
        assert rows[step]["agent/turns_mean"] == 2.0 and rows[step]["agent/end_done_frac"] == 1.0
        assert rows[step]["reward/env_mean"] == pytest.approx(0.75)


def test_async_runs_trajectories_ahead_within_the_bound_and_resumes_every_prompt_once(ray_cluster, tmp_path):
    """run.rollout_mode=async with agent.env and a LoRA policy: each step's prompts go out as requests of multi-turn
    trajectories (driver threads) while the policy trains, never past run.max_staleness; a run stopped after step 2 resumes from
    the buffered requests (answered ones kept, the others generated again), so every prompt trains exactly once."""
    mode = (
        "run.rollout_mode=async",
        "run.max_staleness=1",
        "run.async_requests_per_step=2",
        "run.total_steps=3",
        "run.save_every=1",
        "run.keep_last=4",
        "model.peft.method=lora",  # merged LoRA weights reach the engines (the sync's checksums hold)
        "model.lora.rank=4",
    )
    first = fit(Recorder, compose_config(tmp_path, *AGENT, *mode), stop_at=2)
    second = fit(Recorder, compose_config(tmp_path, *AGENT, *mode))
    steps = first.trained + second.trained
    trained = [p for step in steps for p in step]
    assert len(steps) == 3 and len(set(trained)) == len(trained) == 6
    for run in (first, second):
        assert all(0 <= version - tag <= 1 for version, tags in run.tags for tag in tags)
    rows = step_metrics(tmp_path)
    for step in (1, 2, 3):
        assert rows[step]["rollout/requests"] in (1.0, 2.0)  # a resumed step may have had one request answered
        assert rows[step]["agent/turns_mean"] == 2.0 and rows[step]["agent/end_done_frac"] == 1.0
        assert rows[step]["reward/env_mean"] == pytest.approx(0.75)


def test_async_engine_killed_with_trajectories_in_flight_is_restarted_once_and_they_run_again(ray_cluster, tmp_path):
    """The engine dies as the first update starts, with trajectory requests running or queued in the driver's
    thread: each request fails, the first failure restarts the engine (once no update is in flight), the others
    find it replaced and only run again; every prompt trains once, every trajectory whole."""
    agent = (*AGENT, "run.total_steps=4", "run.max_staleness=2", "rollout.max_restarts=1")
    run = run_async(tmp_path, *agent, kill_engine_at=0)
    rows = step_metrics(tmp_path)
    assert [rows[s]["faults/rollout_restarts"] for s in (1, 2, 3, 4)] == [1.0] * 4
    trained = [p for step in run.trained for p in step]
    assert len(set(trained)) == len(trained) == 8
    assert all(0 <= version - tag <= 2 for version, tags in run.tags for tag in tags)
    assert all(rows[s]["agent/turns_mean"] == 2.0 for s in (1, 2, 3, 4))


def test_dynamic_sampling_draws_more_trajectories_for_uninformative_groups(ray_cluster, tmp_path):
    """DAPO's rounds with agent.env: a constant reward plus TwoTurns' fixed turn rewards score every trajectory
    alike, so every group is dropped and rounds are drawn up to the limit, then the batch is padded."""
    dapo = ("stage=dapo", "algorithm.max_sampling_rounds=2", "reward.fn=tests.fixtures.my_reward:constant")
    fit(Recorder, compose_config(tmp_path, *AGENT, *dapo, "run.total_steps=1"))
    (row,) = step_metrics(tmp_path).values()
    assert row["rollout/generation_rounds"] == 2.0 and row["rollout/padded_groups"] == 2.0
    assert row["agent/turns_mean"] == 2.0


def compress(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's entries where `mask` is 1, moved left (right-padded with 0): the model's tokens alone."""
    out = torch.zeros_like(rows)
    for i in range(len(rows)):
        kept = rows[i][mask[i].bool()]
        out[i, : len(kept)] = kept
    return out


def test_ppo_values_and_gae_run_over_the_model_tokens_only(ray_cluster, tmp_path):
    """PPO on two-turn trajectories: the score and the KL penalty sit on the model's tokens, and GAE over each row
    equals GAE over the same row with the environment's tokens cut out (they are transparent: no reward, no value,
    no discount step), so the critic's value at an environment token never reaches an advantage."""
    ppo = ("stage=ppo", "algorithm.kl_coef=0.05", "algorithm.gamma=0.9", "algorithm.lam=0.8", "critic.num_workers=1")
    sizes = ("critic.train_batch_size=8", "critic.micro_batch_size=8", "rollout.n_samples_per_prompt=4")
    trainer = BatchRecorder(prepare(compose_config(tmp_path, *AGENT, *ppo, *sizes)))
    trainer.batches = []
    try:
        trainer.fit()
    finally:
        trainer.close()
    for batch in trainer.batches:
        model, env = batch.loss_mask.bool(), batch.response_mask.bool() & ~batch.loss_mask.bool()
        assert env.any() and model.any()
        for name in ("token_rewards", "advantages", "returns"):
            assert (getattr(batch, name)[env] == 0).all(), name
        # the score on each row's last model token (a trajectory ends with a model turn here)
        last = batch.loss_mask.cumsum(-1).argmax(-1)
        penalty = (
            batch.token_rewards - torch.nn.functional.one_hot(last, batch.loss_mask.shape[1]) * batch.scores[:, None]
        )
        assert penalty[model].abs().max() < 1.0  # what is left is the KL penalty, small and on model tokens only
        compact = compress(batch.loss_mask, batch.loss_mask)
        advantages, returns = compute_gae_advantages(
            compress(batch.token_rewards, batch.loss_mask),
            compress(batch.values, batch.loss_mask),
            compact,
            gamma=0.9,
            lam=0.8,
            whiten=trainer.cfg.algorithm.norm_adv_by_std,
        )
        torch.testing.assert_close(compress(batch.advantages, batch.loss_mask), advantages)
        torch.testing.assert_close(compress(batch.returns, batch.loss_mask), returns)
    rows = step_metrics(tmp_path)
    for step in (1, 2):
        assert rows[step]["agent/turns_mean"] == 2.0
        assert torch.isfinite(torch.tensor([rows[step]["critic/loss"], rows[step]["policy/loss"]])).all()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["agent.env=nope"], r"agent.env: unknown environment 'nope'; known: .*calculator"),
        (["agent.env=tests.fixtures.two_turn_env:Missing"], r"has no attribute 'Missing'"),
        (["agent.env=calculator", "+agent.env_kwargs.precision=3"], r"cannot be built with agent.env_kwargs"),
        (["agent.env=calculator", "agent.max_turns=0"], r"agent.max_turns must be >= 1"),
        (
            ["agent.env=calculator", "agent.observation_template=tool"],
            r"must be auto, chat or a string containing \{observation\}",
        ),
        (["agent.env=calculator", "agent.observation_template=chat"], r"cannot render a message of role 'tool'"),
        (["agent.env=calculator", "stage=sft"], r"stage=sft has no such rollout: leave agent.env unset"),
    ],
)
def test_bad_agent_settings_fail_before_any_cluster_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(compose_config(tmp_path, *overrides))  # the checks and data loading that run before any cluster
