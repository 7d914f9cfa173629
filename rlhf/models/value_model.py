"""The critic: a transformer backbone plus a linear value head, one value per token position.

Alignment (rlhf.algorithms conventions): `values[:, j]` is the value of the state *before*
response token j, i.e. of prompt + response tokens 0..j-1. That state's last token sits at full
position P + j - 1 (P = padded prompt length), so the head reads the hidden state there, the same
position whose logits score response token j in `rlhf.models.logprobs`.

Checkpoint layout: a plain Hugging Face base-model directory (config.json + safetensors with the
backbone's own names, `layers.0.…`) whose safetensors also hold `value_head.weight` and
`value_head.bias`. `AutoModel.from_pretrained` reads it as the backbone (ignoring the head);
`ValueModel.from_pretrained` restores both. A causal-LM checkpoint (the policy) loads as a
backbone with a fresh head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from rlhf.data.token_budget import MicroBatch, PackedMicroBatch
from rlhf.models.logprobs import forward_inputs

HEAD_PREFIX = "value_head."
BACKBONE_PREFIX = "backbone."


class ValueModel(nn.Module):
    """backbone (AutoModel, no LM head) → hidden [B, T, H] → value_head → values [B, T]."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)

    @property
    def config(self):
        return self.backbone.config

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Activation checkpointing of the backbone (the HF model's method, same arguments)."""
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Optional[Tensor] = None) -> Tensor:
        """Values [B, T] for every position of the full sequence (float32)."""
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return self.value_head(out.last_hidden_state).squeeze(-1).float()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        head_seed: int = 0,
        zero3_config: Optional[dict[str, Any]] = None,
    ) -> ValueModel:
        """Backbone from any HF checkpoint dir; the head from it when present, else a fresh seeded one.

        A fresh head is N(0, 1/(H+1)) with zero bias (OpenRLHF's choice): small initial values that
        still pass gradient into the backbone from the first step. `zero3_config` (a ZeRO-3 DeepSpeed
        config) builds the backbone partitioned (rlhf.models.zero3; collective); the head, H + 1
        numbers, is built whole on every rank and partitioned when the engine starts.
        """
        from transformers import AutoModel

        from rlhf.models.loading import load_pretrained, resolve_model_path

        path = resolve_model_path(path)
        backbone = load_pretrained(AutoModel, path, what="a backbone", dtype=dtype, zero3_config=zero3_config)
        hidden_size = backbone.config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            model = cls(backbone, hidden_size)
            nn.init.normal_(model.value_head.weight, std=1.0 / (hidden_size + 1))
            nn.init.zeros_(model.value_head.bias)
        head = _load_head(Path(path))
        if head is not None:
            model.value_head.load_state_dict(head)
        model.value_head.to(dtype)  # the backbone is in dtype already (and may be partitioned)
        return model


def hf_name(name: str) -> str:
    """Exported name of a ValueModel parameter: backbone names as the base model saves them."""
    return name[len(BACKBONE_PREFIX) :] if name.startswith(BACKBONE_PREFIX) else name


def response_values(model: nn.Module, batch: MicroBatch) -> Tensor:
    """Values [B, R] of the states before each response token (hidden state at position P + j - 1).

    A packed micro-batch (rlhf.data.token_budget) gives the same values at real tokens, 0 at padding.
    """
    if isinstance(batch, PackedMicroBatch):
        values = model(**forward_inputs(batch.inputs))
        return batch.unpack(values[0, batch.response_index])
    values = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    p = batch.prompt_length
    return values[:, p - 1 : p - 1 + batch.response_ids.shape[1]]


def _load_head(path: Path) -> Optional[dict[str, Tensor]]:
    """value_head.* tensors from the checkpoint's safetensors, or None for a checkpoint without a head."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for n, f in weight_map.items() if n.startswith(HEAD_PREFIX)})
    else:
        files = ["model.safetensors"] if (path / "model.safetensors").exists() else []
    head: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for name in f.keys():
                if name.startswith(HEAD_PREFIX):
                    head[name[len(HEAD_PREFIX) :]] = f.get_tensor(name)
    return head or None
