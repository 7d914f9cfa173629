"""Every weight sync compares per-tensor checksums of what the policy sent with what each engine loaded
(rlhf.trainers.roles.check_loaded_weights): an engine left on other weights stops the run naming the tensor.

The hf engine reads its parameters back after loading, so the check covers the transfer and the load. The
corruption is made on the engine's side, after it loaded: one weight nudged by 1e-3, as a loader that skipped or
mangled a tensor would leave it."""

from __future__ import annotations

import pytest
import ray

from rlhf.config import RLHFConfig
from rlhf.errors import WeightSyncError
from rlhf.models.loading import resolve_model_path
from rlhf.trainers.roles import connect_weight_sync, start_policy_group, sync_weights
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.rollout import RolloutGroup

pytestmark = [pytest.mark.ray]

CORRUPTED = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("transport", ["shm", "collective"])
def test_an_engine_that_loaded_other_bytes_stops_the_sync_naming_the_tensor(ray_cluster, transport):
    cfg = RLHFConfig()
    cfg.policy.num_workers = 1
    cfg.rollout.backend = "hf"
    cfg.cluster.weight_sync_transport = transport
    path = resolve_model_path("tiny")
    policy = start_policy_group(cfg, PolicyWorker, algo_cfg=cfg.algorithm)
    rollout = RolloutGroup(path, cfg.model, cfg.rollout, cfg.cluster, seed=0)
    try:
        policy.call(PolicyWorker.init_model, path)
        assert connect_weight_sync(policy, rollout, cfg.cluster)["transport"] == transport
        stats = sync_weights(policy, rollout, bucket_mb=1)  # every tensor read back equal: no error
        assert "checksums" not in stats and stats["timing/sync_check"] >= 0

        def corrupt_after_loading(host) -> None:  # local, so Ray ships it by value to the engine's process
            """On the engine: its backend's load_weights nudges one weight after loading the stream."""
            backend = host.backend
            load = backend.load_weights

            def load_then_corrupt(named_tensors, share=False):
                load(named_tensors, share=share)
                dict(backend.model.named_parameters())[CORRUPTED].data.add_(1e-3)

            backend.load_weights = load_then_corrupt

        ray.get([actor.__ray_call__.remote(corrupt_after_loading) for actor in rollout.group.actors])
        with pytest.raises(WeightSyncError, match=rf"rollout engine 0 holds other weights than the policy sent \(1 "
                           rf"tensor\(s\) loaded with other bytes than sent: {CORRUPTED}\)"):  # fmt: skip
            sync_weights(policy, rollout, bucket_mb=1)
    finally:
        rollout.shutdown()
        policy.shutdown()
