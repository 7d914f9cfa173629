"""Models built partitioned by DeepSpeed ZeRO-3, so that no rank ever holds the whole model.

    with zero3_construction(ds_config):                 # transformers builds inside deepspeed.zero.Init:
        model = AutoModelForCausalLM.from_config(...)   #   each module's parameters are partitioned as it is built
    stream_checkpoint(model, path)                      # a bucket of parameters at a time: gathered, filled by
                                                        #   rank 0 from the safetensors shards, re-partitioned

`load_partitioned` does both. Construction is transformers' own ZeRO-3 path (HfDeepSpeedConfig alive
during `from_config`: zero.Init, then HF's initialisation gathered a module at a time, so a fresh head
such as a reward model's `score` starts exactly as `from_pretrained` would start it). Loading is
ours: transformers 5.19's ZeRO-3 `from_pretrained` maps every shard into one state dict that rank 0
reads in full, so rank 0's resident memory would reach the whole checkpoint. Here rank 0 opens a
shard only for the tensors of one bucket, the other ranks read the headers alone, and every rank
holds at most its partition plus one gathered bucket.

Call it on every rank of the default process group (the group zero.Init partitions over), with
torch.distributed started. Transformers must be imported before deepspeed.zero.Init runs (it is).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.errors import ConfigError
from rlhf.utils.distributed import import_deepspeed

logger = logging.getLogger(__name__)

LOAD_BUCKET_BYTES = 32 << 20
"""Full-size bytes of the parameters gathered together while a checkpoint streams in."""


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 has partitioned it (its numel() is then 0)."""
    return int(getattr(param, "ds_numel", param.numel()))


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """{"num_parameters", "num_trainable_parameters"} of `module`, partitioned parameters counted in full."""
    params = list(module.parameters())
    return {
        "num_parameters": sum(full_numel(p) for p in params),
        "num_trainable_parameters": sum(full_numel(p) for p in params if p.requires_grad),
    }


def is_zero3_config(ds_config: dict[str, Any] | None) -> bool:
    """Whether the DeepSpeed config partitions parameters (ZeRO stage 3)."""
    return ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3


@contextmanager
def zero3_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """While open, transformers builds models inside deepspeed.zero.Init for `ds_config` (a stage-3 config).

    transformers looks the config up through a weak reference (integrations.deepspeed), so the
    HfDeepSpeedConfig object is held here and released on exit: later loads in the process are plain.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if not is_zero3_config(ds_config):
        raise ValueError(f"zero3_construction needs a ZeRO stage-3 config, got {ds_config.get('zero_optimization')}")
    holder = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del holder


def load_partitioned(
    auto_cls: Any,
    path: str,
    ds_config: dict[str, Any],
    *,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    fresh: Callable[[str], bool] = lambda name: False,
    **config_kwargs: Any,
) -> nn.Module:
    """`auto_cls` (AutoModelForCausalLM, AutoModel, ...) of the checkpoint at local directory `path`,
    built partitioned under ZeRO-3 and filled from its safetensors shards, in eval mode as
    `from_pretrained` returns it.

    `fresh(name)` says which parameters may be absent from the checkpoint (a new head); they keep
    transformers' initialisation. `config_kwargs` override the checkpoint's config (num_labels=1).
    """
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **config_kwargs)
    with zero3_construction(ds_config):
        model = auto_cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config._name_or_path = path
    stream_checkpoint(model, path, fresh=fresh)
    if getattr(model, "generation_config", None) is not None and (Path(path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def stream_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    fresh: Callable[[str], bool] = lambda name: False,
    bucket_bytes: int = LOAD_BUCKET_BYTES,
) -> None:
    """Copy the safetensors checkpoint at `path` into `model`'s ZeRO-3 partitioned parameters (collective).

    Checkpoint names match the model's as transformers matches them: equal, or with the model's
    `base_model_prefix` added or removed (a causal-LM checkpoint into a bare backbone or a
    sequence-classifier); unmatched checkpoint tensors (an LM head for a backbone) are skipped.
    ConfigError, on every rank before any gather, for a parameter that is neither in the
    checkpoint nor `fresh`, or whose shape differs.
    """
    GatheredParameters = import_deepspeed().zero.GatheredParameters

    path = Path(path)
    shapes, files = _safetensors_index(path)
    plan = _match_names(model, shapes, fresh)
    rank = torch.distributed.get_rank()
    bucket: list[tuple[nn.Parameter, str]] = []
    size = 0
    for param, key in plan:
        full_bytes = param.ds_numel * param.element_size() if hasattr(param, "ds_numel") else 0
        if bucket and size + full_bytes > bucket_bytes:
            _fill_bucket(bucket, files, path, rank, GatheredParameters)
            bucket, size = [], 0
        bucket.append((param, key))
        size += full_bytes
    if bucket:
        _fill_bucket(bucket, files, path, rank, GatheredParameters)
    _load_buffers(model, shapes, files, path)


def _fill_bucket(bucket, files: dict[str, str], path: Path, rank: int, gathered: Any) -> None:
    from safetensors import safe_open

    with gathered([p for p, _ in bucket], modifier_rank=0), torch.no_grad():
        # rank 0 fills the gathered parameters (broadcast on exit); a parameter zero.Init did not
        # partition is filled by every rank
        mine = [(p, key) for p, key in bucket if rank == 0 or not hasattr(p, "ds_id")]
        for file in sorted({files[key] for _, key in mine}):
            # one shard open for this bucket's tensors only: its mapped pages go when it closes
            with safe_open(str(path / file), framework="pt") as shard:
                for param, key in mine:
                    if files[key] == file:
                        param.data.copy_(shard.get_tensor(key))


def _load_buffers(model: nn.Module, shapes: dict[str, tuple[int, ...]], files: dict[str, str], path: Path) -> None:
    """Persistent buffers found in the checkpoint (not partitioned by ZeRO-3): every rank reads them."""
    from safetensors import safe_open

    names = dict(model.named_buffers())
    for key, name in _name_map(model, names, shapes).items():
        with safe_open(str(path / files[key]), framework="pt") as shard, torch.no_grad():
            names[name].copy_(shard.get_tensor(key))


def _safetensors_index(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({tensor name: shape}, {tensor name: file}) from the shards' headers; no tensor data is read."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        names_by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            names_by_file.setdefault(file, []).append(name)
    elif (path / "model.safetensors").exists():
        names_by_file = {"model.safetensors": []}
    else:
        raise ConfigError(
            f"{path} has no model.safetensors(.index.json): ZeRO-3 streams safetensors shards into the partitioned "
            f"parameters; convert the checkpoint (save_pretrained(dir, safe_serialization=True)) or use zero_stage <= 2"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    files: dict[str, str] = {}
    for file in names_by_file:
        with safe_open(str(path / file), framework="pt") as shard:
            for name in shard.keys():
                shapes[name] = tuple(shard.get_slice(name).get_shape())
                files[name] = file
    return shapes, files


def _name_map(model: nn.Module, model_names: Any, checkpoint_names: Any) -> dict[str, str]:
    """{checkpoint name: model name} for the checkpoint tensors that have a place in the model."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping = {}
    for key in checkpoint_names:
        for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.") if prefix else key):
            if name in model_names:
                mapping[key] = name
                break
    return mapping


def _match_names(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], fresh: Callable[[str], bool]
) -> list[tuple[nn.Parameter, str]]:
    """(parameter, checkpoint name) in the model's order (tied parameters once); ConfigError as stream_checkpoint."""
    params = dict(model.named_parameters())
    by_model_name = {name: key for key, name in _name_map(model, params, shapes).items()}
    missing = [name for name in params if name not in by_model_name and not fresh(name)]
    if missing:
        raise ConfigError(
            f"the checkpoint has no tensor for {len(missing)} parameters of {type(model).__name__} "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); it was saved for another architecture"
        )
    plan = []
    for name, param in params.items():
        key = by_model_name.get(name)
        if key is None:
            continue
        expected = tuple(getattr(param, "ds_shape", param.shape))
        if shapes[key] != expected:
            raise ConfigError(f"checkpoint tensor {key} has shape {shapes[key]}, the model's {name} {expected}")
        plan.append((param, key))
    return plan
