"""The shared-memory transport leaves the engines bit-identical to the collective one (ZeRO-2 and ZeRO-3).

Two hf engines start from the SFT-warmed tiny policy; engine A is synced over shared memory,
engine B over the gloo broadcast, through the controller's own `connect_weight_sync`/`sync_weights`.
After each policy's sync both engines' weight digests equal the digest of the checkpoint the policy
loaded (computed here in the driver), so neither transport changes a bit. ZeRO-2 loads the random-
init checkpoint and ZeRO-3 the SFT one again, so each sync must move the engines (a no-op transport
would leave the previous digest). The hf engine adopts the shared-memory views as its weights, so
the last check runs after every sender has exited.
"""

from __future__ import annotations

import pytest

from rlhf.config import RLHFConfig, SamplingConfig
from rlhf.models.loading import load_causal_lm, resolve_model_path
from rlhf.trainers.roles import connect_weight_sync, start_policy_group, sync_weights
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.rollout import RolloutGroup, RolloutWorker, weights_digest

pytestmark = [pytest.mark.ray]


def test_shm_and_collective_transports_give_bit_identical_engines(ray_cluster):
    cfg = RLHFConfig()
    cfg.rollout.backend = "hf"
    cfg.policy.num_workers = 1
    engine_path = resolve_model_path("tiny")
    engines = {
        transport: RolloutGroup(engine_path, cfg.model, cfg.rollout, cfg.cluster) for transport in ("shm", "collective")
    }
    try:
        before = engines["shm"].group.call(RolloutWorker.weights_digest)[0]
        assert before == weights_digest(load_causal_lm(engine_path, dtype="float32"))
        previous = before
        for zero_stage, policy_model in ((2, "tiny-init"), (3, "tiny")):
            cfg.policy.zero_stage = zero_stage
            path = resolve_model_path(policy_model)
            expected = weights_digest(load_causal_lm(path, dtype="float32"))
            assert expected != previous  # the sync has to change every engine
            policy = start_policy_group(cfg, PolicyWorker, algo_cfg=cfg.algorithm)
            try:
                policy.call(PolicyWorker.init_model, path, 1)
                for transport, rollout in engines.items():
                    cfg.cluster.weight_sync_transport = transport
                    connect_weight_sync(policy, rollout, cfg.cluster)
                    stats = sync_weights(policy, rollout, bucket_mb=1)  # 1 MiB buckets: several per sync
                    assert stats["weight_sync/shm"] == float(transport == "shm")
                    assert stats["weight_sync/buckets"] >= 2
                    rollout.close_weight_sync()
                    digest = rollout.group.call(RolloutWorker.weights_digest)[0]
                    assert digest == expected, f"ZeRO-{zero_stage} over {transport}: engine differs from the policy"
            finally:
                policy.shutdown()
            previous = expected
        # the hf engine adopted the segment's views as its weights: they outlive the sender's process
        assert engines["shm"].group.call(RolloutWorker.weights_digest)[0] == previous
        outputs = engines["shm"].generate([[1, 2, 3]], SamplingConfig(max_new_tokens=4), n=1, seed=0)
        assert len(outputs) == 1 and len(outputs[0][0].token_ids) >= 1
    finally:
        for rollout in engines.values():
            rollout.shutdown()
