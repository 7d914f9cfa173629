"""The optimizer step on 2 real DeepSpeed ranks (gloo), with and without CPU offload: non-finite steps
skipped together with weights untouched, and every offload setting training like the device optimizer.

One 2-rank PolicyWorker group serves every setting: `configure` rebuilds the engine in the same
actors with another TrainConfig (offload_optimizer: DeepSpeed's CPU Adam on the fp32 partitions).

The non-finite cases come in through the data, in rank 0's shard only (rows 0-3), so the all-reduced
flag must make rank 1 skip as well:
- a NaN advantage: the loss and the gradients are NaN. Without ZeRO DeepSpeed steps a plain torch
  AdamW and does not check (the engine checks the loss and the gradients itself); under ZeRO its
  overflow check fires on the NaN gradient norm too;
- a reference logprob of -inf with the k1 KL loss: the loss is +inf but its gradient is finite, so
  DeepSpeed would apply the step in every configuration: only the engine's gate on the optimizer
  (GatedAdamW, or GatedCPUAdam on ZeRO's offloaded fp32 partitions) and the LR schedule stops it.
The warm-up schedule makes every applied step change the learning rate, so a skipped step shows up
as an unchanged `policy/lr`.

Offload parity: three applied steps (a NaN step between them is skipped) from the same checkpoint
give the same full weights in every setting as ZeRO-2 with torch AdamW, within 1e-5 (fp32; the
settings reduce gradients in different orders and CPU Adam fuses its arithmetic with SIMD, ~1e-7
per step; lr 1e-3 moves a weight by ~3e-3 in three steps).
"""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from rlhf.config import AlgorithmConfig, ClusterConfig, OptimConfig, RLHFConfig, TrainConfig
from rlhf.trainers.roles import start_policy_group
from rlhf.workers.group import WorkerGroup
from rlhf.workers.policy import PolicyWorker

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LR = 1e-3
WARMUP = 10  # after k applied optimizer steps the lr is (k + 1) / 11 × LR (reported after the step)
WEIGHT_TOL = 1e-5


def train_config(zero_stage: int, *, offload_optimizer: bool = False, offload_params: bool = False) -> TrainConfig:
    return TrainConfig(
        num_workers=2,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        zero3_param_persistence_threshold=0,  # ZeRO-3 partitions (and offloads) every parameter
        micro_batch_size=2,
        train_batch_size=8,
        optim=OptimConfig(lr=LR, warmup_steps=WARMUP, weight_decay=0.1),
    )


SETTINGS = {
    "zero0-fp32": train_config(0),
    "zero2": train_config(2),
    "zero1-offload": train_config(1, offload_optimizer=True),
    "zero2-offload": train_config(2, offload_optimizer=True),
    "zero3-offload": train_config(3, offload_optimizer=True),
    "zero3-offload-params": train_config(3, offload_optimizer=True, offload_params=True),
}


@pytest.fixture(scope="module")
def policy(ray_session, tiny_model_path):
    cfg = RLHFConfig(
        policy=SETTINGS["zero0-fp32"],
        algorithm=AlgorithmConfig(kl_coef=0.1, use_kl_loss=True, kl_estimator="k1"),
        cluster=ClusterConfig(collective_timeout_s=120),
    )
    group = start_policy_group(cfg, PolicyWorker, role="policy-optimizer-step", algo_cfg=cfg.algorithm)
    yield group, tiny_model_path
    group.shutdown()


def _rebuild(worker, train_cfg: TrainConfig, model_path: str) -> None:
    """Drop this rank's engine and build a fresh one from the checkpoint with `train_cfg`; runs in the actor."""
    import gc

    worker.train_cfg = train_cfg
    worker.engine = None
    gc.collect()
    worker.init_model(model_path)


def configure(policy, setting: str) -> WorkerGroup:
    group, model_path = policy
    ray.get([a.__ray_call__.remote(_rebuild, SETTINGS[setting], model_path) for a in group.actors], timeout=300)
    return group


def _full_weights(worker) -> dict[str, torch.Tensor]:
    """The full parameters, gathered under ZeRO-3 (rank 1 takes part and returns nothing); runs in the actor."""
    return {name: t.clone() for name, t in worker.engine.iter_full_parameters()}


def weights(group: WorkerGroup) -> dict[str, torch.Tensor]:
    full, rest = ray.get([a.__ray_call__.remote(_full_weights) for a in group.actors])
    assert full and not rest
    return full


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


def batches(group: WorkerGroup, batch_factory):
    """(good, NaN advantage, -inf reference logprob) batches; the bad values sit in row 0 (rank 0's shard)."""
    batch = batch_factory(rows=8, seed=1)
    old = group.call(PolicyWorker.compute_logprobs, batch)
    sign = torch.tensor([1.0] * 4 + [-1.0] * 4).unsqueeze(1)
    good = batch.replace(old_logprobs=old, ref_logprobs=old.clone(), advantages=sign.expand_as(old).clone())
    nan_advantages = good.advantages.clone()
    nan_advantages[0, 0] = float("nan")
    inf_ref = good.ref_logprobs.clone()
    inf_ref[0, 0] = float("-inf")  # k1 = logprob - ref = +inf; d/dlogprob = 1: finite gradients
    return good, good.replace(advantages=nan_advantages), good.replace(ref_logprobs=inf_ref)


@pytest.mark.parametrize("setting", ["zero0-fp32", "zero2", "zero2-offload", "zero3-offload-params"])
def test_nonfinite_steps_are_skipped_on_every_rank_and_counted(policy, setting, batch_factory):
    group = configure(policy, setting)
    good, nan_loss, inf_loss_finite_grads = batches(group, batch_factory)

    first = group.call(PolicyWorker.update, good)
    assert first["policy/lr"] == pytest.approx(2 / 11 * LR)
    assert first["policy/nonfinite_skipped"] == 0 and first["policy/nonfinite_total"] == 0
    before = weights(group)

    skipped = group.call(PolicyWorker.update, nan_loss)
    assert same(weights(group), before)  # bit-exact: no optimizer update on either rank
    assert skipped["policy/nonfinite_skipped"] == 1
    assert skipped["policy/nonfinite_consecutive"] == 1
    assert skipped["policy/nonfinite_total"] == 1
    assert skipped["policy/nonfinite_loss"] == 1  # the loss went non-finite (not only the gradient norm)
    assert skipped["policy/lr"] == pytest.approx(2 / 11 * LR)  # the schedule did not advance

    gated = group.call(PolicyWorker.update, inf_loss_finite_grads)
    assert torch.isfinite(torch.tensor(gated["policy/grad_norm"]))  # DeepSpeed alone would have stepped
    assert same(weights(group), before)  # the gate held the optimizer (on the offloaded partitions too)
    assert gated["policy/nonfinite_consecutive"] == 2 and gated["policy/nonfinite_loss"] == 1
    assert gated["policy/lr"] == pytest.approx(2 / 11 * LR)

    resumed = group.call(PolicyWorker.update, good)
    after = weights(group)
    assert not same(after, before)  # a finite step updates again
    assert all(torch.isfinite(t).all() for t in after.values())
    assert resumed["policy/lr"] == pytest.approx(3 / 11 * LR)  # the second applied step
    assert resumed["policy/nonfinite_skipped"] == 0
    assert resumed["policy/nonfinite_consecutive"] == 0
    assert resumed["policy/nonfinite_total"] == 2
    assert torch.isfinite(torch.tensor(resumed["policy/grad_norm"]))

    for streak in (1, 2, 3):
        stats = group.call(PolicyWorker.update, nan_loss if streak % 2 else inf_loss_finite_grads)
        assert stats["policy/nonfinite_consecutive"] == streak
    assert stats["policy/nonfinite_total"] == 5
    assert same(weights(group), after)


def test_every_offload_setting_trains_like_the_device_optimizer(policy, batch_factory):
    reference: dict[str, torch.Tensor] = {}
    for setting in ["zero2", "zero1-offload", "zero2-offload", "zero3-offload", "zero3-offload-params"]:
        group = configure(policy, setting)
        good, nan_loss, _ = batches(group, batch_factory)
        losses = [group.call(PolicyWorker.update, good)["policy/total_loss"]]
        assert group.call(PolicyWorker.update, nan_loss)["policy/nonfinite_skipped"] == 1
        losses += [group.call(PolicyWorker.update, good)["policy/total_loss"] for _ in range(2)]
        assert losses[2] < losses[1] < losses[0], f"{setting}: the loss did not go down: {losses}"
        trained = weights(group)
        if not reference:
            reference = trained
            continue
        error = max((trained[n] - reference[n]).abs().max().item() for n in reference)
        assert error < WEIGHT_TOL, f"{setting} weights differ from zero2's by {error:.2e}"
