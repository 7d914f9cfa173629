"""Start-up checks of the RL stages (rlhf.trainers.prepare) that need files but no Ray."""

from __future__ import annotations

import pytest

from rlhf.config import RLHFConfig
from rlhf.errors import ConfigError
from rlhf.models.loading import load_tokenizer, resolve_model_path
from rlhf.trainers.prepare import prepare


def ppo_config(critic_model_path) -> RLHFConfig:
    cfg = RLHFConfig(stage="ppo", critic_model_path=str(critic_model_path))
    cfg.algorithm.advantage = "gae"
    return cfg


def test_a_critic_with_another_tokenizer_is_refused_before_anything_starts(other_tokenizer_dir):
    with pytest.raises(ConfigError, match=r"critic_model_path=.* has another tokenizer than the policy \(vocabulary"):
        prepare(ppo_config(other_tokenizer_dir))


def test_a_critic_with_the_policys_tokenizer_or_none_passes(tmp_path):
    from rlhf.trainers.prepare import check_critic_tokenizer

    tiny = load_tokenizer(resolve_model_path("tiny"))
    check_critic_tokenizer(ppo_config(resolve_model_path("tiny")), tiny)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 100}')  # no tokenizer saved
    with pytest.raises(ConfigError, match=r"critic_model_path=.* embeds 100 tokens but the policy's tokenizer has 263"):
        check_critic_tokenizer(ppo_config(tmp_path), tiny)
    grpo = ppo_config(tmp_path)
    grpo.algorithm.advantage = "grpo"  # no critic: nothing to check
    check_critic_tokenizer(grpo, tiny)
