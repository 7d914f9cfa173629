"""Saving a policy's peft adapter in peft's own format, ZeRO-3 aware.

The directory holds adapter_config.json + adapter_model.safetensors (and peft's README.md), so
`PeftModel.from_pretrained(base, directory)` and `rlhf stage=export export.adapter=directory` load
it. Only the trainable parameters are gathered (the adapter is small; the frozen base is not
touched), and the directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from rlhf.models.peft_utils import find_peft_model
from rlhf.utils.distributed import import_deepspeed

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
"""Subdirectory of a saved model (save_hf's directory) that holds the peft adapter."""


def has_adapter(module: nn.Module) -> bool:
    """Whether `module` (a DeepSpeed engine's module) carries a peft adapter to save."""
    return find_peft_model(module) is not None


def save_adapter(module: nn.Module, directory: str | Path, *, rank: int) -> Optional[Path]:
    """Write the adapter of `module` into `directory` from rank 0; None when there is no adapter.

    Collective under ZeRO-3: every rank must call it (the trainable parameters are gathered).
    """
    GatheredParameters = import_deepspeed().zero.GatheredParameters

    peft_model = find_peft_model(module)
    if peft_model is None:
        return None
    directory = Path(directory)
    trainable = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    # save inside the gather: prompt-learning adapters compute their saved embeddings from the live encoder
    with GatheredParameters([p for _, p in trainable], modifier_rank=None), torch.no_grad():
        if rank == 0:
            state = {name: p.detach().to("cpu", copy=True) for name, p in trainable}
            if tmp.exists():
                shutil.rmtree(tmp)
            peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True, save_embedding_layers=False)
    if rank != 0:
        return directory
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    logger.info(
        "saved the %s adapter (%d tensors) to %s",
        peft_model.active_peft_config.peft_type.value,
        len(trainable),
        directory,
    )
    return directory
