"""`rlhf stage=export`: a plain Hugging Face checkpoint (merged, safetensors, config, tokenizer) from

  export.adapter=<peft adapter dir> [export.base=<model>]   merge a LoRA/IA3/LoHa/LoKr adapter into its base
  export.checkpoint=<run>/final                             re-save a run's final model
  export.checkpoint=<run>/step_XXXXXXXX                     a DeepSpeed checkpoint of the policy: its
                                                            trained parameters on the run's base model

The result loads with `AutoModelForCausalLM.from_pretrained` and vLLM serves it. Merging uses the
trainer's own export path (rlhf.engines.train_engine.iter_full_parameters), so what stage=export
writes is what the run's weight sync and save_hf would have written. Every path is checked before
any model is loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from rlhf.config import ModelConfig, RLHFConfig
from rlhf.errors import CheckpointError, ConfigError
from rlhf.utils.distributed import import_deepspeed

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
POLICY_DIR = "policy"
"""Subdirectory of a run's step checkpoint that holds the policy's DeepSpeed state."""
DEEPSPEED_TAG = "state"
"""rlhf.engines.train_engine.CHECKPOINT_TAG (not imported: this module must load without DeepSpeed's start-up cost)."""
UNMERGEABLE = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")


@dataclass
class ExportPlan:
    """What stage=export will do, decided from the config and the files before any loading."""

    kind: str
    """adapter, final or step."""
    base: str
    """Resolved base model (adapter, step) or the final directory itself (final)."""
    output: Path
    adapter: Optional[Path] = None
    policy_dir: Optional[Path] = None
    """step: the DeepSpeed checkpoint directory of the policy."""
    model_cfg: Optional[ModelConfig] = None
    """step: the run's model config (how the parameters were wrapped)."""


def run_export(cfg: RLHFConfig) -> dict[str, float]:
    """Plan (validating every path), load, merge, write; returns export/* numbers."""
    plan = plan_export(cfg)
    dtype = cfg.export.dtype
    if plan.kind == "adapter":
        model = _load_adapter_model(plan, dtype, cfg.model.trust_remote_code)
    elif plan.kind == "step":
        model = _load_step_model(plan, dtype)
    else:
        model = _load_plain(plan.base, dtype, cfg.model.trust_remote_code)
    written = write_plain_checkpoint(model, plan.output, tokenizer=_tokenizer(plan, cfg.model.trust_remote_code))
    logger.info("exported %s (%s) to %s", plan.adapter or plan.policy_dir or plan.base, plan.kind, plan.output)
    return {"export/tensors": float(written["tensors"]), "export/mib": written["bytes"] / 2**20}


# -- planning: every check that needs no model ------------------------------------------------


def plan_export(cfg: RLHFConfig) -> ExportPlan:
    """ConfigError for missing, contradictory or unmergeable inputs, naming the field to fix."""
    from rlhf.models.loading import resolve_model_path

    export = cfg.export
    if export.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"export.dtype={export.dtype!r} is not one of auto, float32, bfloat16, float16")
    if bool(export.adapter) == bool(export.checkpoint):
        raise ConfigError(
            "stage=export needs exactly one of export.adapter=<peft adapter dir> (with export.base=<model>) "
            "or export.checkpoint=<a run's final/ or step_XXXXXXXX dir>"
        )
    output = Path(export.output or Path(cfg.run.output_dir) / "export").expanduser()
    if export.adapter:
        adapter = _existing_dir(export.adapter, "export.adapter")
        adapter_cfg = _adapter_config(adapter, "export.adapter")
        base = export.base or adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter / ADAPTER_CONFIG} names no base model; set export.base=<model path>")
        plan = ExportPlan("adapter", resolve_model_path(base), output, adapter=adapter)
    else:
        plan = _plan_checkpoint(_existing_dir(export.checkpoint, "export.checkpoint"), export.base, output)
    for source in (plan.base, plan.adapter, plan.policy_dir):
        if source is not None and Path(source).exists() and Path(source).resolve() == output.resolve():
            raise ConfigError(f"export.output={output} would overwrite its own input; choose another directory")
    return plan


def _plan_checkpoint(checkpoint: Path, base: Optional[str], output: Path) -> ExportPlan:
    from rlhf.models.loading import resolve_model_path

    if (checkpoint / "config.json").is_file():  # a run's final/ (plain weights, maybe adapter/ beside them)
        if (checkpoint / "adapter" / ADAPTER_CONFIG).is_file():
            _adapter_config(checkpoint / "adapter", "export.checkpoint's adapter/")  # rejects prompt tuning
        if base:
            raise ConfigError(f"{checkpoint} is a complete model; drop export.base (it is only for adapters)")
        return ExportPlan("final", str(checkpoint), output)
    policy_dir = checkpoint / POLICY_DIR if (checkpoint / POLICY_DIR).is_dir() else checkpoint
    state_file = (policy_dir.parent if policy_dir != checkpoint else checkpoint) / "trainer_state.json"
    if (checkpoint / "final").is_dir() or (checkpoint / "checkpoints").is_dir():
        raise ConfigError(
            f"export.checkpoint={checkpoint} is a run's output directory; point at its final/ or at one of its "
            f"checkpoints/step_XXXXXXXX directories"
        )
    if not (policy_dir / DEEPSPEED_TAG).is_dir() or not state_file.is_file():
        raise ConfigError(
            f"export.checkpoint={checkpoint} is neither a model directory (config.json) nor a run's step checkpoint "
            f"(trainer_state.json + {POLICY_DIR}/{DEEPSPEED_TAG}/); found: {_listing(checkpoint)}"
        )
    model_cfg = _run_model_config(state_file)
    from rlhf.models.peft_methods import PROMPT_METHODS, peft_method

    method = peft_method(model_cfg)
    if method in PROMPT_METHODS:
        raise ConfigError(
            f"{checkpoint} was trained with model.peft.method={method}, whose virtual tokens cannot be merged into "
            f"plain weights; the run's final/ directory holds the base model and its adapter/"
        )
    if method == "qlora":  # merge onto the full-precision base, as peft's merge_and_unload on a dequantised model
        model_cfg.peft.method = "lora"
    return ExportPlan(
        "step", resolve_model_path(base or model_cfg.path), output, policy_dir=policy_dir, model_cfg=model_cfg
    )


def _existing_dir(path: str, field_name: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{field_name}={path}: no such directory (relative paths start from {Path.cwd()})")
    return directory


def _adapter_config(adapter: Path, field_name: str) -> dict[str, Any]:
    config_file = adapter / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ConfigError(f"{field_name}={adapter} holds no {ADAPTER_CONFIG}; point at a peft adapter directory")
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ConfigError(f"{field_name}={adapter} holds no adapter_model.safetensors (or .bin)")
    adapter_cfg = json.loads(config_file.read_text(encoding="utf-8"))
    peft_type = str(adapter_cfg.get("peft_type", "")).upper()
    if peft_type in UNMERGEABLE:
        raise ConfigError(
            f"{field_name}={adapter} is a {peft_type} adapter: its virtual tokens cannot be merged into plain "
            f"weights; serve it with peft (PeftModel.from_pretrained(base, adapter)) instead"
        )
    return adapter_cfg


def _run_model_config(state_file: Path) -> ModelConfig:
    from omegaconf import OmegaConf

    state = json.loads(state_file.read_text(encoding="utf-8"))
    saved = (state.get("config") or {}).get("model")
    if saved is None:
        raise ConfigError(f"{state_file} records no config.model; cannot tell the base model and PEFT method")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved))  # type: ignore[return-value]


def _listing(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "nothing"


# -- loading ----------------------------------------------------------------------------------


def _load_plain(path: str, dtype: str, trust_remote_code: bool) -> nn.Module:
    from rlhf.models.loading import load_causal_lm

    return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)


def _load_adapter_model(plan: ExportPlan, dtype: str, trust_remote_code: bool) -> nn.Module:
    from peft import PeftModel

    base = _load_plain(plan.base, dtype, trust_remote_code)
    try:
        return PeftModel.from_pretrained(base, str(plan.adapter))
    except (ValueError, RuntimeError, KeyError) as e:  # shapes or module names of another base model
        raise ConfigError(f"export.adapter={plan.adapter} does not fit the base model {plan.base}: {e}") from e


def _load_step_model(plan: ExportPlan, dtype: str) -> nn.Module:
    """The run's base model, wrapped as in training, with the checkpoint's trained parameters loaded."""
    from rlhf.models.peft_utils import apply_peft

    assert plan.model_cfg is not None and plan.policy_dir is not None
    model = apply_peft(_load_plain(plan.base, dtype, plan.model_cfg.trust_remote_code), plan.model_cfg)
    trained = deepspeed_state_dict(plan.policy_dir)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    unexpected = sorted(set(trained) - set(params))
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in trained)
    if unexpected or missing:
        raise CheckpointError(
            f"{plan.policy_dir} does not match {plan.base} wrapped with the run's model config: "
            f"unexpected {unexpected[:3]}, missing trainable {missing[:3]}"
        )
    with torch.no_grad():
        for name, tensor in trained.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model


def deepspeed_state_dict(policy_dir: Path) -> dict[str, torch.Tensor]:
    """The saved parameters of a TrainEngine checkpoint (fp32 master weights under ZeRO 1-3)."""
    tag_dir = policy_dir / DEEPSPEED_TAG
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        zero_to_fp32 = import_deepspeed("utils.zero_to_fp32")
        return dict(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(policy_dir), tag=DEEPSPEED_TAG))
    model_states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_states:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt)")
    return dict(torch.load(model_states[0], map_location="cpu", weights_only=False)["module"])


def _tokenizer(plan: ExportPlan, trust_remote_code: bool) -> Any:
    """The adapter's or final dir's tokenizer, else the base model's; None (with a warning) when none has one."""
    from rlhf.models.loading import load_tokenizer
    from rlhf.models.paths import is_tiny_model_name

    for source in (plan.adapter, plan.base):
        if source is None:
            continue
        if is_tiny_model_name(str(source)) or (Path(source) / "tokenizer_config.json").is_file():
            return load_tokenizer(str(source), trust_remote_code=trust_remote_code)
        if not Path(source).exists():  # a Hub name
            return load_tokenizer(str(source), trust_remote_code=trust_remote_code)
    logger.warning("no tokenizer found beside %s; the export holds weights and config only", plan.base)
    return None


# -- writing ----------------------------------------------------------------------------------


def write_plain_checkpoint(model: nn.Module, output: Path, *, tokenizer: Any = None) -> dict[str, int]:
    """Merged, plain-named weights of `model` (peft-wrapped or not) as a safetensors HF checkpoint."""
    from rlhf.engines.train_engine import iter_full_parameters, write_hf_checkpoint
    from rlhf.models.peft_utils import export_root

    plain = export_root(model)
    counts = {"tensors": 0, "bytes": 0}

    def counted():
        for name, tensor in iter_full_parameters(model, rank=0):
            counts["tensors"] += 1
            counts["bytes"] += tensor.numel() * tensor.element_size()
            yield name, tensor

    write_hf_checkpoint(
        output,
        counted(),
        config=plain.config,
        tokenizer=tokenizer,
        generation_config=getattr(plain, "generation_config", None),
    )
    return counts
