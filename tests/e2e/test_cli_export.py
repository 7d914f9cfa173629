"""`rlhf stage=export` end to end: peft adapters and run checkpoints become plain HF checkpoints.

The exported directory must load with AutoModelForCausalLM.from_pretrained alone and give the
logits of peft's own view of the adapter (PeftModel.from_pretrained(base, adapter), and its
merge_and_unload) to 1e-5 in float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import RLHFConfig
from rlhf.errors import ConfigError
from rlhf.models.loading import resolve_model_path
from rlhf.trainers.utility import run_utility

IDS = torch.tensor([[5, 17, 3, 40, 22, 9, 31], [8, 8, 2, 51, 14, 60, 7]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def save_adapter(directory: Path, config) -> Path:
    """A peft adapter on the tiny policy, its weights moved off their initialisation."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny")), config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory)
    return directory


def assert_matches_peft(exported: Path, base: str, adapter: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(exported)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    torch.testing.assert_close(logits(plain), logits(with_adapter), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(plain), logits(with_adapter.merge_and_unload()), rtol=0, atol=1e-5)


def test_export_merges_a_lora_adapter_through_the_cli(rlhf_cli, tmp_path):
    adapter = save_adapter(tmp_path / "adapter", LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    out = tmp_path / "merged"
    # no export.base: the adapter's adapter_config.json names its base model
    proc = rlhf_cli(tmp_path, "stage=export", f"export.adapter={adapter}", f"export.output={out}")
    proc.assert_ok()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).eos_token is not None
    assert_matches_peft(out, resolve_model_path("tiny"), adapter)

    # an unmergeable adapter is refused before any model is loaded, with exit code 2
    prompt = save_adapter(tmp_path / "prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    proc = rlhf_cli(tmp_path, "stage=export", "export.base=tiny", f"export.adapter={prompt}", f"export.output={out}-2")
    assert proc.returncode == 2
    assert "ConfigError" in proc.stderr + proc.stdout and "cannot be merged" in proc.stderr + proc.stdout
    assert not (tmp_path / "merged-2").exists()


def export_config(tmp_path: Path, **export) -> RLHFConfig:
    cfg = RLHFConfig(stage="export")
    cfg.run.output_dir = str(tmp_path / "run")
    for key, value in export.items():
        setattr(cfg.export, key, value)
    return cfg


@pytest.mark.parametrize(
    "export,message",
    [
        (dict(), "exactly one of export.adapter"),
        (dict(adapter="a", checkpoint="b"), "exactly one of export.adapter"),
        (dict(adapter="no/such/dir"), "export.adapter=no/such/dir: no such directory"),
        (dict(checkpoint="."), "neither a model directory"),
        (dict(adapter=".", dtype="int8"), "export.dtype='int8'"),
    ],
)
def test_bad_export_inputs_are_config_errors(tmp_path, monkeypatch, export, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        run_utility(export_config(tmp_path, **export))


def test_export_refuses_to_overwrite_its_input(tmp_path):
    adapter = save_adapter(tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="would overwrite its own input"):
        run_utility(export_config(tmp_path, adapter=str(adapter), output=str(adapter)))


@pytest.mark.ray
# Both slow: LoRA merged under ZeRO-3 is covered by tests/integration/sync (lora case), the export CLI by
# test_export_merges_a_lora_adapter_through_the_cli.
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_lora_training_under_zero3_then_export(rlhf_cli, tmp_path, stage):
    """LoRA SFT and LoRA DPO (reference = the frozen base) on 2 ZeRO-3 ranks export a merged model equal to peft's."""
    run = tmp_path / "run"
    proc = rlhf_cli(
        tmp_path,
        f"stage={stage}",
        "model.lora.rank=4",
        "model.lora.target_modules=[q_proj,v_proj]",
        "policy.zero_stage=3",
        "policy.num_workers=2",
        "policy.train_batch_size=8",
        "policy.micro_batch_size=2",
        "policy.optim.lr=1e-2",
        "policy.optim.warmup_steps=0",
        "policy.optim.scheduler=constant",
        "offline.max_steps=2",
        "offline.eval_at_start=false",
        "run.save_every=2",
        "run.eval_every=0",
        "run.eval_size=8",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "run.plots=false",
        f"run.output_dir={run}",
        timeout=600,
    )
    proc.assert_ok()
    final = run / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    base = resolve_model_path("tiny")
    assert_matches_peft(final, base, final / "adapter")  # save_hf's merge == peft's view of the saved adapter
    if stage == "dpo":
        return

    # the DeepSpeed step checkpoint (ZeRO-3 shards of the adapters only) exports to the same model
    out = tmp_path / "from-step"
    proc = rlhf_cli(
        tmp_path, "stage=export", f"export.checkpoint={run / 'checkpoints' / 'step_00000002'}", f"export.output={out}"
    )
    proc.assert_ok()
    exported = logits(AutoModelForCausalLM.from_pretrained(out))
    torch.testing.assert_close(exported, logits(AutoModelForCausalLM.from_pretrained(final)), rtol=0, atol=1e-5)
    assert (exported - logits(AutoModelForCausalLM.from_pretrained(base))).abs().max() > 1e-3  # training moved it
