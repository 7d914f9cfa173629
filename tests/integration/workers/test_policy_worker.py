"""PolicyWorker on 2 ranks under ZeRO-2 and ZeRO-3 (persistence threshold 0: every parameter is partitioned).

Tolerances: logprobs are compared with a single-process HF float32 forward of the same padded batch
at 1e-5 (both float32; the ranks' forwards run the same kernels, ZeRO-3 only reassembles the
weights). The first update's gradient norm is compared with the single-process full-batch loss's
at 1e-4 relative: that checks the global-count aggregation and DeepSpeed's gradient-accumulation
and data-parallel scaling together (a wrong factor of 2 shows up here, while Adam's first step
would hide it). Weight sync and checkpoint round trips are exact or 1e-6.
"""

from __future__ import annotations

import sys

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf.algorithms import POLICY_LOSSES, aggregate, entropy_from_logits, kl_loss, logprobs_from_logits
from rlhf.config import AlgorithmConfig, ClusterConfig, OptimConfig, RLHFConfig, TrainConfig
from rlhf.engines.weight_sync import WeightSyncGroup
from rlhf.models.logprobs import response_logits, response_logprobs
from rlhf.models.peft_utils import load_base_model
from rlhf.trainers.roles import start_policy_group
from rlhf.workers.group import Worker, WorkerGroup
from rlhf.workers.policy import PolicyWorker

pytestmark = pytest.mark.ray
# Ray workers cannot import test modules: ship the introspection helper by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOGPROB_TOL = 1e-5
CLUSTER = ClusterConfig(collective_timeout_s=120)
SETUPS = {
    # ZeRO-2: sequence-level aggregation with an entropy bonus
    "zero2": (
        TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=2, train_batch_size=8, optim=OptimConfig(lr=1e-3)),
        AlgorithmConfig(loss_agg="seq_mean_token_mean", entropy_coef=0.01, kl_coef=0.0),
    ),
    # ZeRO-3 with every parameter partitioned: token-level aggregation with the GRPO KL loss
    "zero3": (
        TrainConfig(
            num_workers=2,
            zero_stage=3,
            zero3_param_persistence_threshold=0,
            micro_batch_size=2,
            train_batch_size=8,
            optim=OptimConfig(lr=1e-3),
        ),
        AlgorithmConfig(loss_agg="token_mean", kl_coef=0.1, use_kl_loss=True),
    ),
}


def start_policy(name: str, model_path: str) -> WorkerGroup:
    train_cfg, algo_cfg = SETUPS[name]
    cfg = RLHFConfig(policy=train_cfg, algorithm=algo_cfg, cluster=CLUSTER)
    group = start_policy_group(cfg, PolicyWorker, role=f"policy-{name}", algo_cfg=algo_cfg)
    group.call(PolicyWorker.init_model, model_path, timeout=300)
    return group


@pytest.fixture(scope="module", params=sorted(SETUPS))
def policy(request, ray_session, tiny_model_path):
    group = start_policy(request.param, tiny_model_path)
    yield request.param, group
    group.shutdown()


def hf_model(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def rl_batch(make_batch, group):
    """Batch with old/ref logprobs from the group and advantages +1 (rows 0-3) / -1 (rows 4-7)."""
    batch = make_batch(rows=8, seed=1)
    old = group.call(PolicyWorker.compute_logprobs, batch)
    sign = torch.tensor([1.0] * 4 + [-1.0] * 4).unsqueeze(1)
    return batch.replace(old_logprobs=old, ref_logprobs=old.clone(), advantages=sign.expand_as(old).clone())


def single_process_grad_norm(model_path, batch, algo: AlgorithmConfig) -> float:
    """Gradient norm of the full minibatch's loss in one process: what 2 ranks × 2 micro-batches must reproduce."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    mask = batch.response_mask
    logits = response_logits(model, batch)
    logprobs = logprobs_from_logits(logits, batch.response_ids)
    loss, _ = POLICY_LOSSES.get(algo.policy_loss)(
        logprobs,
        batch.old_logprobs,
        batch.advantages,
        mask,
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        agg=algo.loss_agg,
    )
    if algo.use_kl_loss and algo.kl_coef > 0:
        loss = (
            loss
            + algo.kl_coef * kl_loss(logprobs, batch.ref_logprobs, mask, kind=algo.kl_estimator, agg=algo.loss_agg)[0]
        )
    loss = loss - algo.entropy_coef * aggregate(entropy_from_logits(logits), mask, algo.loss_agg)
    loss.backward()
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item()


def _resident_and_full_numel(worker) -> tuple[int, int]:
    """(elements held in the module's parameters, full elements) on one rank (runs in the actor)."""
    params = list(worker.engine.module.parameters())
    return sum(p.numel() for p in params), sum(getattr(p, "ds_numel", p.numel()) for p in params)


def _loaded_numel(worker, path: str) -> tuple[int, int]:
    """(elements held in the parameters, full elements) of `path` loaded as init_model loads it, before
    any engine: under ZeRO-3 built inside deepspeed.zero.Init (runs in the actor, collective)."""
    model = load_base_model(path, worker.model_cfg, dtype=worker.dtype, zero3_config=worker._zero3_config())
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(getattr(p, "ds_numel", p.numel()) for p in params)


def test_zero3_really_partitions(policy, tiny_model_path):
    name, group = policy
    for resident, full in ray.get([a.__ray_call__.remote(_resident_and_full_numel) for a in group.actors]):
        assert full > 400_000
        assert resident == (0 if name == "zero3" else full)  # ZeRO-3 keeps only ds_tensor shards
    # and no rank held the whole model before DeepSpeed started either
    loads = ray.get([a.__ray_call__.remote(_loaded_numel, tiny_model_path) for a in group.actors])
    for resident, full in loads:
        assert resident == (0 if name == "zero3" else full)


def test_compute_logprobs_matches_single_process_forward(policy, tiny_model_path, batch_factory):
    _, group = policy
    batch = batch_factory(rows=8, seed=0)
    logprobs = group.call(PolicyWorker.compute_logprobs, batch)
    expected, _ = response_logprobs(hf_model(tiny_model_path), batch)
    assert logprobs.shape == (8, 6) and logprobs.dtype == torch.float32
    torch.testing.assert_close(
        masked(logprobs, batch.response_mask), masked(expected, batch.response_mask), rtol=0, atol=LOGPROB_TOL
    )


def test_update_is_dp_invariant_and_follows_the_advantages(policy, tiny_model_path, batch_factory):
    name, group = policy
    algo = SETUPS[name][1]
    batch = rl_batch(batch_factory, group)
    first = group.call(PolicyWorker.update, batch)
    expected_norm = single_process_grad_norm(tiny_model_path, batch, algo)
    assert first["policy/grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
    assert {"policy/loss", "policy/clip_frac", "policy/approx_kl", "policy/entropy", "policy/lr"} <= set(first)
    assert ("policy/kl" in first) == (algo.kl_coef > 0)
    for _ in range(3):
        last = group.call(PolicyWorker.update, batch)
    assert last["policy/loss"] < first["policy/loss"]
    new = group.call(PolicyWorker.compute_logprobs, batch)
    change = masked(new - batch.old_logprobs, batch.response_mask).sum(dim=1) / batch.response_mask.sum(dim=1)
    assert (change[:4] > 0).all() and (change[4:] < 0).all(), change


def test_save_hf_and_weight_sync_carry_the_gathered_weights(policy, tmp_path, batch_factory):
    _, group = policy
    out = tmp_path / "hf"
    assert group.call(PolicyWorker.save_hf, str(out)) == str(out)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = batch_factory(rows=8, seed=2)
    expected, _ = response_logprobs(reloaded.eval(), batch)
    logprobs = group.call(PolicyWorker.compute_logprobs, batch)  # what the (partitioned) ranks compute with
    torch.testing.assert_close(
        masked(logprobs, batch.response_mask), masked(expected, batch.response_mask), rtol=0, atol=LOGPROB_TOL
    )

    # the driver plays a rollout engine: rank 1 of the weight-sync group
    host, port = group.call(Worker.free_address)
    joining = group.run(PolicyWorker.init_weight_sync, host, port, 2, "gloo")
    receiver = WeightSyncGroup.create(host, port, rank=1, world_size=2, backend="gloo", timeout_s=60)
    try:
        group.wait(joining, timeout=60)
        sending = group.run(PolicyWorker.sync_weights, 1)  # 1 MiB buckets: several per sync
        received = {name: tensor.clone() for name, tensor in receiver.receive()}
        stats = group.wait(sending, timeout=60)
    finally:
        receiver.close()
        group.call(PolicyWorker.close_weight_sync)
    saved = load_file(out / "model.safetensors")
    assert set(received) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(received[name], tensor), name
    assert stats["weight_sync/buckets"] > 1 and stats["weight_sync/tensors"] == len(saved)


def _exported_copies(worker) -> list[str]:
    """Names that iter_full_parameters yields as a copy instead of a view of the (gathered) parameter,
    plus any parameter left gathered afterwards; runs in the actor (every rank takes part)."""
    params = dict(worker.engine.module.named_parameters())
    copies = []
    for name, tensor in worker.engine.iter_full_parameters(bucket_bytes=1 << 16):
        param = params[name]
        if tensor.data_ptr() != param.data_ptr() or tensor.shape != getattr(param, "ds_shape", param.shape):
            copies.append(name)
    if any(getattr(p, "ds_numel", 0) and p.data.numel() for p in params.values()):
        copies.append("<a parameter stayed gathered>")
    return copies


def test_export_yields_the_gathered_parameters_without_a_copy(policy):
    # ZeRO-3 yields inside the gather: the consumer (shm segment, broadcast buffer, safetensors file)
    # reads the gathered buffer itself, so the transfer makes one copy and not two
    _, group = policy
    rank0, rank1 = ray.get([a.__ray_call__.remote(_exported_copies) for a in group.actors])
    assert rank0 == [] and rank1 == []


def _master_copies(worker) -> tuple[int, int]:
    """(sub-groups, those whose fp32 master weights are a second copy of the weight partition) of a ZeRO-3
    rank's optimizer; runs in the actor."""
    optimizer = worker.engine.engine.optimizer
    pairs = list(zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat))
    return len(pairs), sum(m.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for m, p in pairs)


def test_zero3_float32_master_weights_are_the_partition_itself(policy):
    """rlhf.engines.zero3.share_fp32_master_weights: no second float32 copy of a rank's partition (and the
    update and checkpoint tests of this file run on it)."""
    name, group = policy
    if name != "zero3":
        pytest.skip("ZeRO-2 keeps its fp32 partition by design")
    for sub_groups, copies in ray.get([a.__ray_call__.remote(_master_copies) for a in group.actors]):
        assert sub_groups >= 1 and copies == 0


def test_checkpoint_restores_weights_and_optimizer(policy, tiny_model_path, tmp_path, batch_factory):
    # ZeRO-3 restores into a fresh group (a resumed run); ZeRO-2 into the same group after a further
    # step, which exercises the same load path at a fraction of the test time
    name, group = policy
    batch = rl_batch(batch_factory, group)
    group.call(PolicyWorker.save_checkpoint, str(tmp_path / "ckpt"))
    saved_logprobs = batch.old_logprobs
    stats = group.call(PolicyWorker.update, batch)
    updated_logprobs = group.call(PolicyWorker.compute_logprobs, batch)

    restored_group = start_policy(name, tiny_model_path) if name == "zero3" else group
    try:
        restored_group.call(PolicyWorker.load_checkpoint, str(tmp_path / "ckpt"))
        restored = restored_group.call(PolicyWorker.compute_logprobs, batch)
        torch.testing.assert_close(restored, saved_logprobs, rtol=0, atol=1e-6)
        # the same step from the restored state lands on the same weights only if Adam's moments,
        # the step count and the scheduler came back too
        restored_stats = restored_group.call(PolicyWorker.update, batch)
        after = restored_group.call(PolicyWorker.compute_logprobs, batch)
        torch.testing.assert_close(after, updated_logprobs, rtol=0, atol=1e-5)
        assert restored_stats["policy/grad_norm"] == pytest.approx(stats["policy/grad_norm"], rel=1e-5)
    finally:
        if restored_group is not group:
            restored_group.shutdown()
