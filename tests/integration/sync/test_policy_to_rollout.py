"""A trained 2-rank ZeRO-3 policy (full and LoRA) streams its weights into the real vLLM engine.

After the update and one bucketed sync, the engine's sampled-token logprobs match the trainer's
float32 logprobs of the new weights, and differ from the original weights' logprobs. The full case
syncs over shared memory (vLLM's layer-wise reload keeps the zero-copy views until a layer is
complete), the LoRA case over the gloo broadcast; test_shm_transport compares the two bit for bit.
Tolerance 1e-4: both sides are float32 forwards of the same weights; STACK notes ~1e-5 for
summation-order differences between vLLM's CPU kernels and torch, while one update here moves
logprobs by more than 1e-2.
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

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PARITY = 1e-4


def make_config(lora_rank: int) -> RLHFConfig:
    cfg = RLHFConfig()
    cfg.policy.num_workers = 2
    cfg.policy.zero_stage = 3
    cfg.policy.zero3_param_persistence_threshold = 0
    cfg.policy.micro_batch_size = 4
    cfg.policy.train_batch_size = 8
    cfg.policy.optim.lr = 1e-2 if lora_rank else 2e-3
    cfg.model.lora.rank = lora_rank
    cfg.rollout.backend = "vllm"
    return cfg


@pytest.mark.parametrize(("lora_rank", "transport"), [(0, "shm"), (8, "collective")], ids=["full-shm", "lora"])
def test_trained_zero3_policy_syncs_into_vllm(ray_cluster, lora_rank, transport):
    cfg = make_config(lora_rank)
    path = resolve_model_path("tiny")
    tokenizer = load_tokenizer(path)
    prompt_texts = ["copy abc=", "reverse abd=", "3+4=", "9-5="]
    prompts = PromptBatch(
        token_ids=[encode_chat_prompt(tokenizer, t) for t in prompt_texts],
        texts=prompt_texts,
        metadata=[{} for _ in prompt_texts],
    )
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    policy = start_policy_group(cfg, PolicyWorker, algo_cfg=cfg.algorithm)
    rollout = RolloutGroup(path, cfg.model, cfg.rollout, cfg.cluster, seed=0)
    try:
        policy.call(PolicyWorker.init_model, path)
        host, port = policy.call(PolicyWorker.free_address)
        joining = policy.run(PolicyWorker.init_weight_sync, host, port, 1 + rollout.num_ranks, "gloo", transport)
        rollout.init_weight_sync(host, port, "gloo", 120)
        assert policy.wait(joining) == transport

        batch = build_rollout_batch(prompts, rollout.generate(prompts.token_ids, sampling, n=2, seed=1), pad_id=0)
        old = policy.call(PolicyWorker.compute_logprobs, batch)
        assert_close(batch.rollout_logprobs, old, batch.response_mask)
        # push sample 0 of each prompt up and sample 1 down
        advantages = torch.tensor([1.0, -1.0] * len(prompt_texts)).unsqueeze(1) * batch.response_mask
        policy.call(PolicyWorker.update, batch.replace(old_logprobs=old, advantages=advantages))

        sending = policy.run(PolicyWorker.sync_weights, 1)  # 1 MiB buckets: several buckets for 1.8 MiB
        receiving = rollout.receive_weights_async()
        stats = policy.wait(sending)
        received = rollout.wait(receiving)
        # every tensor vLLM was handed has the bytes rank 0 sent (LoRA merged under the base names, or full)
        check_loaded_weights(stats.pop("checksums"), received)
        assert [r["read_back"] for r in received] == [False]  # vLLM repacks: the received bytes are compared
        assert stats["weight_sync/buckets"] >= 2
        assert stats["weight_sync/shm"] == float(transport == "shm")

        fresh = build_rollout_batch(prompts, rollout.generate(prompts.token_ids, sampling, n=2, seed=2), pad_id=0)
        trained = policy.call(PolicyWorker.compute_logprobs, fresh)
        assert_close(fresh.rollout_logprobs, trained, fresh.response_mask)

        original = load_causal_lm(path, dtype="float32")
        with torch.no_grad():
            before, _ = response_logprobs(original, fresh)
        moved = ((fresh.rollout_logprobs - before).abs() * fresh.response_mask).max()
        assert moved > 1e-2, f"engine logprobs still match the original weights (max diff {moved:.2e})"
    finally:
        rollout.shutdown()
        policy.shutdown()


def assert_close(engine: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> None:
    error = ((engine - trainer).abs() * mask).max().item()
    assert error < PARITY, f"engine vs trainer logprobs differ by {error:.2e} (tolerance {PARITY})"
