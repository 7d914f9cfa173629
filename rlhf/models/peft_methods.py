"""Which PEFT method a config asks for, and whether it fits the stage: checked at start-up, before anything
loads, so this module needs neither torch nor peft (rlhf.models.peft_utils applies the method)."""

from __future__ import annotations

import importlib.util
import re
from typing import TYPE_CHECKING, Any

from rlhf.config import ModelConfig
from rlhf.errors import ConfigError

if TYPE_CHECKING:
    from rlhf.config import RLHFConfig

PEFT_METHODS = (
    "none",
    "lora",
    "qlora",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "ia3",
    "loha",
    "lokr",
    "bitfit",
    "freeze",
)
LOW_RANK_METHODS = ("lora", "qlora", "loha", "lokr")
"""Methods configured by model.lora (rank, alpha, dropout, target_modules)."""
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
"""Methods that cannot be merged into the base weights."""
ADAPTER_METHODS = LOW_RANK_METHODS + ("ia3",) + PROMPT_METHODS
"""Methods that wrap the model in a peft PeftModel (saved in peft's adapter format)."""
PATTERN_METHODS = ("bitfit", "freeze")
SCALAR_HEAD_PEFT_METHODS = ("none", "lora", "ia3", "loha", "lokr", "bitfit", "freeze")
"""Methods for a model whose output is a trained scalar head (reward model, critic). Prompt methods
are left out (their virtual tokens cannot be merged into the weights the RL stages load, and shift
the last-token positions the head reads), and so is qlora (4-bit loading exists for causal LMs only)."""
QUANT_TYPES = ("nf4", "fp4")


def peft_method(model_cfg: ModelConfig) -> str:
    """The method in effect: model.peft.method, or "lora" for method none with model.lora.rank > 0."""
    if model_cfg.peft.method == "none" and model_cfg.lora.rank > 0:
        return "lora"
    return model_cfg.peft.method


def validate_peft(cfg: RLHFConfig, *, rl_stage: bool) -> None:
    """ConfigError, before any Ray work, for a PEFT setting that cannot run in `cfg.stage` (`rl_stage`: one of
    the RL stages, whose rollout engines run the trained policy's merged weights)."""
    model, peft = cfg.model, cfg.model.peft
    if peft.method not in PEFT_METHODS:
        raise ConfigError(f"model.peft.method={peft.method!r} is not one of {', '.join(PEFT_METHODS)}")
    if model.lora.rank < 0:
        raise ConfigError(f"model.lora.rank must be >= 0 (got {model.lora.rank})")
    method = peft_method(model)
    if method in LOW_RANK_METHODS:
        if model.lora.rank == 0:
            raise ConfigError(f"model.peft.method={method} needs a rank: set model.lora.rank (e.g. model.lora.rank=8)")
        if not model.lora.target_modules:
            raise ConfigError(f"model.peft.method={method} needs model.lora.target_modules (e.g. [q_proj,v_proj])")
    elif model.lora.rank > 0:
        raise ConfigError(
            f"model.lora.rank={model.lora.rank} turns LoRA on, but model.peft.method={method}; "
            f"set model.lora.rank=0 or model.peft.method=lora"
        )
    if method in PROMPT_METHODS:
        if peft.num_virtual_tokens < 1:
            raise ConfigError(f"model.peft.num_virtual_tokens must be >= 1 (got {peft.num_virtual_tokens})")
        if cfg.data.packing:
            raise ConfigError(
                f"model.peft.method={method} prepends its virtual tokens to each row, not to each packed example; "
                f"set data.packing=false"
            )
        if rl_stage:
            raise ConfigError(
                f"model.peft.method={method} learns virtual tokens that cannot be merged into the base weights, "
                f"so the rollout engines of stage={cfg.stage} could not run the trained policy; use lora, ia3, "
                f"loha or lokr for RL, or {method} in an offline stage (sft, dpo, ...)"
            )
    _validate_patterns(method, peft)
    if method == "qlora":
        _validate_qlora(cfg)


def check_scalar_head_peft(model_cfg: ModelConfig, role: str) -> None:
    """ConfigError when model.peft.method cannot train `role`, a model with a scalar head (SCALAR_HEAD_PEFT_METHODS)."""
    method = peft_method(model_cfg)
    if method not in SCALAR_HEAD_PEFT_METHODS:
        raise ConfigError(
            f"model.peft.method={method} cannot train the {role}: allowed there are "
            f"{', '.join(SCALAR_HEAD_PEFT_METHODS)} (the scalar head always trains in full)"
        )


def _validate_patterns(method: str, peft: Any) -> None:
    if peft.trainable_patterns and method != "freeze":
        raise ConfigError(f"model.peft.trainable_patterns needs model.peft.method=freeze (got {method})")
    if (peft.frozen_patterns or peft.frozen_layers) and method not in PATTERN_METHODS:
        raise ConfigError(
            f"model.peft.frozen_patterns / frozen_layers need model.peft.method=freeze or bitfit (got {method})"
        )
    if peft.frozen_layers < 0:
        raise ConfigError(f"model.peft.frozen_layers must be >= 0 (got {peft.frozen_layers})")
    if method == "freeze" and not (peft.trainable_patterns or peft.frozen_patterns or peft.frozen_layers):
        raise ConfigError(
            "model.peft.method=freeze needs model.peft.trainable_patterns, frozen_patterns or frozen_layers "
            "(e.g. model.peft.frozen_patterns=[embed_tokens] model.peft.frozen_layers=2)"
        )
    for field_name in ("trainable_patterns", "frozen_patterns"):
        for pattern in getattr(peft, field_name):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"model.peft.{field_name}: {pattern!r} is not a valid regex ({e})") from e


def _validate_qlora(cfg: RLHFConfig) -> None:
    peft = cfg.model.peft
    if peft.quant_type not in QUANT_TYPES:
        raise ConfigError(f"model.peft.quant_type={peft.quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    needs = "model.peft.method=qlora loads the base model in 4 bits through bitsandbytes, which needs a CUDA GPU"
    if cfg.cluster.device != "cuda":
        raise ConfigError(f"{needs}: set cluster.device=cuda (got {cfg.cluster.device}), or use model.peft.method=lora")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{needs} and the bitsandbytes package: pip install bitsandbytes, or use lora")
    if cfg.policy.zero_stage == 3:
        raise ConfigError(
            "model.peft.method=qlora: 4-bit base weights cannot be ZeRO-3 partitioned; set policy.zero_stage<=2"
        )
