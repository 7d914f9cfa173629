"""Everything that can fail because of user input, checked before any cluster work starts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import RLHFConfig, uses_critic, validate
from rlhf.data.stream import PromptStream
from rlhf.errors import ConfigError
from rlhf.rewards.pipeline import RewardPipeline

logger = logging.getLogger(__name__)


@dataclass
class EncodedPrompts:
    token_ids: list[list[int]]
    texts: list[str]
    metadata: list[dict[str, Any]]


@dataclass
class PreparedRun:
    cfg: RLHFConfig
    model_path: str
    tokenizer: Any
    train: PromptStream
    eval: EncodedPrompts | None
    reward_fn: Callable[[list[str], list[str], list[dict]], list[float]] | None
    """reward.fn alone (evaluation's accuracy); training scores with `rewards`."""
    output_dir: Path
    rewards: RewardPipeline | None = None
    """Every reward term, loaded and checked; the trainer starts its actors (rlhf.rewards.pipeline)."""


def encode_dataset(source: str, cfg: RLHFConfig, tokenizer, *, limit: int | None = None) -> EncodedPrompts:
    from rlhf.data.prompts import encode_prompts, load_prompt_dataset, prompt_metadata

    rows = load_prompt_dataset(source, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
    if limit is not None:
        rows = rows[:limit]
    token_ids = encode_prompts(
        rows, tokenizer, max_prompt_length=cfg.data.max_prompt_length, use_chat_template=cfg.data.use_chat_template
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids]
    return EncodedPrompts(token_ids=token_ids, texts=texts, metadata=[prompt_metadata(row) for row in rows])


def prepare(cfg: RLHFConfig) -> PreparedRun:
    """Validate the config, resolve the model, load and tokenise data, load and check every reward term."""
    from rlhf.models.loading import load_tokenizer, resolve_model_path
    from rlhf.rewards import build_reward_pipeline

    validate(cfg)
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    check_critic_tokenizer(cfg, tokenizer)
    train = encode_dataset(cfg.data.train, cfg, tokenizer)
    if cfg.agent.env is not None:
        from rlhf.trainers.agent import dry_reset

        dry_reset(cfg, tokenizer, train.metadata[0], train.texts[0], cfg.data.train)
    evaluation = encode_dataset(cfg.data.eval, cfg, tokenizer, limit=cfg.run.eval_size) if cfg.data.eval else None
    rewards = build_reward_pipeline(cfg, tokenizer)
    stream = PromptStream(
        train.token_ids,
        train.texts,
        train.metadata,
        batch_size=cfg.run.rollout_batch_size,
        seed=cfg.run.seed,
        shuffle=cfg.data.shuffle,
    )
    logger.info(
        "prepared: model %s, %d train prompts, %d eval prompts",
        model_path,
        len(train.token_ids),
        len(evaluation.token_ids) if evaluation else 0,
    )
    return PreparedRun(
        cfg, str(model_path), tokenizer, stream, evaluation, rewards.primary_fn, Path(cfg.run.output_dir), rewards
    )


def check_critic_tokenizer(cfg: RLHFConfig, policy_tokenizer: Any) -> None:
    """ConfigError when critic_model_path was made for another tokenizer than the policy's.

    The critic gives one value per policy token and reads the policy's token ids, so its checkpoint
    must share the policy's tokenizer (rlhf.data.tokenizer.tokenizer_differences), or, saved without
    one (as CriticWorker.save_hf writes it), embed at least the policy's vocabulary.
    """
    from rlhf.data.tokenizer import tokenizer_differences
    from rlhf.models.loading import check_vocabulary_fits, checkpoint_tokenizer

    path, trust = cfg.critic_model_path, cfg.model.trust_remote_code
    if not path or not uses_critic(cfg):
        return
    own = checkpoint_tokenizer(path, trust_remote_code=trust)
    if own is None:
        check_vocabulary_fits(path, policy_tokenizer, field="critic_model_path", trust_remote_code=trust)
        return
    differences = tokenizer_differences(policy_tokenizer, own)
    if differences:
        raise ConfigError(
            f"critic_model_path={path!r} has another tokenizer than the policy ({', '.join(differences)} differ); the "
            f"critic values each policy token and reads the policy's token ids: start it from a checkpoint with the "
            f"policy's tokenizer, or leave critic_model_path unset (the policy's weights with a fresh value head)"
        )
