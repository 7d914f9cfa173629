"""The RL controller: generate → score → logprobs/values → advantages → update → sync.

One class serves PPO and the GRPO family; every config branch is decided once in __init__
(registry lookups, which roles exist), so `step()` reads like DESIGN.md §1.

run.rollout_mode=one_step_off overlaps the engines with the update: right after step k's batch is
collected, the engines start generating step k+1's prompts with the weights they hold (version k),
the policy trains on batch k meanwhile, and the step ends by waiting for that generation and syncing
the new weights (version k+1). Every row carries the version that generated it (`versions`), checked
against run.max_staleness before the update. A checkpoint keeps the batch generated ahead, so a
resumed run trains on exactly the samples the uninterrupted one would have (docs/async.md).

run.rollout_mode=async feeds the engines the coming steps' prompts request by request, as far ahead as
run.max_staleness allows, whenever the controller waits (rlhf.trainers.rollout_buffer); weight syncs land
between requests.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_in_reward,
    masked_mean,
    rollout_mismatch,
)
from rlhf.algorithms.sampling import informative_groups, select_groups
from rlhf.config import (
    RLHFConfig,
    TrainConfig,
    off_policy,
    one_update_per_batch,
    rollout_is_mode,
    uses_critic,
    uses_reference,
)
from rlhf.data.batch import RolloutBatch, rollout_rows
from rlhf.data.stream import PromptBatch
from rlhf.engines.rollout import logprob_temperature
from rlhf.errors import CheckpointError, RolloutMismatchError, StaleSampleError
from rlhf.rewards import build_reward_pipeline
from rlhf.trainers.agent import AgentJob, AgentRollout
from rlhf.trainers.controller import Controller
from rlhf.trainers.prepare import EncodedPrompts, PreparedRun
from rlhf.trainers.roles import (
    PendingGeneration,
    RolloutSupervisor,
    check_shared_output_dir,
    connect_weight_sync,
    start_group,
    start_policy_group,
    start_rollout_group,
    start_trained_group,
    stop_on_dead_rank,
    write_placement,
)
from rlhf.trainers.rollout_buffer import GeneratedBatch, RolloutBuffer, buffer_state
from rlhf.utils.metrics import PhaseTimer, reward_trend
from rlhf.utils.redact import config_container
from rlhf.workers.critic import CriticWorker
from rlhf.workers.frozen import frozen_group_options
from rlhf.workers.group import WorkerGroup
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.reference import ReferenceWorker

logger = logging.getLogger(__name__)

ROLLOUT_MISMATCH_KEYS = ("rollout/logprob_diff", "rollout/mismatch_kl", "rollout/mismatch_kl_max")
"""rlhf.algorithms.rollout_mismatch's stats: the update reports them when it computes the old logprobs."""
ROLLOUT_BUFFER_FILE = "rollout_buffer.pt"
"""In a checkpoint of an off-policy run: what was generated (or drawn) ahead: one_step_off's GeneratedBatch for the
next step, async's RolloutBuffer.state()."""


class RLTrainer(Controller):
    def __init__(self, run: PreparedRun):
        cfg = run.cfg
        self.cfg, self.run = cfg, run
        self.tokenizer = run.tokenizer
        self.n = cfg.rollout.n_samples_per_prompt
        # the policy that sampled: old/new/reference logprobs and entropy are all at this temperature
        self.temperature = logprob_temperature(cfg.rollout.sampling)
        self.estimate_advantages = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage)
        self.collect = self._collect_informative if cfg.algorithm.dynamic_sampling else self._collect_once
        self.contract_checked = False
        """The first step of this process has compared the engines' logprobs with the policy's (check_rollout_contract)."""
        self.off_policy = off_policy(cfg)
        self.max_staleness = cfg.run.max_staleness if self.off_policy else 0
        self.rollout_is = rollout_is_mode(cfg)
        """Rollout importance weights on the policy loss now (mismatch_action=correct may switch them on)."""
        self.policy_version = 0
        """Updates applied to the policy: the version a sample generated now is tagged with."""
        self.ahead: Optional[GeneratedBatch] = None
        """one_step_off: the next step's batch, generated while this one trained (a checkpoint keeps it)."""
        self.buffer = (
            RolloutBuffer(
                self,
                max_staleness=self.max_staleness,
                requests_per_step=cfg.run.async_requests_per_step,
                total_steps=cfg.run.total_steps,
            )
            if cfg.run.rollout_mode == "async"
            else None
        )
        """async: the coming steps' requests and samples (a checkpoint keeps them)."""
        self.agent = AgentRollout(cfg, self.tokenizer) if cfg.agent.env is not None else None
        """agent.env: multi-turn trajectories instead of single completions (rlhf.trainers.agent)."""
        self.logprobs_in_update = False  # decided in _start_roles, once the policy says whether it has dropout
        self.kl_in_reward = cfg.algorithm.kl_coef > 0 and not cfg.algorithm.use_kl_loss
        self.kl_ctl = (
            AdaptiveKLController(cfg.algorithm.kl_coef, cfg.algorithm.kl_target, cfg.algorithm.kl_horizon)
            if cfg.algorithm.kl_target is not None
            else FixedKLController(cfg.algorithm.kl_coef)
        )
        self._start_bookkeeping(run.output_dir)
        self.started: dict[str, WorkerGroup] = {}
        """Every group `_group` started, by role (reward-model actors included): placement.json lists them."""
        self._start_roles()
        self.layout = self._check_layout()
        # every generate and sync goes through it: a dead engine is restarted with the current weights
        self.engines = RolloutSupervisor(
            self.rollout,
            self.policy,
            cfg.cluster,
            bucket_mb=cfg.rollout.weight_sync_bucket_mb,
            max_restarts=cfg.rollout.max_restarts,
            policy_version=lambda: self.policy_version,
        )

    # ------------------------------------------------------------------ set-up
    def _group(self, worker_cls, role: str, num_workers: int, resources, **init_kwargs) -> WorkerGroup:
        group = start_group(self.cfg.cluster, worker_cls, role, num_workers, resources, **init_kwargs)
        self.started[role] = group
        return group

    def _start_roles(self) -> None:
        cfg, path = self.cfg, self.run.model_path
        trained = dict(algo_cfg=cfg.algorithm, constant_normalizer=cfg.rollout.sampling.max_new_tokens)
        self.policy = start_policy_group(
            cfg, PolicyWorker, start=self._group, rollout_is=self.rollout_is, **token_balance(cfg.policy), **trained
        )
        self.reference = (
            self._group(
                ReferenceWorker,
                "reference",
                cfg.reference.num_workers,
                cfg.cluster.reference,
                **frozen_group_options(cfg, cfg.reference),
            )
            if uses_reference(cfg)
            else None
        )
        self.critic = (
            start_trained_group(
                cfg,
                CriticWorker,
                "critic",
                cfg.critic,
                cfg.cluster.critic,
                start=self._group,
                **token_balance(cfg.critic),
                **trained,
            )
            if uses_critic(cfg)
            else None
        )
        self.rollout = start_rollout_group(cfg, path, self.groups())
        # the groups above returned before their actors' constructors ran: they start side by side
        self.rewards = self.run.rewards or build_reward_pipeline(cfg, self.tokenizer)
        self.rewards.start(self._group)  # reward model actors, judge engines, remote server check
        pending = [self.policy.run(PolicyWorker.init_model, path, optimizer_steps_total(cfg, cfg.policy))]
        if self.reference:
            pending.append(self.reference.run(ReferenceWorker.init_model, path))
        if self.critic:
            pending.append(
                self.critic.run(
                    CriticWorker.init_model, cfg.critic_model_path or path, optimizer_steps_total(cfg, cfg.critic)
                )
            )
        loaded = [group.wait(p) for group, p in zip([g for g in self.groups() if g is not None], pending)]
        self.logprobs_in_update = (
            cfg.algorithm.old_logprobs == "auto"
            and one_update_per_batch(cfg)
            and not self.kl_in_reward
            and not loaded[0]["dropout_layers"]
        )
        """The old logprobs come from the update's forward (algorithm.old_logprobs): no separate pass."""
        self.weight_sync = connect_weight_sync(self.policy, self.rollout, cfg.cluster)

    def _check_layout(self) -> dict[str, Any]:
        """Every trained rank sees run.output_dir; placement.json records each rank's node and the sync transport."""
        check_shared_output_dir(self.run.output_dir, {"policy": self.policy, "critic": self.critic})
        return write_placement(self.run.output_dir, {**self.started, "rollout": self.rollout.group}, self.weight_sync)

    def groups(self) -> list[WorkerGroup | None]:
        return [self.policy, self.reference, self.critic]

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        with timer("step"):
            batch, rollout_stats, reward_stats = self.collect(step, timer)
            rollout_stats.update(self.check_staleness(batch, step))
            ahead = self.generate_ahead(step + 1)
            with timer("logprobs"):  # old (unless the update computes them), reference and values side by side
                batch = self.logprobs(batch)
                if batch.old_logprobs is not None:
                    rollout_stats.update(self.check_rollout_contract(batch, step))
            with timer("advantages"):
                batch, adv_stats = self.advantages(batch)
            with timer("update"):
                train_stats = self.update(batch)
            if batch.old_logprobs is None:  # the update measured the engines against the policy's old logprobs
                mismatch = {k: train_stats.pop(k) for k in ROLLOUT_MISMATCH_KEYS}
                rollout_stats.update(self.check_rollout_contract(batch, step, mismatch))
            self.policy_version += 1
            if ahead is not None:
                with timer("generate"):  # the part of the next step's generation the update did not cover
                    self.ahead = self.finish_generation(*ahead)
            with timer("sync"):
                sync_stats = self.sync()
            if self.buffer is not None:
                self.buffer.feed()  # the requests the new weights allow, sent before the bookkeeping
        tokens = float(batch.response_mask.sum())
        # sync: the generate phase(s); one_step_off: the generation ahead from its start, of which the phase is a part
        generate_s = max(timer.seconds["generate"], rollout_stats.pop("rollout/generate_s"))
        perf = {
            "perf/tokens_per_s": tokens / max(generate_s, 1e-9),
            "perf/samples_per_s": len(batch) / timer.seconds["step"],
            # prompt + response tokens each PPO epoch trains on: the numerator of MFU (benchmarks/gpu_check.py)
            "perf/sequence_tokens": float(batch.prompt_mask.sum()) + tokens,
            **self.engines.metrics(),  # faults/rollout_restarts
        }
        return {**rollout_stats, **reward_stats, **adv_stats, **train_stats, **sync_stats, **timer.metrics(), **perf}

    def check_rollout_contract(
        self, batch: RolloutBatch, step: int, from_update: Optional[dict[str, float]] = None
    ) -> dict[str, Any]:
        """rollout/mismatch_kl and friends (rlhf.algorithms.rollout_mismatch), with the contract enforced.

        The first step of this process runs on weights the engines loaded from the same checkpoint (or got synced
        on resume), so a mismatch there is never noise: an error that names the likely causes. Later steps act by
        algorithm.mismatch_action (warn, stop or correct). A batch sampled by older weights (run.rollout_mode
        one_step_off) is measured, not held to it: its gap includes the policy's updates since. `from_update`: the
        stats as the update computed them (old logprobs from its forward), else they are computed from the batch."""
        algo = self.cfg.algorithm
        stats = from_update or rollout_mismatch(batch.rollout_logprobs, batch.old_logprobs, batch.effective_loss_mask)
        if bool((batch.versions != self.policy_version).any()):
            # sampled by older weights (off-policy modes): the policy's own updates since are part of the gap, which
            # the importance weights correct; the contract is held on batches of the current weights
            return stats
        first, self.contract_checked = not self.contract_checked, True
        kl = float(stats["rollout/mismatch_kl"])
        if kl <= algo.mismatch_kl_threshold:
            return stats
        measured = (
            f"step {step + 1}: the rollout engine's logprobs of its own samples differ from the policy's "
            f"(KL(engine || trainer) {kl:.3g} per token, worst sequence {float(stats['rollout/mismatch_kl_max']):.3g}; "
            f"algorithm.mismatch_kl_threshold {algo.mismatch_kl_threshold:g})"
        )
        if first:
            raise RolloutMismatchError(
                f"{measured} on the first step, where both hold the same weights. Likely causes: a different dtype "
                f"(model.dtype {self.cfg.model.dtype}), tokenizer or chat template on one side, a sampling setting "
                "(temperature, top_p, top_k) the engine applies and the trainer does not, or an engine serving "
                "other weights than model.path"
            )
        if algo.mismatch_action == "stop":
            raise RolloutMismatchError(
                f"{measured}; algorithm.mismatch_action=stop. Did the weight sync reach the engines?"
            )
        if algo.mismatch_action == "correct" and self.rollout_is == "off":
            self.set_rollout_is("truncate")
            logger.warning(
                "%s; truncated importance weights (cap %g) correct the policy loss from this step on "
                "(algorithm.mismatch_action=correct)",
                measured,
                algo.rollout_is_cap,
            )
            return stats
        logger.warning(
            "%s; training goes on (algorithm.mismatch_action=%s, algorithm.rollout_is %s)",
            measured,
            algo.mismatch_action,
            self.rollout_is,
        )
        return stats

    def set_rollout_is(self, mode: str) -> None:
        """The rollout importance weights the policy's loss applies from its next update on (a checkpoint keeps it)."""
        self.policy.call(PolicyWorker.set_rollout_is, mode)
        self.rollout_is = mode

    def check_staleness(self, batch: RolloutBatch, step: int) -> dict[str, Tensor]:
        """rollout/staleness_mean and _max: policy updates between the weights that sampled each row and the
        policy about to train on it; past run.max_staleness (0 in sync mode) a StaleSampleError."""
        staleness = (self.policy_version - batch.versions).float()
        worst = int(staleness.max())
        if worst > self.max_staleness or int(staleness.min()) < 0:
            raise StaleSampleError(
                f"step {step + 1}: the policy at version {self.policy_version} would train on samples of versions "
                f"{sorted(set(batch.versions.tolist()))}, {worst} updates old, past the bound of "
                f"{self.max_staleness} (run.rollout_mode={self.cfg.run.rollout_mode}, run.max_staleness="
                f"{self.cfg.run.max_staleness}); a sample newer than the policy is never valid"
            )
        return {"rollout/staleness_mean": staleness.mean(), "rollout/staleness_max": staleness.max()}

    def generate_ahead(self, step: int) -> Optional[tuple[PromptBatch, int, float, PendingGeneration]]:
        """one_step_off: start generating `step`'s prompts now, with the weights the engines hold (None in the other
        modes, and after the last step)."""
        if self.cfg.run.rollout_mode != "one_step_off" or step >= self.cfg.run.total_steps:
            return None
        return self.start_generation(self.run.train.next_batch(), step)

    def _collect_once(
        self, step: int, timer: PhaseTimer, sampling_round: int = 0
    ) -> tuple[RolloutBatch, dict[str, Any], dict[str, Any]]:
        """One round: run.rollout_batch_size prompts × n samples, generated (or generated ahead) and scored."""
        if sampling_round == 0 and self.buffer is not None:
            with timer("generate"):  # what the requests in flight since the last step's update still need
                generated = self.buffer.take(step)
            batch, rollout_stats = generated.batch, {**generated.stats, "rollout/generate_s": generated.seconds}
        elif sampling_round == 0 and self.ahead is not None:
            with timer("generate"):  # generated during the last step's update: taking it costs nothing here
                ahead, self.ahead = self.ahead, None
            if ahead.step != step:
                raise CheckpointError(f"the batch generated ahead is step {ahead.step + 1}'s, not step {step + 1}'s")
            batch, rollout_stats = ahead.batch, {**ahead.stats, "rollout/generate_s": ahead.seconds}
        else:
            prompts = self.run.train.next_batch()
            with timer("generate"):
                batch, rollout_stats = self.generate(prompts, step, sampling_round=sampling_round)
        with timer("score"):
            batch, reward_stats = self.score(batch)
        return batch, rollout_stats, reward_stats

    def _collect_informative(self, step: int, timer: PhaseTimer) -> tuple[RolloutBatch, dict[str, Any], dict[str, Any]]:
        """DAPO dynamic sampling: rounds of fresh prompts until rollout_batch_size informative groups.

        A group whose samples all score the same has zero group-relative advantage; it is dropped
        and more prompts are generated, at most algorithm.max_sampling_rounds rounds. Short of
        groups then, the batch is padded with dropped ones (rlhf.algorithms.sampling.select_groups).
        The reward/ and response-length stats are the first round's: an unbiased sample of the
        current policy, comparable with the other algorithms (the kept batch is biased by design).
        """
        target = self.cfg.run.rollout_batch_size
        rounds, keep, found = [], [], 0
        for sampling_round in range(self.cfg.algorithm.max_sampling_rounds):
            batch, rollout_stats, reward_stats = self._collect_once(step, timer, sampling_round)
            if sampling_round == 0:
                first_rollout_stats, first_reward_stats = rollout_stats, reward_stats
            rounds.append(batch.replace(group_ids=batch.group_ids + sampling_round * target))
            keep.append(informative_groups(batch.scores, batch.group_ids))
            found += int(keep[-1].sum()) // self.n
            if found >= target:
                break
        pool = RolloutBatch.concat(rounds)
        rows, padded = select_groups(torch.cat(keep), pool.group_ids, target)
        batch = pool.select(rows)
        generated = len(pool) // self.n
        first_rollout_stats.update(
            {
                "rollout/generation_rounds": float(len(rounds)),
                "rollout/filtered_groups": float(generated - found),
                "rollout/padded_groups": float(padded),
                "rollout/kept_reward_mean": batch.scores.mean(),
            }
        )
        return batch, first_rollout_stats, first_reward_stats

    def generate(self, prompts: PromptBatch, step: int, **options: Any) -> tuple[RolloutBatch, dict[str, Any]]:
        """`prompts` × n samples generated now (`start_generation`'s options), and their rollout/ stats."""
        generated = self.finish_generation(*self.start_generation(prompts, step, **options))
        return generated.batch, {**generated.stats, "rollout/generate_s": generated.seconds}

    def start_generation(
        self,
        prompts: PromptBatch,
        step: int,
        *,
        n: int | None = None,
        eval_mode: bool = False,
        sampling_round: int = 0,
        seed_offset: int = 0,
    ) -> tuple[PromptBatch, int, float, PendingGeneration]:
        """`generate` started on the engines; `finish_generation(*returned)` waits for it. `seed_offset`: the
        prompts are a slice of the step's, starting at row seed_offset / n (the samples do not depend on the cut)."""
        n = n or self.n
        sampling = self.cfg.rollout.eval_sampling if eval_mode else self.cfg.rollout.sampling
        seed = sample_seed(self.cfg.run.seed, step, sampling_round) + seed_offset
        started = time.perf_counter()
        if self.agent is not None:  # multi-turn trajectories, in a driver thread
            return prompts, step, started, self.agent.start(prompts, n, self.engines, seed=seed, eval_mode=eval_mode)
        return prompts, step, started, self.engines.generate_async(prompts.token_ids, sampling, n=n, seed=seed)

    def finish_generation(
        self, prompts: PromptBatch, step: int, started: float, job: PendingGeneration | AgentJob
    ) -> GeneratedBatch:
        if isinstance(job, AgentJob):
            batch, stats = self.agent.finish(job, self.engines)  # type: ignore[union-attr]
            return GeneratedBatch(step, prompts, batch, stats, time.perf_counter() - started, started)
        outputs = self.engines.wait(job)
        batch = build_rollout_batch(prompts, outputs, pad_id=self.tokenizer.pad_token_id)
        batch = batch.replace(versions=torch.full((len(batch),), job.version, dtype=torch.long))
        lengths = batch.response_mask.sum(-1).float()
        truncated = torch.tensor([g.finish_reason == "length" for gens in outputs for g in gens], dtype=torch.float)
        stats = {
            "rollout/response_length": lengths.mean(),
            "rollout/response_length_max": lengths.max(),
            "rollout/truncated_frac": truncated.mean(),
        }
        return GeneratedBatch(step, prompts, batch, stats, time.perf_counter() - started, started)

    def score(self, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, Any]]:
        """Every reward term (rlhf.rewards.pipeline), weighted and summed into batch.scores."""
        scores, stats = self.rewards.score(batch)
        return batch.replace(scores=scores), stats

    def logprobs(self, batch: RolloutBatch) -> RolloutBatch:
        """The forward passes before the update, on their own actors at once: the policy's old logprobs (unless
        `logprobs_in_update`), the reference's logprobs and the critic's values."""
        calls = {}
        if not self.logprobs_in_update:
            calls["old_logprobs"] = (self.policy, PolicyWorker.compute_logprobs, self.temperature)
        if self.reference:
            calls["ref_logprobs"] = (self.reference, ReferenceWorker.compute_logprobs, self.temperature)
        if self.critic:
            calls["values"] = (self.critic, CriticWorker.compute_values)
        pending = {name: (group, group.run(method, batch, *args)) for name, (group, method, *args) in calls.items()}
        return batch.replace(**dict(zip(pending, self.wait_trainers(list(pending.values())))))

    def advantages(self, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, Any]]:
        algo = self.cfg.algorithm
        kl_coef = self.kl_ctl.value if self.kl_in_reward else 0.0
        # without KL in the reward the token rewards are the scores alone: no logprobs needed (logprobs_in_update)
        old = (
            batch.old_logprobs
            if batch.old_logprobs is not None
            else torch.zeros_like(batch.response_mask, dtype=torch.float)
        )
        ref = batch.ref_logprobs if self.kl_in_reward else old
        mask = batch.effective_loss_mask  # multi-turn: the model's tokens, not the environment's
        token_rewards = kl_in_reward(batch.scores, old, ref, mask, kl_coef=kl_coef, kind=algo.kl_estimator)
        advantages, returns = self.estimate_advantages(
            token_rewards=token_rewards,
            scores=batch.scores,
            values=batch.values,
            mask=mask,
            group_ids=batch.group_ids,
            gamma=algo.gamma,
            lam=algo.lam,
            norm_by_std=algo.norm_adv_by_std,
        )
        stats: dict[str, Any] = {"policy/advantage_mean": masked_mean(advantages, mask)}
        if batch.ref_logprobs is not None and batch.old_logprobs is not None:
            kl = masked_mean(batch.old_logprobs - batch.ref_logprobs, mask)
            self.kl_ctl.update(float(kl), len(batch))
            stats.update({"reward/kl_to_ref": kl, "reward/kl_coef": self.kl_ctl.value})
        return batch.replace(token_rewards=token_rewards, advantages=advantages, returns=returns), stats

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        pending = [(self.policy, self.policy.run(PolicyWorker.update, batch, self.temperature))]
        if self.critic:
            pending.append((self.critic, self.critic.run(CriticWorker.update, batch)))
        stats: dict[str, float] = {}
        for answer in self.wait_trainers(pending):
            stats.update(answer)
        return stats

    def wait_trainers(self, calls: list[tuple[WorkerGroup, Any]]) -> list[Any]:
        """The trainers' answers to `calls`, in order; in async mode the engines are fed meanwhile."""
        if self.buffer is not None:
            self.buffer.pump(calls)
        return [group.wait(pending) for group, pending in calls]

    def sync(self) -> dict[str, float]:
        """Stream the new policy weights into every rollout engine (bucketed, one collective)."""
        stats = self.engines.sync()
        if stats.get("weight_sync/seconds"):
            stats["weight_sync/gb_per_s"] = stats["weight_sync/mib"] * 2**20 / 1e9 / stats["weight_sync/seconds"]
        return stats

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train to run.total_steps; a rank lost for good stops the run with RunStoppedError (last checkpoint named)."""
        with stop_on_dead_rank(self.checkpoints):
            return self._fit()

    def _fit(self) -> dict[str, float]:
        run_cfg = self.cfg.run
        self.resume()
        last: dict[str, float] = {}
        rewards: list[float] = []
        trend_key = reward_trend_key(self.cfg)
        progress = make_progress(range(self.step_done, run_cfg.total_steps), run_cfg, initial=self.step_done)
        for step in progress:
            metrics = self.step(step)
            self.step_done = step + 1
            last = self._end_step(metrics)
            rewards.append(last[trend_key])
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(reward=f"{last['reward/mean']:.3f}")
        self._evaluate_at_end(last)
        log_reward_trend(rewards, key=trend_key)
        self.save_final()
        return last

    def evaluate(self) -> dict[str, Any]:
        """Greedy accuracy and mean reward on the held-out prompts."""
        ev: EncodedPrompts | None = self.run.eval
        if ev is None or self.run.reward_fn is None:
            return {}
        prompts = PromptBatch(ev.token_ids, ev.texts, ev.metadata)
        batch, stats = self.generate(prompts, step=0, n=1, eval_mode=True)  # agent.env: trajectories, tools at hand
        batch, reward_stats = self.score(batch)
        # accuracy from the rule reward alone: penalties and weights of other terms would skew "total >= 1"
        inputs = self.run.rewards.inputs(batch)
        correct = torch.tensor(self.run.reward_fn(inputs.prompts, inputs.responses, inputs.metadata)) >= 1.0
        return {
            "eval/reward_mean": reward_stats["reward/mean"],
            "eval/accuracy": correct.float().mean(),
            "eval/response_length": stats["rollout/response_length"],
        }

    def save_checkpoint(self) -> Path:
        ahead: Any = self.buffer.state() if self.buffer is not None else self.ahead
        state = {
            "prompt_stream": self.run.train.state(),
            "kl_coef": self.kl_ctl.value,
            "rewards": self.run.rewards.state_dict(),
            "policy_version": self.policy_version,
            "rollout_is": self.rollout_is,
            "rollout_buffer": ROLLOUT_BUFFER_FILE if ahead is not None else None,
            "rollout_mode": self.cfg.run.rollout_mode,
            "config": config_container(self.cfg),
        }
        files = (lambda directory: torch.save(ahead, directory / ROLLOUT_BUFFER_FILE)) if ahead is not None else None
        return self.checkpoints.save(self.step_done, state, self.trained_roles(), files=files)

    def resume(self) -> None:
        state = self.checkpoints.restore(self.cfg.run.resume, self.trained_roles(), check=self._read_rollout_buffer)
        if state is None:
            return
        self.step_done = int(state["step"])
        if self.buffer is not None:
            ahead, self.ahead = self.ahead, None
            # a one_step_off checkpoint's batch generated ahead is the next step's only request
            self.buffer.load(buffer_state(ahead) if isinstance(ahead, GeneratedBatch) else ahead, self.step_done)
        self.policy_version = int(state.get("policy_version", self.step_done))
        self.run.train.load_state(state["prompt_stream"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.run.rewards.load_state_dict(state.get("rewards", {}))
        if self.cfg.algorithm.mismatch_action == "correct" and state.get("rollout_is", "off") != self.rollout_is:
            self.set_rollout_is(state["rollout_is"])  # the correction switched on before the checkpoint holds
        self.sync()
        if self.ahead is not None and not self.off_policy:
            # an off-policy run's batch resumed in sync mode: the same prompts, sampled again by the current policy
            logger.info("run.rollout_mode=sync: the checkpoint's batch generated ahead is sampled again")
            self.ahead = self.finish_generation(*self.start_generation(self.ahead.prompts, self.ahead.step))

    def _read_rollout_buffer(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """What an off-policy run generated ahead (None when the checkpoint has none): resume trains on it."""
        name = state.get("rollout_buffer")
        self.ahead = None
        if not name:
            return
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(
                f"{checkpoint}: {name} is missing, the batch generated for step {int(state['step']) + 1} that "
                "trainer_state.json names; resume from an earlier checkpoint (run.resume=<path>)"
            )
        ahead = torch.load(path, weights_only=False)
        if not isinstance(ahead, GeneratedBatch) and self.buffer is None:
            raise CheckpointError(
                f"{checkpoint} was written with run.rollout_mode=async: {name} holds the prompts drawn for the next "
                f"steps (up to run.max_staleness ahead), which only that mode trains in order; resume it with "
                f"run.rollout_mode=async (not {self.cfg.run.rollout_mode})"
            )
        self.ahead = ahead

    def trained_roles(self) -> dict[str, WorkerGroup | None]:
        """The groups a checkpoint holds, by their directory in it."""
        return {"policy": self.policy, "critic": self.critic}

    def save_final(self) -> Path:
        final = self.run.output_dir / "final"
        self.policy.call(PolicyWorker.save_hf, str(final))
        self.tokenizer.save_pretrained(final)
        logger.info("final model saved to %s", final)
        return final

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
        self.metrics.close()
        self.rewards.close()
        self.rollout.shutdown()
        for group in self.groups():
            if group is not None:
                group.shutdown()


def build_rollout_batch(prompts: PromptBatch, outputs, *, pad_id: int) -> RolloutBatch:
    """Rows are prompt-major: sample j of prompt i is row i * n + j, with group id i."""
    prompt_rows, response_rows, logprob_rows, group_ids, metadata = [], [], [], [], []
    for i, generations in enumerate(outputs):
        for gen in generations:
            prompt_rows.append(prompts.token_ids[i])
            response_rows.append(list(gen.token_ids))
            logprob_rows.append(list(gen.logprobs))
            group_ids.append(i)
            metadata.append({**prompts.metadata[i], "prompt_text": prompts.texts[i]})
    return rollout_rows(prompt_rows, response_rows, logprob_rows, group_ids, metadata, pad_id=pad_id)


def reward_trend_key(cfg: RLHFConfig) -> str:
    """The reward metric that shows progress: the reward model's raw score when its scores are normalised
    (reward/mean of whitened scores is ~0 by construction), else reward/mean."""
    if cfg.reward.model_path and cfg.reward.model_norm.mode != "none":
        return "reward/model_raw_mean"
    return "reward/mean"


def log_reward_trend(rewards: list[float], window: int = 10, *, key: str = "reward/mean") -> None:
    """One line that says whether training raised the reward (`key`'s values): first vs last `window` steps."""
    trend = reward_trend(rewards, window)
    if trend is None:
        return
    first, last = trend
    logger.info("%s: first %d steps %.3f -> last %d steps %.3f (%+.3f)", key, window, first, window, last, last - first)


def token_balance(role: TrainConfig) -> dict[str, Any]:
    """start_group's token balancing for a trained role: on with a token budget, minibatch by minibatch."""
    return {
        "balance_tokens": bool(role.max_tokens_per_micro_batch),
        "minibatch_rows": role.train_batch_size // role.num_workers,
    }


def optimizer_steps_total(cfg: RLHFConfig, role: TrainConfig) -> int:
    """Optimizer steps of the whole run for one trained role (the LR schedule's length)."""
    sequences = cfg.run.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    return cfg.run.total_steps * cfg.algorithm.ppo_epochs * (sequences // role.train_batch_size)


def sample_seed(seed: int, step: int, sampling_round: int = 0) -> int:
    """A distinct, reproducible sampling seed per step and dynamic-sampling round (exact resume
    replays the same samples)."""
    return (seed * 1_000_003 + step + sampling_round * 7_919_993) % (2**31 - 1)


def make_progress(steps, run_cfg, *, initial: int):
    if not run_cfg.progress_bar:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, total=run_cfg.total_steps, initial=initial, desc="rl", unit="step", dynamic_ncols=True)
