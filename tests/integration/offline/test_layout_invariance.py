"""One offline optimizer step does not depend on the data-parallel layout.

The same global minibatch (8 KTO examples = 16 interleaved rows, fixed reference logprobs) goes
through `train_step` on 2 ranks × micro 1 example and on 1 rank × micro 4 examples. The loss,
KTO's KL reference point z0 (all-reduced over the ranks' mismatched rows) and the pre-clipping
gradient norm of the first step must agree to float32 noise (1e-5 relative): a per-rank z0, a
local instead of global example count, or a missing dp factor would each show up as O(1) gaps.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.config import ClusterConfig, OfflineConfig, OptimConfig, RLHFConfig, TrainConfig
from rlhf.data.collate import collate_kto
from rlhf.data.examples import KTOExample
from rlhf.trainers.roles import start_policy_group
from rlhf.workers.offline_policy import OfflinePolicyWorker

pytestmark = pytest.mark.ray

VOCAB = 64


def kto_batch():
    gen = torch.Generator().manual_seed(0)
    examples = [
        KTOExample(
            torch.randint(1, VOCAB, (2 + i % 3,), generator=gen).tolist(),
            torch.randint(1, VOCAB, (2 + i % 4,), generator=gen).tolist(),
            desirable=i % 3 != 0,
        )
        for i in range(8)
    ]
    batch = collate_kto(examples, 0)
    # far below the policy (about -4 nats a token at vocab 64), so z0 > 0 and enters the loss
    return batch, -30.0 - torch.linspace(0, 4, len(batch))


def first_step(dp: int, micro: int, model_path: str) -> dict[str, float]:
    train_cfg = TrainConfig(
        num_workers=dp, zero_stage=2, micro_batch_size=micro, train_batch_size=8, optim=OptimConfig(lr=1e-3)
    )
    cfg = RLHFConfig(
        policy=train_cfg,
        offline=OfflineConfig(objective="kto", beta=0.5),
        cluster=ClusterConfig(collective_timeout_s=120),
    )
    group = start_policy_group(cfg, OfflinePolicyWorker, role=f"policy-dp{dp}", offline_cfg=cfg.offline)
    try:
        group.call(OfflinePolicyWorker.init_model, model_path, timeout=300)
        batch, aux = kto_batch()
        return group.call(OfflinePolicyWorker.train_step, batch, aux, timeout=300)
    finally:
        group.shutdown()


def test_kto_step_is_the_same_on_two_ranks_and_on_one(offline_ray, tiny_model_path):
    two = first_step(2, 1, tiny_model_path)
    one = first_step(1, 4, tiny_model_path)
    assert two["kto/kl"] > 0
    for key in ("kto/loss", "kto/kl", "kto/chosen_reward", "kto/rejected_reward", "train/grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
