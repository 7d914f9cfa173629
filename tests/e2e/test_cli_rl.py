"""The console script end to end: real Ray, DeepSpeed (gloo, 2 policy ranks), rollout engines, tiny world."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from rlhf.utils.metrics import read_metrics

pytestmark = [pytest.mark.ray]


# 4 prompts × 4 samples = 16 sequences per step; 2 ranks × micro 4 = 8 per optimizer step.
SMALL = [
    "run.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=4",
    "policy.train_batch_size=8",
    "policy.micro_batch_size=4",
    "critic.train_batch_size=8",
    "critic.micro_batch_size=4",
    "rollout.sampling.max_new_tokens=8",
    "run.eval_size=8",
    "run.eval_every=0",
    "run.progress_bar=false",
]


@pytest.fixture
def run_cli(rlhf_cli):
    """The console script (tests/conftest.py) with this file's SMALL sizes first."""
    return functools.partial(rlhf_cli, defaults=SMALL)


# the ppo ZeRO-3 case runs policy, critic and reference by token budget (packed micro-batches, ranks
# balanced by tokens): 96 >= data.max_prompt_length 64 + 8 new tokens, several sequences per micro-batch
TOKEN_BUDGETS = [f"{role}.max_tokens_per_micro_batch=96" for role in ("policy", "critic", "reference")]
# the grpo ZeRO-2 case scores with a custom reward given by import path (the repo is on the run's PYTHONPATH),
# plus DAPO's overlong penalty as a second component (docs/rewards.md)
CUSTOM_REWARD = [
    "reward.fn=tests.fixtures.my_reward:score",
    "reward.components=[{fn: overlong_penalty, weight: 0.5, kwargs: {buffer: 4}}]",
]


@pytest.mark.parametrize(
    "stage,zero,backend,extra",
    [
        ("grpo", 2, "vllm", CUSTOM_REWARD),
        pytest.param("grpo", 3, "hf", [], marks=pytest.mark.slow),  # ZeRO-3 and hf are each covered by a ppo case
        pytest.param("ppo", 2, "hf", [], marks=pytest.mark.slow),  # hf backend: every RL learning test runs on it
        ("ppo", 3, "vllm", TOKEN_BUDGETS),
    ],
    ids=["grpo-2-vllm-custom-reward", "grpo-3-hf", "ppo-2-hf", "ppo-3-vllm-token-budgets"],
)
def test_rl_stage_runs_end_to_end(run_cli, tmp_path, stage, zero, backend, extra):
    """Sampling at temperature 0.7; the policy takes one optimizer step per RL step (train_batch_size 16).

    Under ZeRO-3 the reference (PPO's KL term) is a ZeRO-3 group of 2 actors too, every parameter partitioned;
    with the token budgets its ranks pack their shards and even out their forward passes. With the custom
    reward, each step's reward is the sum of its components as logged: score + 0.5 × overlong penalty.
    """
    out = tmp_path / "run"
    sharded_reference = [
        "reference.num_workers=2",
        "reference.zero_stage=3",
        "reference.zero3_param_persistence_threshold=0",
    ]
    proc = run_cli(
        tmp_path,
        *extra,
        f"stage={stage}",
        f"policy.zero_stage={zero}",
        f"critic.zero_stage={zero}",
        f"rollout.backend={backend}",
        "rollout.sampling.temperature=0.7",
        "policy.train_batch_size=16",
        "run.total_steps=2",
        f"run.output_dir={out}",
        *(sharded_reference if zero == 3 else []),
    )
    proc.assert_ok()
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "reward/mean" in r and "policy/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    if stage == "ppo":  # step 1 scores the initial weights twice: policy (old) and reference logprobs agree
        assert abs(steps[0]["reward/kl_to_ref"]) < 1e-5
    for row in steps:
        assert row["timing/generate"] > 0 and row["timing/sync"] > 0
        assert row["weight_sync/mib"] > 0 and row["weight_sync/buckets"] >= 1
        # engine vs trainer float32 logprobs of the same samples, both at temperature 0.7 (at 1 the
        # trainer's differ by ~0.08); step 2 runs on synced weights
        assert row["rollout/logprob_diff"] < 1e-4 and row["rollout/mismatch_kl"] < 1e-7  # k3 ~ diff^2 / 2
        # the update's first (here: only) minibatch scores at the temperature old_logprobs used: ratio 1
        assert row["policy/approx_kl"] < 1e-8 and row["policy/clip_frac"] == 0.0
        if stage == "ppo":
            assert "critic/loss" in row
        if extra is CUSTOM_REWARD:
            assert 0.0 <= row["reward/score_mean"] <= 1.0
            assert -1.0 <= row["reward/overlong_penalty_mean"] <= 0.0
            expected = row["reward/score_mean"] + 0.5 * row["reward/overlong_penalty_mean"]
            assert row["reward/mean"] == pytest.approx(expected, abs=1e-5)
    if extra is CUSTOM_REWARD:
        assert "reward: 1 × score + 0.5 × overlong_penalty" in proc.stderr + proc.stdout
    assert any("eval/accuracy" in r for r in rows)
    final = out / "final"
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    # the run directory holds TensorBoard events and the PNG plots next to metrics.jsonl
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"reward.png", "loss.png", "timings.png", "response_length.png"} <= plots
    if extra is CUSTOM_REWARD:  # `stage=report` redraws them from metrics.jsonl alone
        for png in (out / "plots").glob("*.png"):
            png.unlink()
        run_cli(tmp_path, "stage=report", f"report.run_dir={out}", timeout=120).assert_ok()
        assert {p.name for p in (out / "plots").glob("*.png")} == plots
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)


def test_config_error_before_ray_starts(run_cli, tmp_path):
    proc = run_cli(tmp_path, "policy.train_batch_size=12", f"run.output_dir={tmp_path / 'bad'}", timeout=120)
    assert proc.returncode == 2
    assert "policy.train_batch_size 12 is not divisible" in proc.stderr + proc.stdout
    assert not proc.used_ray
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_unknown_stage_lists_known(run_cli, tmp_path):
    proc = run_cli(tmp_path, "algorithm.advantage=grpoo", f"run.output_dir={tmp_path / 'bad'}", timeout=120)
    assert proc.returncode == 2
    text = proc.stderr + proc.stdout
    assert "unknown advantage estimator 'grpoo'" in text and "known: grpo" in text


def timeless(row: dict[str, float]) -> dict[str, float]:
    """A metrics row without what the clock measures (phase timings, throughput, sync speed)."""
    clock = ("timing/", "perf/", "weight_sync/seconds", "weight_sync/gb_per_s")
    return {k: v for k, v in row.items() if not k.startswith(clock)}


def checkpoint_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The policy's module weights in a step checkpoint (DeepSpeed's model-states file of rank 0)."""
    (states,) = (step_dir / "policy").rglob("mp_rank_00_model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


@pytest.mark.slow  # 144 s of CLI runs; run.deterministic reaching every actor: test_worker_group, test_seeding
def test_deterministic_runs_repeat_and_resume_reproduces_next_step(run_cli, tmp_path):
    """run.deterministic=true: two runs with one seed log the same numbers and save the same weights;
    stopped after step 2 and resumed, step 3 matches an uninterrupted run."""
    common = ["stage=grpo", "rollout.backend=vllm", "run.deterministic=true", "run.save_every=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli(tmp_path, *common, "run.total_steps=3", f"run.output_dir={full}").assert_ok()
    run_cli(tmp_path, *common, "run.total_steps=2", f"run.output_dir={part}").assert_ok()
    # steps 1-2 of the two runs, metrics and the weights checkpointed after step 2, exactly
    a = {r["step"]: r for r in read_metrics(full / "metrics.jsonl") if "policy/loss" in r}
    b = {r["step"]: r for r in read_metrics(part / "metrics.jsonl") if "policy/loss" in r}
    assert [timeless(b[s]) for s in (1, 2)] == [timeless(a[s]) for s in (1, 2)]
    weights = [checkpoint_weights(run / "checkpoints" / "step_00000002") for run in (full, part)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    run_cli(tmp_path, *common, "run.total_steps=3", f"run.output_dir={part}").assert_ok()
    b = {r["step"]: r for r in read_metrics(part / "metrics.jsonl") if "policy/loss" in r}
    assert sorted(b) == [1, 2, 3]
    for key in ("reward/mean", "rollout/response_length", "policy/loss", "policy/entropy"):
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-4, abs=1e-5), key


def test_failing_actor_stops_run_with_its_traceback(run_cli, tmp_path):
    """A reward-model actor that cannot load its checkpoint stops the run: exit 2, role named, remote traceback."""
    broken = tmp_path / "broken-rm"
    broken.mkdir()
    from rlhf.models.loading import load_tokenizer
    from rlhf.models.tiny import tiny_config

    # made for the policy's tokenizer, so the start-up tokenizer check passes and the actor's load fails
    config = tiny_config("qwen2", vocab_size=len(load_tokenizer("tiny")))
    config.architectures = ["Qwen2ForSequenceClassification"]
    config.num_labels = 1
    config.save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    proc = run_cli(
        tmp_path,
        "rollout.backend=hf",
        "policy.num_workers=1",  # fewer processes to start: the run stops at the reward model's load
        "run.total_steps=1",
        f"reward.model_path={broken}",
        f"run.output_dir={tmp_path / 'out'}",
        timeout=300,
        own_cluster=True,  # as on a laptop: the run starts its own Ray, and stops it after the failure
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Started a local Ray instance" in text
    assert "WorkerError: reward rank 0: init_model raised" in text
    assert "traceback from reward rank 0" in text
