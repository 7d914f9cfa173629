"""Non-finite guard of the train engine on 2 real DeepSpeed ranks (gloo): skipped together, weights untouched.

The NaN comes in through the data: one advantage of row 0 is NaN, so only rank 0 (rows 0-3) sees a
non-finite loss; the all-reduced flag must make rank 1 skip as well. Two layouts cover the two skip
paths: ZeRO-0 in fp32, where DeepSpeed steps a plain torch AdamW and does not check (the engine checks
the loss and the gradients and gates AdamW and the LR schedule itself), and ZeRO-2, where DeepSpeed's
own overflow check also fires on the NaN gradient norm. The warm-up schedule makes every applied
step change the learning rate, so a skipped step shows up as an unchanged `policy/lr`.
"""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from rlhf.config import AlgorithmConfig, ClusterConfig, ModelConfig, OptimConfig, ResourceConfig, TrainConfig
from rlhf.workers.group import WorkerGroup
from rlhf.workers.policy import PolicyWorker

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LR = 1e-3
WARMUP = 10  # after k applied optimizer steps the lr is (k + 1) / 11 × LR (reported after the step)


def start_policy(zero_stage: int, model_path: str) -> WorkerGroup:
    train_cfg = TrainConfig(
        num_workers=2,
        zero_stage=zero_stage,
        micro_batch_size=2,
        train_batch_size=8,
        optim=OptimConfig(lr=LR, warmup_steps=WARMUP),
    )
    group = WorkerGroup(
        PolicyWorker,
        role=f"policy-nonfinite-z{zero_stage}",
        num_workers=2,
        resources=ResourceConfig(num_cpus=1),
        init_args=(ModelConfig(), train_cfg, AlgorithmConfig(kl_coef=0.0), ClusterConfig(collective_timeout_s=120), 0),
    )
    group.call(PolicyWorker.init_model, model_path, timeout=300)
    return group


@pytest.fixture(scope="module", params=[0, 2], ids=["zero0-fp32", "zero2"])
def policy(request, ray_session, tiny_model_path):
    group = start_policy(request.param, tiny_model_path)
    yield group
    group.shutdown()


def _weights(worker) -> dict[str, torch.Tensor]:
    """This rank's full parameters (ZeRO-0/2 keep them whole on every rank); runs in the actor."""
    return {n: p.detach().clone() for n, p in worker.engine.module.named_parameters()}


def weights(group: WorkerGroup) -> dict[str, torch.Tensor]:
    rank0, rank1 = ray.get([a.__ray_call__.remote(_weights) for a in group.actors])
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # the ranks never diverge
    return rank0


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


def test_nonfinite_steps_are_skipped_on_every_rank_and_counted(policy, batch_factory):
    batch = batch_factory(rows=8, seed=1)
    old = policy.call(PolicyWorker.compute_logprobs, batch)
    sign = torch.tensor([1.0] * 4 + [-1.0] * 4).unsqueeze(1)
    good = batch.replace(old_logprobs=old, advantages=sign.expand_as(old).clone())
    poisoned_advantages = good.advantages.clone()
    poisoned_advantages[0, 0] = float("nan")  # row 0: rank 0's shard only
    poisoned = good.replace(advantages=poisoned_advantages)

    first = policy.call(PolicyWorker.update, good)
    assert first["policy/lr"] == pytest.approx(2 / 11 * LR)
    assert first["policy/nonfinite_skipped"] == 0 and first["policy/nonfinite_total"] == 0
    before = weights(policy)

    skipped = policy.call(PolicyWorker.update, poisoned)
    assert same(weights(policy), before)  # bit-exact: no AdamW update on either rank
    assert skipped["policy/nonfinite_skipped"] == 1
    assert skipped["policy/nonfinite_consecutive"] == 1
    assert skipped["policy/nonfinite_total"] == 1
    assert skipped["policy/nonfinite_loss"] == 1  # the loss went non-finite (not only the gradient norm)
    assert skipped["policy/lr"] == pytest.approx(2 / 11 * LR)  # the schedule did not advance

    resumed = policy.call(PolicyWorker.update, good)
    after = weights(policy)
    assert not same(after, before)  # a finite step updates again
    assert all(torch.isfinite(t).all() for t in after.values())
    assert resumed["policy/lr"] == pytest.approx(3 / 11 * LR)  # the second applied step
    assert resumed["policy/nonfinite_skipped"] == 0
    assert resumed["policy/nonfinite_consecutive"] == 0
    assert resumed["policy/nonfinite_total"] == 1
    assert torch.isfinite(torch.tensor(resumed["policy/grad_norm"]))

    for streak in (1, 2, 3):
        stats = policy.call(PolicyWorker.update, poisoned)
        assert stats["policy/nonfinite_consecutive"] == streak
    assert stats["policy/nonfinite_total"] == 4
    assert same(weights(policy), after)
