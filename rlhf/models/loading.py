"""Load tokenizers and causal LMs from a local dir, a Hub name, or a tiny-world name.

Model paths in configs accept, besides a directory or a Hub name, these tiny-world names
(built once into the cache by rlhf.models.warmup.tiny_world_models, seed 0):

  tiny, tiny:qwen2            Qwen2 tiny policy after the supervised warm-up (policy-sft)
  tiny:llama                  Llama tiny policy after the warm-up
  tiny-init, tiny-init:qwen2  Qwen2 tiny policy, random init (policy-init)
  tiny-init:llama             Llama tiny policy, random init
  tiny-judge                  Qwen2 tiny LLM judge of the carry world (rlhf.models.tiny_judge; its
                              rubric is rlhf.data.tiny_world.JUDGE_TEMPLATE; built on first use, ~40 s)

Tiny names win over a local directory of the same name; write "./tiny" to mean the directory.

Both loaders guarantee what the rest of the framework assumes: the tokenizer has an eos and a
pad token (pad falls back to eos), and the model config and generation config carry eos/pad ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.data.sources import is_produced, looks_like_path
from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

TINY_MODEL_NAMES = {
    "tiny": ("qwen2", "policy-sft"),
    "tiny:qwen2": ("qwen2", "policy-sft"),
    "tiny:llama": ("llama", "policy-sft"),
    "tiny-init": ("qwen2", "policy-init"),
    "tiny-init:qwen2": ("qwen2", "policy-init"),
    "tiny-init:llama": ("llama", "policy-init"),
    "tiny-judge": ("qwen2", "judge"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_tiny_model_name(path: str | Path) -> bool:
    return isinstance(path, str) and (path in TINY_MODEL_NAMES or path.startswith(("tiny:", "tiny-init:")))


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


def check_model_path(path: str | Path, what: str = "model path") -> None:
    """ConfigError, without loading or building anything, when `path` can name no model: an unknown
    tiny name, a string that can only be a local path (absolute, ./ or ~ prefixed, or with more than
    one "/") where nothing exists, or a directory without config.json or tokenizer_config.json.
    Hub names pass (they are resolved when loaded). `what` names the value in the message."""
    if is_tiny_model_name(path):
        if path not in TINY_MODEL_NAMES:
            raise ConfigError(f"unknown tiny model {path!r}; known: {', '.join(TINY_MODEL_NAMES)}")
        return
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir() and not (local / "config.json").exists() and not (local / "tokenizer_config.json").exists():
            raise ConfigError(
                f"{str(path)!r} exists but holds no config.json or tokenizer_config.json; point at a Hugging Face checkpoint directory"
            )
        return
    if isinstance(path, Path) or looks_like_path(path):
        raise ConfigError(
            f"{what} {str(path)!r} does not exist (relative paths start from {Path.cwd()}); "
            f"fix the path, give a Hub name like 'Qwen/Qwen2.5-0.5B', or a tiny model ({', '.join(TINY_MODEL_NAMES)})"
        )


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files that torch.load unpickles (a pickle can run arbitrary code when loaded)."""
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")
"""Pickled files that transformers' Trainer writes next to the weights; never loaded as model weights."""
MODEL_PATH_FIELDS = (
    "model.path",
    "critic_model_path",
    "reward.model_path",
    "reward.judge.model_path",
    "distill.teacher_path",
    "offline.reference_path",
    "export.base",
    "eval.reference_model",
)
"""Config fields that name a model checkpoint (checked by `check_model_paths`)."""


def check_weight_files(path: str | Path, *, use_safetensors: bool = True, field: str = "model.path") -> None:
    """ConfigError when the local checkpoint directory `path` has pickled weights but no .safetensors,
    unless `use_safetensors` is False. Hub names, tiny names and missing paths pass (checked elsewhere)."""
    if not use_safetensors or is_tiny_model_name(path):
        return
    directory = Path(path).expanduser()
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickled = sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.name.endswith(PICKLE_WEIGHT_SUFFIXES) and p.name not in NOT_WEIGHTS
    )
    if pickled:
        raise ConfigError(
            f"{field}={str(path)!r} holds only pickled weights ({', '.join(pickled[:4])}), and loading a pickle "
            "can run arbitrary code. Convert the checkpoint to safetensors (load it once and "
            "save_pretrained(dir, safe_serialization=True)), or, for a checkpoint you trust, set model.use_safetensors=false"
        )


def check_model_paths(cfg, produced: Collection[Path] = ()) -> None:
    """`check_model_path` and `check_weight_files` on every model field of an RLHFConfig (MODEL_PATH_FIELDS)
    that is set; a path inside one of the `produced` directories (what an earlier pipeline step writes)
    counts as existing."""
    for field in MODEL_PATH_FIELDS:
        value = cfg
        for part in field.split("."):
            value = getattr(value, part)
        if not value:
            continue
        if not is_produced(value, produced):
            check_model_path(value, what=field)
        check_weight_files(value, use_safetensors=cfg.model.use_safetensors, field=field)


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
