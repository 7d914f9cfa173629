"""Load tokenizers and causal LMs from a local dir, a Hub name, or a tiny-world name.

Model paths in configs accept, besides a directory or a Hub name, the tiny-world names of
rlhf.models.paths (built once into the cache by rlhf.models.warmup.tiny_world_models, seed 0).

Both loaders guarantee what the rest of the framework assumes: the tokenizer has an eos and a
pad token (pad falls back to eos), and the model config and generation config carry eos/pad ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.errors import ConfigError
from rlhf.models.paths import TINY_MODEL_NAMES, check_model_path, check_weight_files, is_tiny_model_name

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str | Path) -> str:
    """A local directory or Hub name to hand to `from_pretrained`; tiny-world names are built if needed.

    Raises ConfigError as `check_model_path` does.
    """
    check_model_path(path)
    if is_tiny_model_name(path):
        from rlhf.models.warmup import tiny_world_models

        arch, name = TINY_MODEL_NAMES[str(path)]
        return str(tiny_world_models(archs=(arch,), judge=name == "judge").checkpoint(arch, name))
    local = Path(path).expanduser()
    return str(local) if local.exists() else str(path)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer at `path` (see resolve_model_path), with a pad token (eos when it has none)."""
    resolved = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {resolved!r}: {e}") from e
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"the tokenizer of {resolved!r} has no eos token, so generation could not stop; use a tokenizer that defines one"
        )
    if tokenizer.pad_token_id is None:
        logger.info("tokenizer of %s has no pad token; using eos %r", resolved, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
"""Files of which a checkpoint directory holds at least one when a tokenizer was saved with it."""


def checkpoint_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the checkpoint at `path` (see load_tokenizer), or None for a local
    directory that holds none (e.g. a critic or a reward model saved without one)."""
    resolved = Path(resolve_model_path(path))
    if resolved.is_dir() and not any((resolved / name).exists() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(resolved, trust_remote_code=trust_remote_code)


def check_vocabulary_fits(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, *, field: str, trust_remote_code: bool = False
) -> None:
    """ConfigError when the model at `path` (config field `field`) has fewer token embeddings than
    `tokenizer` has tokens, so the tokenizer's ids cannot be its inputs."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ConfigError(
            f"{field}={str(path)!r} embeds {vocab_size} tokens but the policy's tokenizer has {len(tokenizer)}: it was "
            f"made for another tokenizer; save that tokenizer with the checkpoint, or use one made for the policy's"
        )


def load_causal_lm(
    path: str | Path,
    *,
    dtype: torch.dtype | str,
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    use_safetensors: bool | None = None,
    zero3_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """The causal LM at `path` (see resolve_model_path) in `dtype`, with eos/pad ids set.

    `dtype` is a torch dtype, "float32", "bfloat16", "float16", or "auto" (the checkpoint's).
    Missing bos/eos/pad ids in the model and generation configs are filled from `tokenizer` when
    given; a missing pad id otherwise falls back to the eos id. `use_safetensors=True` (pass
    ModelConfig.use_safetensors) refuses pickled weights: a local directory with only those raises
    ConfigError, a Hub repo without .safetensors fails to load; False and None (transformers' default:
    safetensors first, pickled .bin through torch.load(weights_only=True)) load them. validate() already
    refuses local pickled checkpoints of every model field unless model.use_safetensors=false.
    `zero3_config` (a DeepSpeed ZeRO stage-3 config) builds the model partitioned over the ranks of
    the default process group (rlhf.models.zero3): a collective call.
    """
    model = load_pretrained(
        AutoModelForCausalLM,
        path,
        what="a causal LM",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=use_safetensors,
        zero3_config=zero3_config,
    )
    fill_special_token_ids(model, tokenizer)
    return model


def load_sequence_scorer(
    path: str | Path,
    *,
    dtype: torch.dtype | str,
    trust_remote_code: bool = False,
    use_safetensors: bool | None = None,
    zero3_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """AutoModelForSequenceClassification(num_labels=1) at `path`, as load_causal_lm loads (zero3_config too).

    A checkpoint without a `score` head (a causal LM) gets a fresh one, transformers' initialisation.
    ConfigError when the model has no linear `score` head of one output (the reward model's shape).
    """
    from transformers import AutoModelForSequenceClassification

    model = load_pretrained(
        AutoModelForSequenceClassification,
        path,
        what="a sequence-classification model",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=use_safetensors,
        zero3_config=zero3_config,
        fresh=lambda name: name.startswith("score."),
        num_labels=1,
    )
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ConfigError(
            f"{path}: {type(model).__name__} has no linear `score` head of 1 output (num_labels=1); reward models "
            f"are decoder models whose sequence-classification class names its head `score`"
        )
    return model


def load_pretrained(
    auto_cls: Any,
    path: str | Path,
    *,
    what: str,
    dtype: torch.dtype | str,
    trust_remote_code: bool = False,
    use_safetensors: bool | None = None,
    zero3_config: dict[str, Any] | None = None,
    fresh: Callable[[str], bool] = lambda name: False,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """`auto_cls.from_pretrained` of `path` (see resolve_model_path and load_causal_lm), or built partitioned
    under ZeRO-3 when `zero3_config` is given (`fresh`: parameters the checkpoint may lack, such as a
    new head). ConfigError, naming `what` was loaded, when it cannot be."""
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or 'auto'")
        dtype = DTYPES[dtype]
    resolved = resolve_model_path(path)
    check_weight_files(resolved, use_safetensors=bool(use_safetensors))
    if zero3_config is not None:
        from rlhf.models.zero3 import load_partitioned

        local = local_checkpoint_dir(resolved)
        if dtype == "auto":
            from transformers import AutoConfig

            dtype = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code).dtype or torch.float32
        return load_partitioned(
            auto_cls,
            local,
            zero3_config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            fresh=fresh,
            **config_kwargs,
        )
    try:
        return auto_cls.from_pretrained(
            resolved,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True if use_safetensors else None,  # None: safetensors first, else .bin
            **config_kwargs,
        )
    except (OSError, ValueError) as e:
        hint = "; set model.use_safetensors=false to accept pickled weights you trust" if use_safetensors else ""
        raise ConfigError(f"cannot load {what} from {resolved!r}: {e}{hint}") from e


def local_checkpoint_dir(resolved: str) -> str:
    """`resolved` when it is a local directory, else the Hub snapshot's (config, safetensors) local copy."""
    if Path(resolved).is_dir():
        return resolved
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.py"])
    except Exception as e:  # network, unknown repo, gated repo: all say the same to the user
        raise ConfigError(f"cannot fetch {resolved!r} from the Hub: {e}") from e


def fill_special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    for config in (model.config, model.generation_config):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, name, None) is None and tokenizer is not None:
                setattr(config, name, getattr(tokenizer, name))
        if getattr(config, "pad_token_id", None) is None:
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if model.config.eos_token_id is None and model.generation_config.eos_token_id is None:
        logger.warning(
            "model %s has no eos token id; pass its tokenizer to load_causal_lm so generation can stop",
            model.name_or_path,
        )
