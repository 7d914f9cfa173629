"""Parameter-efficient training of the policy: which parameters train, and merged plain-HF weights for export.

`model.peft.method` picks one of rlhf.models.peft_methods.PEFT_METHODS (rlhf.config.PeftConfig; checked there at start-up):

  lora, qlora, loha, lokr   low-rank adapters on model.lora.target_modules (qlora: 4-bit frozen base)
  ia3                       learned scale vectors on keys, values and the MLP input (peft's defaults)
  prompt_tuning, p_tuning   learned virtual input tokens (p_tuning: made by a small MLP)
  prefix_tuning             learned key/value prefixes in every attention layer
  bitfit                    only the biases train (BitFit, arXiv:2106.10199)
  freeze                    full fine-tuning of the parameters the name patterns leave trainable

Rollout engines and exported checkpoints want the plain model (`model.layers.0.self_attn.q_proj.weight`),
never peft's `base_model.model.….q_proj.base_layer.weight` / `lora_A.default.weight`. The trainer keeps
the adapters separate (only they train) and merges on the fly when it exports weights, computing what
peft's merge_and_unload would write without modifying the live model:

  LoRA, LoHa, LoKr   W' = W + Σ_adapters get_delta_weight(adapter)     (additive)
  IA3                W' = W ⊙ l  (l scales W's rows, or its columns for feed-forward modules),
                     b' = b ⊙ l for the non-feed-forward modules        (multiplicative)

Virtual tokens and prefixes have no place in the base weights: such adapters are saved beside the
unchanged base model, and RL stages (whose rollout engines run plain weights) reject them.

Models with a scalar head (the reward model of stage=rm, the critic) take rlhf.models.peft_methods.SCALAR_HEAD_PEFT_METHODS:
the method applies to the transformer, and the head always trains in full (it starts fresh and is
the model's whole output). For the reward model the head is peft's `modules_to_save` (task SEQ_CLS),
so its adapter directory restores it; exports write the trained copy under the plain name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn

from rlhf.config import LoraConfig, ModelConfig
from rlhf.errors import ConfigError
from rlhf.models.peft_methods import ADAPTER_METHODS, PATTERN_METHODS, peft_method
from rlhf.utils.distributed import import_deepspeed

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
"""The transformer block index in a parameter name (llama/qwen2/mistral `layers.i.`, gpt2 `h.i.`)."""


# -- wrapping the model ----------------------------------------------------------------------


def load_base_model(
    path: str,
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    tokenizer: Any = None,
    zero3_config: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """The causal LM to wrap: as rlhf.models.loading loads it (partitioned when `zero3_config`, a ZeRO-3
    DeepSpeed config, is given), or 4-bit quantised for QLoRA (on this GPU; never under ZeRO-3)."""
    from rlhf.models.loading import fill_special_token_ids, load_causal_lm, resolve_model_path

    if peft_method(model_cfg) != "qlora":
        return load_causal_lm(
            path,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            tokenizer=tokenizer,
            use_safetensors=model_cfg.use_safetensors,
            zero3_config=zero3_config,
        )
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.peft.quant_type,
        bnb_4bit_use_double_quant=model_cfg.peft.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # DeepSpeed's dtype casts then leave the packed weights alone
    )
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path),
        quantization_config=quantization,
        dtype=dtype,
        device_map={"": torch.cuda.current_device()},
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True if model_cfg.use_safetensors else None,
    )
    fill_special_token_ids(model, tokenizer)
    return model


def apply_peft(
    model: nn.Module, model_cfg: ModelConfig, *, task_type: str = "CAUSAL_LM", head: Optional[str] = None
) -> nn.Module:
    """`model` set up for `peft_method(model_cfg)`: wrapped by peft, or with only some parameters trainable.

    `task_type` is peft's (CAUSAL_LM for a policy, SEQ_CLS for a reward model, FEATURE_EXTRACTION for a
    bare transformer such as the critic's backbone). `head` names a submodule that trains in full
    whatever the method (the reward model's `score`): peft's modules_to_save for adapters, left
    trainable by bitfit/freeze.
    """
    method = peft_method(model_cfg)
    if method == "none":
        return model
    if method in PATTERN_METHODS:
        freeze_parameters(model, method, model_cfg.peft)
        if head is not None:
            model.get_submodule(head).requires_grad_(True)
        return model
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    from peft import get_peft_model

    config = peft_config(method, model_cfg, task_type=task_type, modules_to_save=[head] if head else None)
    try:
        with _full_linear_weights_if_partitioned(model, method):
            wrapped = get_peft_model(model, config)
    except ValueError as e:  # peft: target modules not found, feed-forward modules not among targets, ...
        raise ConfigError(f"model.peft.method={method}: peft cannot wrap this model: {e}") from e
    if method in ("prompt_tuning", "p_tuning"):
        return VirtualTokenLM(wrapped)
    return wrapped


SHAPE_READING_METHODS = ("loha",)
"""peft methods that size their adapters from the base weight's tensor shape (LoHa: `weight.shape`), not
from the layer's in/out features as LoRA, LoKr and IA3 do."""


@contextmanager
def _full_linear_weights_if_partitioned(model: nn.Module, method: str) -> Iterator[None]:
    """Under ZeRO-3 built inside zero.Init (rlhf.models.zero3) every weight is a 0-element partition, so a
    method in SHAPE_READING_METHODS would size its factors from shape (0,): gather the Linear weights while
    peft makes the adapters. A peak of the full Linear weights on each rank, once, at set-up."""
    partitioned = [
        module.weight for module in model.modules() if isinstance(module, nn.Linear) and hasattr(module.weight, "ds_id")
    ] if method in SHAPE_READING_METHODS else []  # fmt: skip
    if not partitioned:
        yield
        return
    deepspeed = import_deepspeed()

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with LoRA adapters (peft); base weights are frozen. No-op when rank is 0."""
    return apply_peft(model, ModelConfig(lora=lora_cfg))


def peft_config(
    method: str, model_cfg: ModelConfig, *, task_type: str = "CAUSAL_LM", modules_to_save: Optional[list[str]] = None
) -> Any:
    """peft's config object for one of ADAPTER_METHODS (`modules_to_save`: trained in full, saved with the adapter)."""
    import peft

    lora, cfg = model_cfg.lora, model_cfg.peft
    common: dict[str, Any] = {"task_type": task_type}
    if modules_to_save:
        common["modules_to_save"] = list(modules_to_save)
    if method in ("lora", "qlora"):
        return peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
            **common,
        )
    if method in ("loha", "lokr"):
        config_cls = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
        return config_cls(
            r=lora.rank,
            alpha=lora.alpha,
            module_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            **common,
        )
    if method == "ia3":
        return peft.IA3Config(
            target_modules=cfg.ia3_target_modules, feedforward_modules=cfg.ia3_feedforward_modules, **common
        )
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size, **common
        )
    raise ConfigError(f"model.peft.method={method!r} is not a peft adapter; known: {', '.join(ADAPTER_METHODS)}")


def trainable_by_pattern(name: str, method: str, peft_cfg: Any) -> bool:
    """Whether parameter `name` trains under bitfit/freeze (patterns are re.search'ed in the name)."""
    if method == "bitfit" and not name.endswith("bias"):
        return False
    if peft_cfg.trainable_patterns and not any(re.search(p, name) for p in peft_cfg.trainable_patterns):
        return False
    if any(re.search(p, name) for p in peft_cfg.frozen_patterns):
        return False
    block = _BLOCK_INDEX.search(name)
    return not (block and int(block.group(1)) < peft_cfg.frozen_layers)


def freeze_parameters(model: nn.Module, method: str, peft_cfg: Any) -> None:
    """requires_grad per `trainable_by_pattern`; ConfigError when nothing would train."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable_by_pattern(name, method, peft_cfg))
        names.append(name)
    if not any(p.requires_grad for p in model.parameters()):
        what = "has no bias parameters" if method == "bitfit" else "has no parameter left trainable by the patterns"
        raise ConfigError(
            f"model.peft.method={method}: the model {what}; its parameter names look like "
            f"{', '.join(names[:3])}, ... (check model.peft.trainable_patterns / frozen_patterns / frozen_layers)"
        )


class VirtualTokenLM(nn.Module):
    """A prompt-tuned (or P-tuned) PeftModel whose logits line up with `input_ids` again.

    peft prepends the virtual tokens' embeddings and returns logits for them too; callers of a causal
    LM expect logits[:, t] to belong to input token t, so the first num_virtual_tokens positions are
    dropped. peft ignores position ids for these methods (positions count the virtual tokens), so
    none are passed. The loss of `labels` is peft's, computed before the slice.
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model
        self.num_virtual_tokens = int(peft_model.active_peft_config.num_virtual_tokens)

    def forward(
        self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, **kwargs: Any
    ) -> Any:
        kwargs.pop("position_ids", None)
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = out.logits[:, self.num_virtual_tokens :]
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "peft_model":
                raise
            return getattr(self.peft_model, name)  # config, gradient_checkpointing_enable, ...


# -- finding the plain model inside the wrappers ---------------------------------------------


def find_peft_model(module: nn.Module) -> Optional[nn.Module]:
    """The PeftModel inside `module` (itself, or under VirtualTokenLM), or None."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    if isinstance(module, VirtualTokenLM):
        module = module.peft_model
    return module if isinstance(module, PeftModel) else None


def export_root(module: nn.Module) -> nn.Module:
    """The module whose parameter names match the plain HF checkpoint (unwraps PeftModel/VirtualTokenLM)."""
    peft_model = find_peft_model(module)
    return peft_model.get_base_model() if peft_model is not None else module


def plain_module(module: nn.Module) -> nn.Module:
    """What a plain checkpoint holds in place of `module`: `export_root` of a PeftModel, the copy that
    runs (and trains) inside peft's ModulesToSaveWrapper (e.g. a reward model's head), else `module`."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return module
    if isinstance(module, ModulesToSaveWrapper):
        if module.disable_adapters or not module.active_adapters:
            return module.original_module
        return module.modules_to_save[module.active_adapters[0]]
    return export_root(module)


# -- merged tensors of one adapter layer -----------------------------------------------------


def is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (the module that holds base_layer, lora_A, lora_B)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


def is_peft_layer(module: nn.Module) -> bool:
    """True for a peft tuner layer (a base layer plus adapter weights); see `merged_layer_tensors`."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def merged_layer_tensors(layer: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """("weight", W') and ("bias", b') of a LoRA, LoHa, LoKr or IA3 layer whose parameters are all available.

    Under ZeRO-3 call it inside `GatheredParameters` over the layer's parameters. ConfigError for
    other tuner layers (peft's other methods are not offered by model.peft.method).
    """
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lycoris_utils import LycorisLayer

    if is_lora_layer(layer):
        return merged_lora_tensors(layer)
    if isinstance(layer, IA3Layer):
        return merged_ia3_tensors(layer)
    if isinstance(layer, LycorisLayer):
        return merged_lycoris_tensors(layer)
    raise ConfigError(f"cannot merge the peft layer {type(layer).__name__} into plain weights for export")


def plain_tensor(param: Tensor) -> Tensor:
    """A detached full-precision copy of `param` (dequantised when it is a bitsandbytes 4/8-bit weight)."""
    if hasattr(param, "quant_state") or type(param).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(param, state=getattr(param, "quant_state", None)).detach().clone()
    return param.detach().clone()


def _base_tensors(layer: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    base = layer.get_base_layer()
    bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
    return plain_tensor(base.weight), bias


def _yield_weight_bias(weight: Tensor, bias: Optional[Tensor]) -> Iterator[tuple[str, Tensor]]:
    yield "weight", weight
    if bias is not None:
        yield "bias", bias


@torch.no_grad()
def merged_lora_tensors(layer: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """("weight", W + Σ scale·B·A) and ("bias", b) of a LoRA layer whose parameters are all available."""
    weight, bias = _base_tensors(layer)
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
    return _yield_weight_bias(weight, bias)


@torch.no_grad()
def merged_lycoris_tensors(layer: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """("weight", W + Σ ΔW) of a LoHa/LoKr layer (peft's LycorisLayer.merge, on a copy); bias unchanged."""
    weight, bias = _base_tensors(layer)
    if not layer.merged:
        for adapter in layer.active_adapters:
            if adapter in layer._available_adapters:
                weight += layer.get_delta_weight(adapter).to(weight.dtype)
    return _yield_weight_bias(weight, bias)


@torch.no_grad()
def merged_ia3_tensors(layer: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """("weight", W ⊙ l), ("bias", b ⊙ l) of an IA3 layer (peft's IA3 Linear.merge, on a copy)."""
    from peft.utils.other import transpose

    weight, bias = _base_tensors(layer)
    if not layer.merged:
        for adapter in layer.active_adapters:
            if adapter not in layer.ia3_l:
                continue
            scale = layer.ia3_l[adapter]
            weight = (weight * transpose(scale, layer.fan_in_fan_out)).to(weight.dtype)
            if not layer.is_feedforward and bias is not None:
                bias = (bias * scale.reshape(bias.shape)).to(bias.dtype)
    return _yield_weight_bias(weight, bias)
