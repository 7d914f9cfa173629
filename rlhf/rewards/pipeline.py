"""RewardPipeline: every reward source of a run, weighted and summed into one score per response.

    rewards = build_reward_pipeline(cfg, tokenizer)    # before Ray: loads and checks everything
    rewards.start(make_group)                           # in the trainer: RM actors, judge engines, server check
    scores, stats = rewards.score(batch)                # [B] total, {"reward/<name>_mean", "reward/mean", ...}
    rewards.close()

Terms, each with a weight (total = Σ weight × term):
  reward.fn (+ kwargs, weight)        a registered rule reward or "pkg.module:function", on the driver
  reward.components[i]                more such functions (e.g. overlong_penalty), on the driver
  reward.model_path                   a sequence-classification RM on RewardWorkers, normalised by model_norm
  reward.remote.url                   an HTTP reward server (rlhf.rewards.remote)
  reward.judge.model_path             an LLM judge on its own rollout engines (rlhf.rewards.judge)
The RM scores the policy's token ids only when it shares the policy's tokenizer; otherwise each
sample is re-encoded for it (ModelTerm). The judge and the remote server always get text, which
the judge renders with its own tokenizer and chat template.
reward/<name>_mean logs each term's *unweighted* mean; reward/mean, /std, /max the weighted total.
Actor-backed terms are submitted first and collected last, so they overlap the driver-side ones.

Every function gets metadata rows holding the prompt row's fields (metadata["answer"] is the
reference), "prompt_text" and "response_length" (response tokens). A function with a
keyword-only `max_response_length` parameter gets rollout.sampling.max_new_tokens unless its
kwargs set it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from rlhf.config import RLHFConfig
from rlhf.data.batch import RolloutBatch
from rlhf.errors import ConfigError, DataError
from rlhf.rewards.normalize import RewardNormalizer
from rlhf.rewards.registry import RewardFn, load_reward_fn, score

logger = logging.getLogger(__name__)


@dataclass
class RewardInputs:
    """What every term sees: the batch and its decoded text."""

    batch: RolloutBatch
    prompts: list[str]
    """The policy's rendered prompt (metadata["prompt_text"]), as rule functions always got it."""
    plain_prompts: list[str]
    """The prompt tokens decoded without special tokens (what a judge's rubric quotes)."""
    responses: list[str]
    metadata: list[dict[str, Any]]


@dataclass
class RewardTerm:
    """One weighted source. `submit` starts the work (actor calls return at once); `collect` returns [B] scores."""

    name: str
    weight: float

    def start(self, make_group: Callable[..., Any]) -> None:
        """Launch the actors this term needs (none by default)."""

    def submit(self, inputs: RewardInputs) -> Any:
        raise NotImplementedError

    def collect(self, handle: Any, stats: dict[str, Any]) -> Tensor:
        return handle

    def close(self) -> None:
        """Release actors and connections (idempotent)."""


@dataclass
class FunctionTerm(RewardTerm):
    """A rule or plugin reward function, run on the driver."""

    fn: RewardFn = field(repr=False, default=None)  # type: ignore[assignment]

    def submit(self, inputs: RewardInputs) -> Tensor:
        rewards = score(self.fn, inputs.prompts, inputs.responses, inputs.metadata, name=f"reward {self.name!r}")
        return torch.tensor(rewards, dtype=torch.float)


@dataclass
class ModelTerm(RewardTerm):
    """A sequence-classification reward model on `num_workers` RewardWorkers, its scores normalised.

    A reward model with its own tokenizer (`own_tokenizer`: vocabulary, special tokens or chat template
    differ from the policy's) would read the policy's ids as other tokens. Its inputs are then each
    sample's prompt as the dataset wrote it (metadata RAW_PROMPT) and the response decoded by the
    policy's tokenizer, encoded with the reward model's tokenizer and chat template the way stage=rm
    encodes its pairs (`reward_model_batch`), as verl re-renders the raw chat for such a reward model.
    """

    model_path: str = ""
    num_workers: int = 1
    normalizer: RewardNormalizer = field(default_factory=RewardNormalizer)
    cfg: Optional[RLHFConfig] = field(default=None, repr=False)
    own_tokenizer: Any = field(default=None, repr=False)
    """The reward model's tokenizer when it differs from the policy's, else None (it scores the policy's ids)."""
    group: Any = field(default=None, repr=False)

    def start(self, make_group: Callable[..., Any]) -> None:
        from rlhf.workers.frozen import frozen_group_options
        from rlhf.workers.reward import RewardWorker

        cfg = self.cfg
        assert cfg is not None
        self.group = make_group(
            RewardWorker,
            "reward",
            self.num_workers,
            cfg.cluster.reward,
            **frozen_group_options(cfg, cfg.reward),
        )
        self.group.call(RewardWorker.init_model, self.model_path)

    def submit(self, inputs: RewardInputs) -> Any:
        from rlhf.workers.reward import RewardWorker

        batch = inputs.batch if self.own_tokenizer is None else reward_model_batch(self.own_tokenizer, inputs)
        return self.group.run(RewardWorker.score, batch)

    def collect(self, handle: Any, stats: dict[str, Any]) -> Tensor:
        raw = self.group.wait(handle)
        stats[f"reward/{self.name}_raw_mean"] = raw.mean()
        return self.normalizer(raw)

    def close(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None


def reward_model_batch(tokenizer: Any, inputs: RewardInputs) -> RolloutBatch:
    """The samples of `inputs` as a reward model with its own `tokenizer` reads them (see ModelTerm).

    Each conversation is the prompt as the dataset wrote it plus the decoded response as the
    assistant's turn, closed as in the reward model's training pairs (also when the policy was cut
    off by max_new_tokens), encoded by rlhf.data.examples.encode_answers.
    """
    from rlhf.data.batch import pad_sequences
    from rlhf.data.examples import encode_answers
    from rlhf.data.prompts import RAW_PROMPT

    missing = [i for i, row in enumerate(inputs.metadata) if RAW_PROMPT not in row]
    if missing:
        raise DataError(
            f"reward.model_path has its own tokenizer, so each sample is re-encoded from its prompt as the dataset "
            f"wrote it, but rows {missing[:5]} of the batch carry no metadata[{RAW_PROMPT!r}]; load prompts with "
            f"rlhf.data.prompts.prompt_metadata, or use a reward model with the policy's tokenizer"
        )
    conversations = [(row[RAW_PROMPT], response) for row, response in zip(inputs.metadata, inputs.responses)]
    encoded = encode_answers(tokenizer, conversations, where="reward-model input")
    prompt_ids, prompt_mask = pad_sequences([p for p, _ in encoded], pad_id=tokenizer.pad_token_id, left=True)
    response_ids, response_mask = pad_sequences([r for _, r in encoded], pad_id=tokenizer.pad_token_id, left=False)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask)


def reward_model_tokenizer(model_path: str, policy_tokenizer: Any, *, trust_remote_code: bool) -> Any:
    """The reward model's tokenizer when it differs from the policy's, else None; logs which path scoring takes.

    A checkpoint saved without a tokenizer is taken to share the policy's (once its embeddings are
    checked to cover the policy's vocabulary).
    """
    from rlhf.data.tokenizer import tokenizer_differences
    from rlhf.models.loading import check_vocabulary_fits, checkpoint_tokenizer

    own = checkpoint_tokenizer(model_path, trust_remote_code=trust_remote_code)
    if own is None:
        check_vocabulary_fits(
            model_path, policy_tokenizer, field="reward.model_path", trust_remote_code=trust_remote_code
        )
        logger.warning(
            "reward model %s holds no tokenizer: it scores the policy's token ids, so it must have been trained with "
            "the policy's tokenizer (save its tokenizer with it to have samples re-encoded when it differs)",
            model_path,
        )
        return None
    differences = tokenizer_differences(policy_tokenizer, own)
    if not differences:
        logger.info("reward model %s shares the policy's tokenizer: it scores the policy's token ids", model_path)
        return None
    logger.info(
        "reward model %s has its own tokenizer (%s differ): samples are decoded and re-encoded with its tokenizer "
        "and chat template",
        model_path,
        ", ".join(differences),
    )
    return own


@dataclass
class RemoteTerm(RewardTerm):
    """An HTTP reward server; `start` checks that it answers."""

    client: Any = field(default=None, repr=False)

    def start(self, make_group: Callable[..., Any]) -> None:
        self.client.health()

    def submit(self, inputs: RewardInputs) -> Tensor:
        return torch.tensor(self.client.score(inputs.prompts, inputs.responses, inputs.metadata), dtype=torch.float)


@dataclass
class JudgeTerm(RewardTerm):
    """An LLM judge's pointwise verdicts, normalised to [0, 1]; unparseable ones counted."""

    judge: Any = field(default=None, repr=False)

    def start(self, make_group: Callable[..., Any]) -> None:
        self.judge.start()

    def submit(self, inputs: RewardInputs) -> Any:
        return self.judge.score_async(inputs.plain_prompts, inputs.responses, inputs.metadata)

    def collect(self, handle: Any, stats: dict[str, Any]) -> Tensor:
        scores, unparseable, _ = self.judge.collect(handle)
        stats["reward/judge_unparseable"] = float(unparseable)
        return scores

    def close(self) -> None:
        self.judge.close()


class RewardPipeline:
    """Weighted terms → one score per response; see the module docstring."""

    def __init__(self, terms: list[RewardTerm], tokenizer: Any):
        if not terms:
            raise ConfigError("no reward terms: set reward.fn, reward.components, model_path, remote.url or judge")
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"reward terms share the name(s) {', '.join(duplicates)}; give reward.components[i].name distinct values"
            )
        self.terms, self.tokenizer = terms, tokenizer

    @property
    def primary_fn(self) -> Optional[RewardFn]:
        """The reward.fn term's function (evaluation's accuracy), if any."""
        first = self.terms[0]
        return first.fn if isinstance(first, FunctionTerm) else None

    def start(self, make_group: Callable[..., Any]) -> None:
        """Start actor-backed terms; `make_group(worker_cls, role, num_workers, resources, **init_kwargs)`."""
        for term in self.terms:
            term.start(make_group)

    def score(self, batch: RolloutBatch) -> tuple[Tensor, dict[str, Any]]:
        """Total reward [B] and stats (tensors) for one rollout batch."""
        inputs = self.inputs(batch)
        handles = [term.submit(inputs) for term in self.terms]
        total = torch.zeros(len(batch))
        stats: dict[str, Any] = {}
        for term, handle in zip(self.terms, handles):
            values = term.collect(handle, stats)
            stats[f"reward/{term.name}_mean"] = values.mean()
            total += term.weight * values
        std = total.std() if len(total) > 1 else torch.zeros(())
        stats.update({"reward/mean": total.mean(), "reward/std": std, "reward/max": total.max()})
        return total, stats

    def inputs(self, batch: RolloutBatch) -> RewardInputs:
        lengths = batch.response_mask.sum(-1).tolist()
        responses = self.tokenizer.batch_decode(
            [ids[: int(n)] for ids, n in zip(batch.response_ids.tolist(), lengths)], skip_special_tokens=True
        )
        plain_prompts = [
            text.strip()
            for text in self.tokenizer.batch_decode(
                [
                    [t for t, m in zip(ids, mask) if m]
                    for ids, mask in zip(batch.prompt_ids.tolist(), batch.prompt_mask.tolist())
                ],
                skip_special_tokens=True,
            )
        ]
        metadata = [{**row, "response_length": int(n)} for row, n in zip(batch.metadata, lengths)]
        prompts = [row.get("prompt_text", plain) for row, plain in zip(batch.metadata, plain_prompts)]
        return RewardInputs(batch, prompts, plain_prompts, responses, metadata)

    def state_dict(self) -> dict[str, Any]:
        """Running normalisation statistics, for checkpoints."""
        return {t.name: t.normalizer.state_dict() for t in self.terms if isinstance(t, ModelTerm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for term in self.terms:
            if isinstance(term, ModelTerm) and term.name in state:
                term.normalizer.load_state_dict(state[term.name])

    def close(self) -> None:
        for term in self.terms:
            term.close()


def build_reward_pipeline(cfg: RLHFConfig, tokenizer: Any) -> RewardPipeline:
    """Every reward term of `cfg.reward`, each loaded and checked (no actors yet)."""
    reward = cfg.reward
    max_len = cfg.rollout.sampling.max_new_tokens
    terms: list[RewardTerm] = []
    if reward.fn:
        terms.append(function_term(reward.fn, reward.kwargs, reward.weight, None, max_len, "reward.fn"))
    for i, component in enumerate(reward.components):
        if not component.fn:
            raise ConfigError(f"reward.components[{i}].fn is required (a registered name or pkg.module:function)")
        terms.append(
            function_term(
                component.fn, component.kwargs, component.weight, component.name, max_len, f"reward.components[{i}]"
            )
        )
    if reward.model_path:
        norm = reward.model_norm
        terms.append(
            ModelTerm(
                name="model",
                weight=reward.model_weight,
                model_path=reward.model_path,
                num_workers=reward.num_workers,
                normalizer=RewardNormalizer(norm.mode, clip=norm.clip, eps=norm.eps),
                cfg=cfg,
                own_tokenizer=reward_model_tokenizer(
                    reward.model_path, tokenizer, trust_remote_code=cfg.model.trust_remote_code
                ),
            )
        )
    if reward.remote.url:
        from rlhf.rewards.remote import RemoteRewardClient

        terms.append(RemoteTerm(name="remote", weight=reward.remote.weight, client=RemoteRewardClient(reward.remote)))
    if reward.judge.model_path:
        from rlhf.rewards.judge import LLMJudge

        judge = LLMJudge(
            reward.judge, model_cfg=cfg.model, rollout_cfg=cfg.rollout, cluster_cfg=cfg.cluster, seed=cfg.run.seed
        )
        terms.append(JudgeTerm(name="judge", weight=reward.judge.weight, judge=judge))
    if cfg.agent.env is not None:  # multi-turn rollouts: the environment's turn rewards join the total
        terms.append(FunctionTerm(name="env", weight=1.0, fn=environment_rewards))
    pipeline = RewardPipeline(terms, tokenizer)
    logger.info("reward: %s", " + ".join(f"{t.weight:g} × {t.name}" for t in terms))
    return pipeline


def environment_rewards(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], /) -> list[float]:
    """Each trajectory's environment turn rewards, summed (metadata "env_reward", rlhf.trainers.agent)."""
    return [float(row["env_reward"]) for row in metadata]


def function_term(
    fn_name: str, kwargs: dict[str, Any], weight: float, name: Optional[str], max_response_length: int, where: str
) -> FunctionTerm:
    """Load `fn_name` with `kwargs` (plus max_response_length when it takes one); errors name `where`."""
    from rlhf.rewards.registry import REWARD_FUNCTIONS, _import_callable

    kwargs = dict(kwargs)
    try:
        raw = _import_callable(fn_name) if ":" in fn_name else REWARD_FUNCTIONS.get(fn_name)
        if _takes_keyword(raw, "max_response_length") and "max_response_length" not in kwargs:
            kwargs["max_response_length"] = max_response_length
        fn = load_reward_fn(fn_name, **kwargs)
        if ":" not in fn_name:
            # registered rewards check their hyperparameters on every call: an empty batch surfaces a bad
            # one (e.g. an overlong buffer above max_new_tokens) now, before any actor starts
            fn([], [], [])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return FunctionTerm(name=name or fn_name.rpartition(":")[2], weight=float(weight), fn=fn)


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    try:
        parameter = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return parameter is not None and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
