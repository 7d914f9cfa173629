"""CriticWorker on 2 ranks (ZeRO-3, every parameter partitioned, the backbone built inside zero.Init):
value alignment, clipped value-loss updates, HF export.

Values are compared with a single-process ValueModel (same checkpoint, same head seed) at 1e-5 in
float32, on a batch with left-padded prompts and right-padded responses.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.config import AlgorithmConfig, ClusterConfig, OptimConfig, RLHFConfig, RunConfig, TrainConfig
from rlhf.models.value_model import ValueModel, response_values
from rlhf.trainers.roles import start_trained_group
from rlhf.workers.critic import CriticWorker

pytestmark = pytest.mark.ray

SEED = 7


@pytest.fixture(scope="module")
def critic(ray_session, tiny_model_path):
    train_cfg = TrainConfig(
        num_workers=2,
        zero_stage=3,
        zero3_param_persistence_threshold=0,
        micro_batch_size=2,
        train_batch_size=8,
        optim=OptimConfig(lr=1e-3),
    )
    cfg = RLHFConfig(
        critic=train_cfg,
        algorithm=AlgorithmConfig(value_clip=0.5),
        cluster=ClusterConfig(collective_timeout_s=120),
        run=RunConfig(seed=SEED),
    )
    group = start_trained_group(cfg, CriticWorker, "critic", cfg.critic, cfg.cluster.critic, algo_cfg=cfg.algorithm)
    group.call(CriticWorker.init_model, tiny_model_path, timeout=300)
    yield group
    group.shutdown()


def test_values_align_with_the_state_before_each_response_token(critic, tiny_model_path, batch_factory):
    batch = batch_factory(rows=8, seed=4)
    values = critic.call(CriticWorker.compute_values, batch)
    model = ValueModel.from_pretrained(tiny_model_path, head_seed=SEED).eval()
    with torch.no_grad():
        expected = response_values(model, batch)
        # by hand for row 0 (no padding): the value of response token j is read at position P + j - 1
        full = model(batch.input_ids[:1], batch.attention_mask[:1], batch.position_ids[:1])
    mask = batch.response_mask.bool()
    assert values.shape == (8, 6)
    torch.testing.assert_close(values[mask], expected[mask], rtol=0, atol=1e-5)
    p = batch.prompt_length
    torch.testing.assert_close(values[0, :3], full[0, p - 1 : p + 2], rtol=0, atol=1e-5)


def test_update_reduces_value_loss_and_exports(critic, tmp_path, batch_factory):
    batch = batch_factory(rows=8, seed=5)
    old_values = critic.call(CriticWorker.compute_values, batch)
    returns = torch.linspace(-1.0, 1.0, 8).unsqueeze(1).expand_as(old_values).clone()
    batch = batch.replace(values=old_values, returns=returns)
    losses = [critic.call(CriticWorker.update, batch)["critic/loss"] for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0], losses

    out = tmp_path / "critic"
    critic.call(CriticWorker.save_hf, str(out))
    reloaded = ValueModel.from_pretrained(out, head_seed=SEED + 1).eval()  # head comes from the checkpoint
    with torch.no_grad():
        exported = response_values(reloaded, batch)
    values = critic.call(CriticWorker.compute_values, batch)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(exported[mask], values[mask], rtol=0, atol=1e-5)
