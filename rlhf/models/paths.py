"""Model paths in configs, checked before anything loads (no torch, no transformers: a wrong path fails the
CLI in about a second).

Model paths in configs accept, besides a directory or a Hub name, these tiny-world names
(built once into the cache by rlhf.models.warmup.tiny_world_models, seed 0):

  tiny, tiny:qwen2            Qwen2 tiny policy after the supervised warm-up (policy-sft)
  tiny:llama                  Llama tiny policy after the warm-up
  tiny-init, tiny-init:qwen2  Qwen2 tiny policy, random init (policy-init)
  tiny-init:llama             Llama tiny policy, random init
  tiny-judge                  Qwen2 tiny LLM judge of the carry world (rlhf.models.tiny_judge; its
                              rubric is rlhf.data.tiny_world.JUDGE_TEMPLATE; built on first use, ~40 s)

Tiny names win over a local directory of the same name; write "./tiny" to mean the directory.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.data.sources import is_produced, looks_like_path
from rlhf.errors import ConfigError

TINY_MODEL_NAMES = {
    "tiny": ("qwen2", "policy-sft"),
    "tiny:qwen2": ("qwen2", "policy-sft"),
    "tiny:llama": ("llama", "policy-sft"),
    "tiny-init": ("qwen2", "policy-init"),
    "tiny-init:qwen2": ("qwen2", "policy-init"),
    "tiny-init:llama": ("llama", "policy-init"),
    "tiny-judge": ("qwen2", "judge"),
}


def is_tiny_model_name(path: str | Path) -> bool:
    return isinstance(path, str) and (path in TINY_MODEL_NAMES or path.startswith(("tiny:", "tiny-init:")))


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
