"""Online DPO on the tiny world: real Ray, a 2-rank DeepSpeed policy, the HF rollout engine, the rule reward.

Checks, each against a hand-computed value:
- pairing: best vs worst sample per prompt (ties: the lower sample), all-equal prompts skipped,
  pairs beyond the last whole minibatch left out;
- the first DPO step of the run sees policy == reference, so its loss is ln 2 and its margin 0
  (sigmoid DPO at zero implicit reward), for both reference modes; and the "previous" reference
  (the policy's own logprobs at the round's start) equals the frozen initial model's on round 1;
- two rounds log the per-round metrics, write a checkpoint per round, and a rerun with one more
  round resumes from the second (run.resume=auto) instead of starting over.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR
from rlhf.config import RLHFConfig
from rlhf.data.batch import RolloutBatch
from rlhf.errors import ConfigError
from rlhf.trainers.online_dpo import OnlineDPOTrainer
from rlhf.trainers.prepare import prepare
from rlhf.utils.metrics import PhaseTimer, read_metrics
from rlhf.workers.offline_policy import OfflinePolicyWorker

# 8 prompts × 4 samples per round; 2 DeepSpeed ranks × micro 1 pair, 2 pairs per optimizer step.
SMALL = [
    "data.train=tiny:train:copy+reverse",
    "data.eval=tiny:eval:copy+reverse",
    "run.rollout_batch_size=8",
    "rollout.n_samples_per_prompt=4",
    "rollout.backend=hf",
    "rollout.sampling.max_new_tokens=8",
    "policy.num_workers=2",
    "policy.train_batch_size=2",
    "policy.micro_batch_size=1",
    "policy.optim.lr=3e-5",
    "cluster.collective_timeout_s=120",
    "run.eval_size=8",
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
]


def compose_config(tmp_path, *overrides: str) -> RLHFConfig:
    """The config `rlhf stage=online_dpo <SMALL> <overrides>` would run."""
    with initialize_config_dir(CONF_DIR, version_base=None):
        raw = compose(
            "config", overrides=["stage=online_dpo", *SMALL, f"run.output_dir={tmp_path / 'run'}", *overrides]
        )
    return OmegaConf.to_object(raw)  # type: ignore[return-value]


def scored_batch(scores: list[float], n: int) -> RolloutBatch:
    rows = len(scores)
    return RolloutBatch(
        prompt_ids=torch.ones(rows, 2, dtype=torch.long),
        prompt_mask=torch.ones(rows, 2),
        response_ids=torch.arange(rows).unsqueeze(1),
        response_mask=torch.ones(rows, 1),
        scores=torch.tensor(scores),
        group_ids=torch.arange(rows) // n,
    )


def test_pairs_are_best_vs_worst_per_prompt_in_whole_minibatches(tmp_path):
    cfg = compose_config(tmp_path, "policy.train_batch_size=2", "policy.micro_batch_size=1")
    trainer = SimpleNamespace(cfg=cfg, n=3)
    # prompt 0: best row 1 (0.9), worst row 0; prompt 1: all equal, skipped;
    # prompt 2: best row 6 (tie with row 8: the lower sample), worst row 7; prompt 3: best 9, worst 11
    scores = [0.1, 0.9, 0.5, 1, 1, 1, 1.0, 0.0, 1.0, 2, 1, 0]
    pairs, stats = OnlineDPOTrainer.pairs(trainer, scored_batch(scores, 3))  # type: ignore[arg-type]
    # 3 pairs found; train_batch_size 2 keeps the first 2 (rows chosen, rejected interleaved)
    assert pairs.response_ids.flatten().tolist() == [1, 0, 6, 7]
    assert stats == {
        "online_dpo/pairs": 3.0,
        "online_dpo/skipped_prompts": 1.0,
        "online_dpo/pairs_unused": 1.0,
        "online_dpo/score_margin": pytest.approx((0.8 + 1.0 + 2.0) / 3),
    }


def test_config_errors_name_the_field(tmp_path):
    from rlhf.config import validate

    for override, message in [
        ("online_dpo.reference=best", "online_dpo.reference='best' is not one of initial, previous"),
        ("rollout.n_samples_per_prompt=1", "rollout.n_samples_per_prompt must be >= 2"),
        ("offline.objective=kto", "offline.objective=kto is not a preference loss of the policy"),
        ("policy.train_batch_size=16", "run.rollout_batch_size 8 prompts give at most 8 pairs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_config(tmp_path, override))


def first_update(trainer: OnlineDPOTrainer) -> dict[str, float]:
    batch, _, _ = trainer._collect_once(0, PhaseTimer())
    pairs, stats = trainer.pairs(batch)
    assert len(pairs) >= 4, stats  # at least one whole minibatch of 2 pairs
    minibatch = pairs.select(list(range(4)))
    aux = trainer.reference_sums(minibatch)
    return trainer.policy.call(OfflinePolicyWorker.train_step, minibatch, aux) | {"aux": aux}


@pytest.mark.ray
@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_first_step_is_ln2_against_the_initial_policy(ray_cluster, tmp_path, reference):
    trainer = OnlineDPOTrainer(prepare(compose_config(tmp_path, f"online_dpo.reference={reference}")))
    try:
        assert (trainer.reference is not None) == (reference == "initial")
        stats = first_update(trainer)
        # policy == reference: every implicit reward is 0, loss = -log sigmoid(0) = ln 2
        assert stats["dpo/loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert stats["dpo/margin"] == pytest.approx(0.0, abs=1e-3)
        assert torch.isfinite(stats["aux"]).all() and (stats["aux"] < 0).all()
    finally:
        trainer.close()


@pytest.mark.ray
def test_two_rounds_log_checkpoint_and_resume(ray_cluster, tmp_path):
    cfg = compose_config(tmp_path, "run.total_steps=2", "run.save_every=1", "run.eval_every=1")
    trainer = OnlineDPOTrainer(prepare(cfg))
    try:
        trainer.fit()
    finally:
        trainer.close()
    out = tmp_path / "run"
    rows = read_metrics(out / "metrics.jsonl")
    rounds = [r for r in rows if "online_dpo/pairs" in r]
    assert [r["step"] for r in rounds] == [1, 2]
    for r in rounds:
        assert 0 <= r["reward/mean"] <= 1 and "eval/accuracy" in r
        assert r["online_dpo/pairs"] + r["online_dpo/skipped_prompts"] == 8
        if r["online_dpo/optimizer_steps"]:
            assert {"dpo/loss", "dpo/margin", "dpo/reward_accuracy", "timing/sync"} <= set(r)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert (out / "final" / "model.safetensors").exists()

    cfg.run.total_steps = 3
    trainer = OnlineDPOTrainer(prepare(cfg))
    try:
        trainer.fit()
    finally:
        trainer.close()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "online_dpo/pairs" in r]
    assert steps == [1, 2, 3]  # resumed after round 2, did not redo rounds 1-2
