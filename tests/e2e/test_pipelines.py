"""Shipped multi-stage recipes run end to end, each stage's final model feeding the next.

`rlhf-pipeline` subprocesses with the recipes of conf/pipeline/: real Ray, DeepSpeed, rollout
engines. The SFT -> DPO test (default suite) runs the recipe with fewer steps and checks that it
learns: SFT's held-out loss falls and DPO's held-out reward accuracy on the carry pairs rises from
0 (policy = reference) to >= 0.65. Measured with these sizes (200 SFT steps, 50 DPO steps), seeds
0/1/2 on a shared 2-core machine: SFT eval loss 5.59 -> 0.97 / 0.93 / 0.22, DPO held-out reward
accuracy 0.80 / 0.91 / 0.87; 65-150 s per run depending on the load. The other tests (slow) use
tiny sizes (a few optimizer steps per stage) and check the hand-off: every stage starts from the
previous stage's final directory and writes its own.
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
    "eval.max_prompts=8",  # run.final_eval of the recipes' steps
    "eval.n_samples=2",
    "eval.k=[1]",
    # RL stages
    "run.total_steps=2",
    "run.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=2",
    "rollout.sampling.max_new_tokens=8",
    "rollout.backend=hf",
]


def run_pipeline(tmp_path: Path, recipe: str, *more: str, sizes: list[str] = TINY) -> subprocess.CompletedProcess:
    """`rlhf-pipeline <recipe>` with `sizes` and `more` overrides; it must exit 0."""
    proc = subprocess.run(
        [PIPELINE, recipe, f"output_dir={tmp_path / recipe}", *sizes, *more],
        cwd=tmp_path,
        # starts its own Ray, as on a laptop, even where the caller's environment names a cluster to join
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc


def started_from(step_dir: Path) -> str:
    return OmegaConf.load(step_dir / "config.yaml").model.path


def read_rows(step_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (step_dir / "metrics.jsonl").read_text().splitlines()]


LEARNING = [  # sft_dpo with fewer steps (step-prefixed overrides): enough for DPO to learn the carry
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
    "sft:offline.max_steps=200",
    "dpo:offline.max_steps=50",
    "eval.max_prompts=8",
    "eval.n_samples=2",
    "eval.k=[1]",
]


def test_sft_then_dpo_recipe_learns_and_resumes(tmp_path):
    proc = run_pipeline(tmp_path, "sft_dpo", sizes=LEARNING)
    out = tmp_path / "sft_dpo"
    assert started_from(out / "dpo") == str((out / "sft" / "final").resolve())
    sft_loss = [r["eval/loss"] for r in read_rows(out / "sft") if "eval/loss" in r]
    assert sft_loss[-1] < 0.25 * sft_loss[0], sft_loss  # measured 5.59 -> 0.22..0.97
    reward_accuracy = [r["eval/reward_accuracy"] for r in read_rows(out / "dpo") if "eval/reward_accuracy" in r]
    assert reward_accuracy[0] == 0.0 and reward_accuracy[-1] >= 0.65, reward_accuracy  # measured 0.80..0.91
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert set(summary) == {"sft", "dpo"} and "final_eval/accuracy" in summary["dpo"]
    lines = (out / "pipeline_summary.txt").read_text().splitlines()
    assert lines[1].startswith("step dpo: eval/loss") and "eval/reward_accuracy 0.000 ->" in lines[1]
    assert lines[-1].startswith("recipe sft_dpo: held-out accuracy (greedy, run.final_eval) sft ")
    assert lines[-1] in proc.stderr  # logged too
    assert proc.stderr.count("Started a local Ray instance") == 1  # both steps and their final evaluations
    # a second run finds both steps done and trains nothing
    again = run_pipeline(tmp_path, "sft_dpo", sizes=LEARNING)
    assert again.stderr.count("finished in an earlier run; skipping") == 2


@pytest.mark.slow  # the pipeline runner is covered by the SFT -> DPO recipe above
def test_sft_then_reward_model_then_ppo_pipeline(tmp_path):
    run_pipeline(tmp_path, "sft_rm_ppo")
    out = tmp_path / "sft_rm_ppo"
    sft_final = str((out / "sft" / "final").resolve())
    assert started_from(out / "rm") == sft_final and started_from(out / "ppo") == sft_final
    ppo_cfg = OmegaConf.load(out / "ppo" / "config.yaml")
    assert ppo_cfg.reward.model_path == str((out / "rm" / "final").resolve())
    assert ppo_cfg.reward.fn == "tiny_world" and ppo_cfg.reward.weight == 0.0  # grades evaluation, trains nothing
    rows = read_rows(out / "ppo")
    assert any("reward/model_mean" in r and "reward/model_raw_mean" in r and "critic/loss" in r for r in rows)


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
    run_pipeline(tmp_path, recipe, "rollout.sampling.max_new_tokens=8")
    out = tmp_path / recipe
    last = "rl" if recipe == "reft" else "rlaif"
    rows = read_rows(out / last)
    assert [r["step"] for r in rows if "policy/loss" in r] == [1, 2]
    if recipe == "reft":
        assert started_from(out / "rl") == str((out / "warmup" / "final").resolve())
    else:
        assert any("reward/judge_unparseable" in r for r in rows)
