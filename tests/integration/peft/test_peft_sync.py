"""An IA3 policy (2 ranks, ZeRO-3) streams merged weights into the real vLLM engine.

IA3 merges multiplicatively (W ⊙ l, b ⊙ l; rlhf.models.peft_utils), unlike LoRA's W + ΔW. After one
update and one bucketed sync the engine's sampled-token logprobs match the trainer's float32
logprobs of the adapter model, and no longer match the base weights'. Tolerance 1e-4 as in
tests/integration/sync/test_policy_to_rollout.py (summation order of vLLM's CPU kernels vs torch).
"""

from __future__ import annotations

import pytest
import torch

from rlhf.config import RLHFConfig, SamplingConfig
from rlhf.data.stream import PromptBatch
from rlhf.data.tokenizer import encode_chat_prompt
from rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.models.logprobs import response_logprobs
from rlhf.trainers.rl import build_rollout_batch
from rlhf.trainers.roles import check_loaded_weights, start_policy_group
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.rollout import RolloutGroup

pytestmark = [
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.slow,
]  # ~100 s; LoRA sync parity stays in the default suite

PARITY = 1e-4


def ia3_config() -> RLHFConfig:
    cfg = RLHFConfig()
    cfg.model.peft.method = "ia3"
    cfg.policy.num_workers = 2
    cfg.policy.zero_stage = 3
    cfg.policy.zero3_param_persistence_threshold = 0
    cfg.policy.micro_batch_size = 4
    cfg.policy.train_batch_size = 8
    cfg.policy.optim.lr = 5e-2
    cfg.rollout.backend = "vllm"
    return cfg


def test_ia3_policy_syncs_merged_weights_into_vllm(ray_cluster):
    cfg = ia3_config()
    path = resolve_model_path("tiny")
    tokenizer = load_tokenizer(path)
    texts = ["copy abc=", "reverse abd=", "3+4=", "9-5="]
    prompts = PromptBatch([encode_chat_prompt(tokenizer, t) for t in texts], texts, [{} for _ in texts])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    policy = start_policy_group(cfg, PolicyWorker, role="policy-ia3", algo_cfg=cfg.algorithm)
    rollout = RolloutGroup(path, cfg.model, cfg.rollout, cfg.cluster, seed=0)
    try:
        counts = policy.call(PolicyWorker.init_model, path)
        assert counts["num_trainable_parameters"] == 2 * (128 + 64 + 384)  # l of q_proj, v_proj, down_proj's input
        host, port = policy.call(PolicyWorker.free_address)
        joining = policy.run(PolicyWorker.init_weight_sync, host, port, 1 + rollout.num_ranks, "gloo")
        rollout.init_weight_sync(host, port, "gloo", 120)
        policy.wait(joining)

        batch = build_rollout_batch(prompts, rollout.generate(prompts.token_ids, sampling, n=2, seed=1), pad_id=0)
        old = policy.call(PolicyWorker.compute_logprobs, batch)
        assert_close(batch.rollout_logprobs, old, batch.response_mask)  # l starts at 1: the base model
        advantages = torch.tensor([1.0, -1.0] * len(texts)).unsqueeze(1) * batch.response_mask
        policy.call(PolicyWorker.update, batch.replace(old_logprobs=old, advantages=advantages))

        sending = policy.run(PolicyWorker.sync_weights, 1)
        receiving = rollout.receive_weights_async()
        sent = policy.wait(sending)["checksums"]
        check_loaded_weights(sent, rollout.wait(receiving))  # the merged weights under their base names, loaded
        assert not any("lora" in name for name, _ in sent)

        fresh = build_rollout_batch(prompts, rollout.generate(prompts.token_ids, sampling, n=2, seed=2), pad_id=0)
        assert_close(fresh.rollout_logprobs, policy.call(PolicyWorker.compute_logprobs, fresh), fresh.response_mask)
        with torch.no_grad():
            before, _ = response_logprobs(load_causal_lm(path, dtype="float32"), fresh)
        moved = ((fresh.rollout_logprobs - before).abs() * fresh.response_mask).max()
        assert moved > 1e-2, f"engine logprobs still match the base weights (max diff {moved:.2e})"
    finally:
        rollout.shutdown()
        policy.shutdown()


def assert_close(engine: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> None:
    error = ((engine - trainer).abs() * mask).max().item()
    assert error < PARITY, f"engine vs trainer logprobs differ by {error:.2e} (tolerance {PARITY})"
