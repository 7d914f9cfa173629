"""QLoRA on one CUDA device: a 4-bit (bitsandbytes nf4) frozen base, bf16 LoRA adapters, ZeRO-2.

Skipped without CUDA or bitsandbytes (elsewhere validation refuses qlora with a ConfigError, see
tests/unit/models/test_peft_methods.py). The export dequantises every 4-bit weight and merges the
adapters, so the saved plain bf16 model reproduces the trainer's logprobs up to bf16 rounding
(mean |difference| below 0.05 nats, as in tests/integration/workers/test_gpu_workers.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.config import (
    AlgorithmConfig,
    ClusterConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    ResourceConfig,
    RLHFConfig,
    TrainConfig,
)
from rlhf.engines.adapters import ADAPTER_DIR
from rlhf.models.logprobs import response_logprobs
from rlhf.trainers.roles import start_policy_group
from rlhf.workers.policy import PolicyWorker

pytestmark = [
    pytest.mark.ray,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_qlora_trains_adapters_on_a_4bit_base_and_exports_plain_weights(
    ray_cluster, tiny_model_path, batch_factory, tmp_path
):
    pytest.importorskip("bitsandbytes")
    model_cfg = ModelConfig(
        dtype="bfloat16",
        lora=LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        peft=PeftConfig(method="qlora"),
    )
    train_cfg = TrainConfig(
        num_workers=1, zero_stage=2, micro_batch_size=2, train_batch_size=8, optim=OptimConfig(lr=1e-2)
    )
    cfg = RLHFConfig(
        model=model_cfg,
        policy=train_cfg,
        algorithm=AlgorithmConfig(kl_coef=0.0),
        cluster=ClusterConfig(device="cuda", collective_timeout_s=120, policy=ResourceConfig(num_cpus=1, num_gpus=0.5)),
    )
    group = start_policy_group(cfg, PolicyWorker, role="policy-qlora", algo_cfg=cfg.algorithm)
    try:
        counts = group.call(PolicyWorker.init_model, tiny_model_path, timeout=300)
        # q: A 8×128 + B 128×8, v: A 8×128 + B 64×8, two layers
        assert counts["num_trainable_parameters"] == 2 * (2048 + 1536)
        batch = batch_factory(rows=8, seed=3)
        mask = batch.response_mask.bool()
        before = group.call(PolicyWorker.compute_logprobs, batch)
        for _ in range(3):
            old = group.call(PolicyWorker.compute_logprobs, batch)
            group.call(PolicyWorker.update, batch.replace(old_logprobs=old, advantages=batch.response_mask.float()))
        trained = group.call(PolicyWorker.compute_logprobs, batch)
        assert trained[mask].mean() > before[mask].mean() + 1e-3
        group.call(PolicyWorker.save_hf, str(tmp_path / "final"))
    finally:
        group.shutdown()
    assert (tmp_path / "final" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        exported, _ = response_logprobs(plain, batch.to(torch.device("cuda")))
    assert (exported.float().cpu()[mask] - trained[mask]).abs().mean() < 0.05
