"""The GPU path of the workers on one CUDA device: NCCL, bf16 ZeRO-3, roles sharing the GPU.

Skipped without CUDA. One GPU allows one rank per NCCL group (two ranks of one group on the same
device are refused by NCCL), so the policy and the critic each run one rank, with fractional
num_gpus so that they, the reference and the driver share the card. Tolerance against the float32
CPU forward: bf16 weights and activations, so mean |difference| below 0.05 nats (bf16 keeps about
3 significant digits; the float32 paths are checked at 1e-5 by the CPU tests).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf.config import (
    AlgorithmConfig,
    ClusterConfig,
    ModelConfig,
    OptimConfig,
    ResourceConfig,
    RLHFConfig,
    TrainConfig,
)
from rlhf.engines.weight_sync import WeightSyncGroup
from rlhf.models.logprobs import response_logprobs
from rlhf.trainers.roles import start_trained_group
from rlhf.workers.critic import CriticWorker
from rlhf.workers.group import Worker, WorkerGroup
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.reference import ReferenceWorker

pytestmark = [
    pytest.mark.ray,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CLUSTER = ClusterConfig(device="cuda", collective_timeout_s=120)
BF16 = ModelConfig(dtype="bfloat16")


def _train_cfg(stage: int) -> TrainConfig:
    return TrainConfig(
        num_workers=1,
        zero_stage=stage,
        zero3_param_persistence_threshold=0,
        micro_batch_size=2,
        train_batch_size=4,
        optim=OptimConfig(lr=1e-3),
    )


@pytest.fixture(scope="module")
def gpu_roles(ray_session, tiny_model_path):
    groups = {}
    try:
        cfg = RLHFConfig(model=BF16, cluster=CLUSTER)
        groups["policy"] = start_trained_group(
            cfg,
            PolicyWorker,
            "policy-gpu",
            _train_cfg(3),
            ResourceConfig(num_cpus=1, num_gpus=0.4),
            algo_cfg=AlgorithmConfig(kl_coef=0.0),
        )
        groups["critic"] = start_trained_group(
            cfg,
            CriticWorker,
            "critic-gpu",
            _train_cfg(2),
            ResourceConfig(num_cpus=1, num_gpus=0.3),
            algo_cfg=cfg.algorithm,
        )
        groups["reference"] = WorkerGroup(
            ReferenceWorker,
            role="reference-gpu",
            num_workers=1,
            resources=ResourceConfig(num_cpus=1, num_gpus=0.2),
            init_args=(BF16, CLUSTER),
            device="cuda",
        )
        pending = [
            groups["policy"].run(PolicyWorker.init_model, tiny_model_path),
            groups["critic"].run(CriticWorker.init_model, tiny_model_path),
            groups["reference"].run(ReferenceWorker.init_model, tiny_model_path),
        ]
        for group, p in zip(groups.values(), pending):
            group.wait(p, timeout=300)
        yield groups
    finally:
        for group in groups.values():
            group.shutdown()


def test_bf16_zero3_policy_on_gpu(gpu_roles, tiny_model_path, tmp_path, batch_factory):
    policy, reference = gpu_roles["policy"], gpu_roles["reference"]
    batch = batch_factory(rows=4, seed=0)
    mask = batch.response_mask.bool()
    logprobs = policy.call(PolicyWorker.compute_logprobs, batch)
    ref_logprobs = reference.call(ReferenceWorker.compute_logprobs, batch)
    expected, _ = response_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), batch)
    assert (logprobs[mask] - expected[mask]).abs().mean() < 0.05
    assert (ref_logprobs[mask] - expected[mask]).abs().mean() < 0.05

    sign = torch.tensor([1.0, 1.0, -1.0, -1.0]).unsqueeze(1)
    batch = batch.replace(old_logprobs=logprobs, advantages=sign.expand_as(logprobs).clone())
    policy.call(PolicyWorker.save_checkpoint, str(tmp_path / "ckpt"))
    first = policy.call(PolicyWorker.update, batch)
    assert 0 < first["policy/grad_norm"] < float("inf")  # later steps may clip every token (zero gradient)
    for _ in range(2):
        policy.call(PolicyWorker.update, batch)
    new = policy.call(PolicyWorker.compute_logprobs, batch)
    change = torch.where(mask, new - logprobs, torch.zeros_like(new)).sum(1) / mask.sum(1)
    assert (change[:2] > 0).all() and (change[2:] < 0).all(), change

    # weight sync over gloo to the driver (NCCL refuses two ranks on one device) equals save_hf
    out = tmp_path / "hf"
    policy.call(PolicyWorker.save_hf, str(out))
    host, port = policy.call(Worker.free_address)
    joining = policy.run(PolicyWorker.init_weight_sync, host, port, 2, "gloo")
    receiver = WeightSyncGroup.create(host, port, rank=1, world_size=2, backend="gloo", timeout_s=60)
    try:
        policy.wait(joining, timeout=60)
        sending = policy.run(PolicyWorker.sync_weights, 1)
        received = {name: tensor.clone() for name, tensor in receiver.receive()}
        policy.wait(sending, timeout=60)
    finally:
        receiver.close()
        policy.call(PolicyWorker.close_weight_sync)
    saved = load_file(out / "model.safetensors")
    assert set(received) == set(saved) and all(torch.equal(received[n], t) for n, t in saved.items())
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}

    policy.call(PolicyWorker.load_checkpoint, str(tmp_path / "ckpt"))
    torch.testing.assert_close(policy.call(PolicyWorker.compute_logprobs, batch), logprobs, rtol=0, atol=1e-5)


def test_critic_on_gpu_reduces_value_loss(gpu_roles, batch_factory):
    critic = gpu_roles["critic"]
    batch = batch_factory(rows=4, seed=1)
    values = critic.call(CriticWorker.compute_values, batch)
    batch = batch.replace(values=values, returns=torch.linspace(-1, 1, 4).unsqueeze(1).expand_as(values).clone())
    losses = [critic.call(CriticWorker.update, batch)["critic/loss"] for _ in range(5)]
    assert losses[-1] < losses[0], losses
