"""Shipped multi-stage recipes run end to end, each stage's final model feeding the next.

`rlhf-pipeline` subprocesses with the recipes of conf/pipeline/ and tiny sizes (a few optimizer
steps per stage): real Ray, DeepSpeed on 2 gloo ranks, rollout engines. What is checked is the
hand-off: every stage starts from the previous stage's final directory and writes its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytestmark = [pytest.mark.ray]

PIPELINE = str(Path(sys.executable).with_name("rlhf-pipeline"))
ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
    # offline stages: a few steps of small batches (sizes count examples or pairs)
    "offline.max_steps=3",
    "offline.eval_at_start=false",
    "policy.train_batch_size=8",
    "policy.micro_batch_size=4",
    "critic.train_batch_size=8",
    "critic.micro_batch_size=4",
    "run.eval_size=8",
    "run.eval_every=0",
    # RL stages
    "run.total_steps=2",
    "run.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=2",
    "rollout.sampling.max_new_tokens=8",
    "rollout.backend=hf",
]


def run_pipeline(tmp_path: Path, recipe: str, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PIPELINE, recipe, f"output_dir={tmp_path / recipe}", *TINY, *extra],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc


def started_from(step_dir: Path) -> str:
    return OmegaConf.load(step_dir / "config.yaml").model.path


@pytest.mark.slow  # the pipeline runner is covered by the SFT→RM→PPO recipe; DPO after SFT by tests/integration/offline
def test_sft_then_dpo_pipeline(tmp_path):
    run_pipeline(tmp_path, "sft_dpo")
    out = tmp_path / "sft_dpo"
    assert (out / "sft" / "final" / "model.safetensors").exists()
    assert started_from(out / "dpo") == str((out / "sft" / "final").resolve())
    assert (out / "dpo" / "final" / "model.safetensors").exists()
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert set(summary) == {"sft", "dpo"}
    # a second run finds both steps done and trains nothing
    again = run_pipeline(tmp_path, "sft_dpo")
    assert again.stderr.count("finished in an earlier run; skipping") == 2


def test_sft_then_reward_model_then_ppo_pipeline(tmp_path):
    run_pipeline(tmp_path, "sft_rm_ppo")
    out = tmp_path / "sft_rm_ppo"
    sft_final = str((out / "sft" / "final").resolve())
    assert started_from(out / "rm") == sft_final and started_from(out / "ppo") == sft_final
    ppo_cfg = OmegaConf.load(out / "ppo" / "config.yaml")
    assert ppo_cfg.reward.model_path == str((out / "rm" / "final").resolve()) and ppo_cfg.reward.fn is None
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/model_mean" in r and "critic/loss" in r for r in rows)


@pytest.mark.slow  # the recipe by the test above; LoRA on the reward model and the critic by tests/integration/peft
def test_sft_rm_ppo_pipeline_with_lora_on_every_trained_model(tmp_path):
    """model.peft applies to the reward model and the critic too; the LoRA reward model's merged final/ is PPO's RM."""
    from safetensors.torch import load_file

    proc = run_pipeline(tmp_path, "sft_rm_ppo", "model.peft.method=lora", "model.lora.rank=4")
    out = tmp_path / "sft_rm_ppo"
    assert (out / "rm" / "final" / "adapter" / "adapter_config.json").is_file()
    sft = load_file(out / "sft" / "final" / "model.safetensors")
    rm = load_file(out / "rm" / "final" / "model.safetensors")
    adapted = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "score.weight")
    frozen = [name for name in rm if not name.endswith(adapted)]
    assert frozen and all(torch.equal(rm[name], sft[name]) for name in frozen)  # only LoRA's targets and the head moved
    assert "shares the policy's tokenizer: it scores the policy's token ids" in proc.stderr
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/model_mean" in r and "critic/loss" in r for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["reft", "rlaif"])
def test_reft_and_rlaif_recipes_run(tmp_path, recipe):
    """ReFT (CoT SFT warm-up -> GRPO with the rule grader) and RLAIF (GRPO against the tiny judge) run as shipped."""
    run_pipeline(tmp_path, recipe, "rollout.sampling.max_new_tokens=8", "reward.judge.max_new_tokens=8")
    out = tmp_path / recipe
    last = "rl" if recipe == "reft" else "rlaif"
    rows = [json.loads(line) for line in (out / last / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "policy/loss" in r] == [1, 2]
    if recipe == "reft":
        assert started_from(out / "rl") == str((out / "warmup" / "final").resolve())
    else:
        assert any("reward/judge_unparseable" in r for r in rows)
