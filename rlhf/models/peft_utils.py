"""LoRA through peft: wrapping a model, and merged weights under the plain Hugging Face names.

Rollout engines and exported checkpoints want the plain model (`model.layers.0.self_attn.q_proj.weight`),
never peft's `base_model.model.….q_proj.base_layer.weight` / `lora_A.default.weight`. The trainer
keeps the adapters separate (only they train) and merges on the fly when it exports weights:
W' = W + scale · B·A per active adapter, exactly what `merge_and_unload` would write, without
modifying the live model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rlhf.config import LoraConfig
from rlhf.errors import ConfigError


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with LoRA adapters (peft); base weights are frozen. No-op when rank is 0."""
    if lora_cfg.rank <= 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # peft: target modules not found
        raise ConfigError(f"model.lora.target_modules {lora_cfg.target_modules}: {e}") from e


def is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (the module that holds base_layer, lora_A, lora_B)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


def export_root(module: nn.Module) -> nn.Module:
    """The module whose parameter names match the plain HF checkpoint (unwraps a PeftModel)."""
    try:
        from peft import PeftModel
    except ImportError:
        return module
    if isinstance(module, PeftModel):
        return module.get_base_model()
    return module


@torch.no_grad()
def merged_lora_tensors(layer: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """("weight", W + Σ scale·B·A) and ("bias", b) of a LoRA layer whose parameters are all available.

    Under ZeRO-3 call it inside `GatheredParameters` over the layer's parameters.
    """
    base = layer.get_base_layer()
    weight = base.weight.detach().clone()
    bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
    if not layer.merged:  # a layer merged in place already holds W'
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                raise ConfigError(
                    f"LoRA variant {type(layer.lora_variant[adapter]).__name__} (e.g. DoRA) cannot be merged for "
                    f"weight export; use plain LoRA"
                )
            weight += layer.get_delta_weight(adapter).to(weight.dtype)
            if layer.lora_bias.get(adapter, False):
                bias = bias + layer.lora_B[adapter].bias * layer.scaling[adapter]
    yield "weight", weight
    if bias is not None:
        yield "bias", bias
