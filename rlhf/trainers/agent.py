"""Multi-turn rollouts in the RL loop (agent.env): trajectories from rlhf.environments.loop on the rollout engines,
turned into a RolloutBatch whose loss_mask keeps the environment's tokens out of the loss.

The policy samples each turn on the engines (one call for every trajectory that waits for it, with the
environment's stop strings added to rollout.sampling.stop); the environments answer in threads of the driver. A
batch's trajectory loop runs in a driver thread of its own (`AgentRollout.start`/`finish`), so the overlapped modes
(run.rollout_mode=one_step_off, async) run trajectories while the policy trains; a sync landing between two turns
makes the later turns newer (each token keeps its own logprob) and the batch keeps the version that started it.
A row of the batch is one trajectory: its prompt, then every model and environment token as sampled and rendered
(never re-tokenized). `response_mask` marks all of them (the trainer's forward reads them all), `loss_mask` the
model's, which alone get loss, KL, entropy and importance weights; `rollout_logprobs` is 0 on environment tokens.
The score is the reward pipeline's: its terms on the whole response text, plus the environment's turn rewards as
its "env" term (rlhf.rewards.pipeline).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlhf.config import RLHFConfig, SamplingConfig, require
from rlhf.data.batch import RolloutBatch, rollout_rows
from rlhf.data.stream import PromptBatch
from rlhf.environments import (
    AgentLimits,
    ObservationRenderer,
    Trajectory,
    check_environment,
    load_environment,
    run_trajectories,
)
from rlhf.environments.base import close_quietly
from rlhf.environments.trajectory import TRAJECTORY_ENDS
from rlhf.errors import ConfigError, WorkerDiedError

if TYPE_CHECKING:
    from rlhf.trainers.roles import RolloutSupervisor

logger = logging.getLogger(__name__)

COUNTERS = ("tool_calls", "tool_errors", "tool_timeouts", "env_errors")
"""Per-trajectory counters the rollout reports as agent/<name> (mean per trajectory)."""


def check_agent(cfg: RLHFConfig) -> None:
    """agent.* at start-up, before any cluster work, for a stage that runs trajectories (the RL stages, stage=eval;
    nothing to check without agent.env): the environment builds, the limits are sane."""
    agent = cfg.agent
    if agent.env is None:
        return
    load_environment(agent.env, dict(agent.env_kwargs), field_name="agent.env")
    require(agent.max_turns >= 1, f"agent.max_turns must be >= 1 (got {agent.max_turns})")
    require(agent.max_tokens >= 1, f"agent.max_tokens must be >= 1 (got {agent.max_tokens})")
    require(agent.step_timeout_s > 0, f"agent.step_timeout_s must be > 0 (got {agent.step_timeout_s})")
    require(
        agent.observation_template in OBSERVATION_MODES or "{observation}" in agent.observation_template,
        f"agent.observation_template must be auto, chat or a string containing {{observation}} "
        f"(got {agent.observation_template!r})",
    )


OBSERVATION_MODES = ("auto", "chat")
"""agent.observation_template values that derive the template from the tokenizer (`observation_template`)."""


def observation_template(cfg: RLHFConfig, tokenizer: Any) -> str:
    """agent.observation_template resolved for this tokenizer: "chat" is the chat template's tool turn, "auto" that
    when prompts are chat-rendered and the template has a tool role, else the bare text; any other value as is."""
    from rlhf.data.tokenizer import tool_turn_template

    mode = cfg.agent.observation_template
    if mode not in OBSERVATION_MODES:
        return mode
    chat = tool_turn_template(tokenizer) if cfg.data.use_chat_template or mode == "chat" else None
    if chat is None and mode == "chat":
        raise ConfigError(
            "agent.observation_template=chat: the tokenizer's chat template cannot render a message of role 'tool' "
            "after the model's turn; set agent.observation_template to the tool turn's text with {observation} in "
            "place of the output (in a YAML config, where a double-quoted \\n is a newline), or to '{observation}' "
            "for the bare text"
        )
    return chat or "{observation}"


def dry_reset(cfg: RLHFConfig, tokenizer: Any, metadata: dict[str, Any], prompt_text: str, source: str) -> None:
    """Before any cluster work: the observation template resolves for this tokenizer, and the environment resets
    on the first prompt row of `source` (a ConfigError naming agent.env when it cannot start from the run's rows)."""
    observation_template(cfg, tokenizer)
    factory = load_environment(cfg.agent.env, dict(cfg.agent.env_kwargs), field_name="agent.env")
    row = {**metadata, "prompt": prompt_text}
    check_environment(factory, row, field_name="agent.env", where=f"the first prompt of {source}")


@dataclass
class AgentJob:
    """Trajectories being generated in the driver's thread (`AgentRollout.start`), and what generates them again."""

    future: Future
    prompts: PromptBatch
    n: int
    seed: int | None
    eval_mode: bool
    restarts: int
    """RolloutSupervisor.restarts when it started."""


class AgentRollout:
    """The multi-turn rollout of one run: its environment factory, limits, renderer and sampling."""

    def __init__(self, cfg: RLHFConfig, tokenizer: Any) -> None:
        agent = cfg.agent
        if agent.env is None:
            raise ConfigError("AgentRollout needs agent.env")
        self.make_env = load_environment(agent.env, dict(agent.env_kwargs), field_name="agent.env")
        probe = self.make_env()
        stops = list(getattr(probe, "stop", ()) or ())
        close_quietly(probe)
        self.sampling, self.eval_sampling = (
            dataclasses.replace(sampling, stop=[*sampling.stop, *(s for s in stops if s not in sampling.stop)])
            for sampling in (cfg.rollout.sampling, cfg.rollout.eval_sampling)
        )
        if cfg.rollout.eval_sampling.max_new_tokens < cfg.rollout.sampling.max_new_tokens:
            logger.warning(
                "rollout.eval_sampling.max_new_tokens=%d < rollout.sampling.max_new_tokens=%d: evaluation turns are "
                "cut shorter than training turns, which can cut a tool call before its stop string",
                cfg.rollout.eval_sampling.max_new_tokens,
                cfg.rollout.sampling.max_new_tokens,
            )
        self.limits = AgentLimits(agent.max_turns, agent.max_tokens, agent.step_timeout_s)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-rollout")
        """Runs the trajectory loops (`start`), one job at a time."""
        self.tokenizer = tokenizer
        template = observation_template(cfg, tokenizer)
        logger.info(
            "agent.observation_template=%s: observations are written as %r", agent.observation_template, template
        )
        self.render = ObservationRenderer(
            lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            template,
            special_ids=tokenizer.all_special_ids,
        )

    def start(
        self, prompts: PromptBatch, n: int, engines: RolloutSupervisor, *, seed: int | None, eval_mode: bool = False
    ) -> AgentJob:
        """`generate` in a driver thread (the policy may train meanwhile, as in run.rollout_mode=one_step_off) on
        `engines` with the weights they hold now; `finish` waits for it."""
        version = engines.version
        future = self.thread.submit(
            self.generate, prompts, n, engines.generate_unsupervised, seed=seed, version=version, eval_mode=eval_mode
        )
        return AgentJob(future, prompts, n, seed, eval_mode, engines.restarts)

    def finish(self, job: AgentJob, engines: RolloutSupervisor) -> tuple[RolloutBatch, dict[str, Any]]:
        """The job's batch and stats. Call it with no update in flight: if an engine died, it is restarted with the
        policy's weights and every trajectory of the job generated again (none half-counted)."""
        try:
            return job.future.result()
        except WorkerDiedError as error:
            engines.recover(error, job.restarts)
        logger.warning(
            "an engine died during a multi-turn rollout; its %d prompts are generated again", len(job.prompts.token_ids)
        )
        return self.finish(self.start(job.prompts, job.n, engines, seed=job.seed, eval_mode=job.eval_mode), engines)

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)

    def generate(
        self,
        prompts: PromptBatch,
        n: int,
        engine_generate: Callable[[list[list[int]], SamplingConfig, int, int | None], list[list[Any]]],
        *,
        seed: int | None,
        version: int,
        eval_mode: bool = False,
    ) -> tuple[RolloutBatch, dict[str, Any]]:
        """`n` trajectories per prompt; `engine_generate(contexts, sampling, n, seed)` samples a turn (with
        rollout.eval_sampling in `eval_mode`)."""
        sampling = self.eval_sampling if eval_mode else self.sampling
        rows = [{**meta, "prompt": text} for meta, text in zip(prompts.metadata, prompts.texts)]
        trajectories = run_trajectories(
            rows,
            prompts.token_ids,
            n,
            generate=lambda contexts, turn_seed: [g[0] for g in engine_generate(contexts, sampling, 1, turn_seed)],
            make_env=self.make_env,
            render=self.render,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            limits=self.limits,
            seed=seed,
        )
        batch = build_trajectory_batch(prompts, trajectories, n, pad_id=self.tokenizer.pad_token_id)
        batch = batch.replace(versions=torch.full((len(batch),), version, dtype=torch.long))
        return batch, trajectory_stats(trajectories)


def build_trajectory_batch(
    prompts: PromptBatch, trajectories: list[Trajectory], n: int, *, pad_id: int
) -> RolloutBatch:
    """Rows are prompt-major (trajectory j of prompt i is row i * n + j, group id i). A trajectory without a token
    (its environment failed before the first turn) gets one padding token that carries no loss."""
    prompt_rows, response_rows, mask_rows, logprob_rows, metadata = [], [], [], [], []
    for k, trajectory in enumerate(trajectories):
        i = k // n
        response, loss_mask, logprobs = trajectory.response_ids, trajectory.loss_mask, trajectory.logprobs
        if not response:
            response, loss_mask, logprobs = [pad_id], [0], [0.0]
        prompt_rows.append(trajectory.prompt_ids)
        response_rows.append(response)
        mask_rows.append(loss_mask)
        logprob_rows.append(logprobs)
        metadata.append(
            {
                **prompts.metadata[i],
                "prompt_text": prompts.texts[i],
                "env_reward": float(sum(trajectory.turn_rewards)),
                "turns": trajectory.turns,
            }
        )
    group_ids = [k // n for k in range(len(trajectories))]
    return rollout_rows(
        prompt_rows, response_rows, logprob_rows, group_ids, metadata, pad_id=pad_id, loss_mask_rows=mask_rows
    )


def trajectory_stats(trajectories: list[Trajectory]) -> dict[str, Any]:
    """agent/ metrics of one batch: turns, tool use, the environment's share of the tokens, reward per turn and
    how the trajectories ended; rollout/ response lengths (model and environment tokens)."""
    count = max(len(trajectories), 1)
    lengths = torch.tensor([float(len(t.response_ids)) for t in trajectories])
    env_tokens = sum(t.environment_tokens for t in trajectories)
    turn_rewards = [r for t in trajectories for r in t.turn_rewards]
    stats: dict[str, Any] = {
        "agent/turns_mean": sum(t.turns for t in trajectories) / count,
        "agent/env_token_frac": env_tokens / max(float(lengths.sum()), 1.0),
        "agent/reward_per_turn": sum(turn_rewards) / max(len(turn_rewards), 1),
        "rollout/response_length": lengths.mean(),
        "rollout/response_length_max": lengths.max(),
        "rollout/truncated_frac": sum(t.end == "max_tokens" for t in trajectories) / count,
    }
    for name in COUNTERS:
        stats[f"agent/{name}"] = sum(t.counters[name] for t in trajectories) / count
    for end in TRAJECTORY_ENDS:
        stats[f"agent/end_{end}_frac"] = sum(t.end == end for t in trajectories) / count
    return stats
