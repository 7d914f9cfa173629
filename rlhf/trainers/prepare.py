"""Everything that can fail because of user input, checked before any cluster work starts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import RLHFConfig, validate
from rlhf.data.stream import PromptStream
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
    from rlhf.data.prompts import encode_prompts, load_prompt_dataset

    rows = load_prompt_dataset(source, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
    if limit is not None:
        rows = rows[:limit]
    token_ids = encode_prompts(
        rows, tokenizer, max_prompt_length=cfg.data.max_prompt_length, use_chat_template=cfg.data.use_chat_template
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids]
    return EncodedPrompts(token_ids=token_ids, texts=texts, metadata=[row.metadata for row in rows])


def prepare(cfg: RLHFConfig) -> PreparedRun:
    """Validate the config, resolve the model, load and tokenise data, load and check every reward term."""
    from rlhf.models.loading import load_tokenizer, resolve_model_path
    from rlhf.rewards import build_reward_pipeline

    validate(cfg)
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train = encode_dataset(cfg.data.train, cfg, tokenizer)
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
