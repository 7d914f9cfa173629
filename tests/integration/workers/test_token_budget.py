"""Token-budget micro-batches on 2 ranks (gloo) give the padded computation's results.

Each trained role runs packed (max_tokens_per_micro_batch, token-balanced split_dp, as
rlhf.trainers.rl starts it) and is compared with the padded computation in one process: the same
checkpoint, each minibatch's full padded loss, its gradient and the same AdamW step. Logprobs,
values and scores agree at 1e-5 (float32; only the summation order differs), one update's loss
and gradient norm (two optimizer steps) at 1e-5 relative, and the weights after it at 1e-6
(they moved by more than 1e-3). Adam's first step is lr · g / (|g| + eps): with the usual eps it
is lr · sign(g), which turns float noise in a gradient that is zero in exact arithmetic (a key
bias: softmax ignores it) into a full step of either sign; eps = 1 makes the step
lr · g / (|g| + 1), linear in the gradient, so equal weights mean equal gradients.

The packed policy runs ZeRO-3 with every parameter partitioned, where a rank that ran fewer
forwards than its peer would hang a parameter gather: the batch is built so the ranks' first-fit
bins differ in number (checked on the driver), which makes the ranks with fewer bins split
theirs. The split deals rows out of order, so compute_logprobs / compute_values also check that
`concat` puts them back. The frozen roles (reference, reward) run packed in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.algorithms import POLICY_LOSSES, aggregate, entropy_from_logits, kl_loss, logprobs_from_logits, value_loss
from rlhf.config import AlgorithmConfig, ClusterConfig, ModelConfig, OptimConfig, RLHFConfig, RunConfig, TrainConfig
from rlhf.data.batch import RolloutBatch, pad_sequences
from rlhf.data.token_budget import dp_shard_order, sequence_lengths, token_budget_bins
from rlhf.models.logprobs import last_token_scores, response_logits, response_logprobs
from rlhf.models.tiny import tiny_config
from rlhf.models.value_model import ValueModel, hf_name, response_values
from rlhf.trainers.rl import token_balance
from rlhf.trainers.roles import start_trained_group
from rlhf.workers.critic import CriticWorker
from rlhf.workers.group import WorkerGroup
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.reference import ReferenceWorker
from rlhf.workers.reward import RewardWorker

pytestmark = pytest.mark.ray

VOCAB = 64
CLUSTER = ClusterConfig(collective_timeout_s=120)
ROWS, TRAIN_BATCH, BUDGET = 16, 8, 24
SEED, TEMPERATURE = 7, 0.7
LR, ADAM_EPS = 0.5, 1.0
PROMPT_LENGTHS = [3, 2, 4, 3, 2, 4, 3, 2, 4, 3, 2, 4, 3, 2, 4, 3]
RESPONSE_LENGTHS = [8, 11, 2, 20, 2, 7, 1, 9, 1, 8, 8, 9, 4, 13, 20, 1]  # long-tailed: mostly short


def long_tailed_batch(seed: int = 0) -> RolloutBatch:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    responses = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in RESPONSE_LENGTHS]
    prompt_ids, prompt_mask = pad_sequences(prompts, pad_id=0, left=True)
    response_ids, response_mask = pad_sequences(responses, pad_id=0, left=False)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask)


def test_the_batch_gives_the_ranks_different_numbers_of_bins():
    """The case the packed update must survive, forced by construction: per minibatch, the two ranks'
    first-fit bins differ in number (so one rank splits bins to match the other)."""
    lengths = sequence_lengths(long_tailed_batch())
    order = dp_shard_order(lengths, 2, minibatch_rows=TRAIN_BATCH // 2)
    assert order != list(range(ROWS))  # the split deals rows out of order: concat must restore it
    counts = []
    for rank in range(2):
        shard = order[rank * ROWS // 2 : (rank + 1) * ROWS // 2]
        minibatches = [shard[k : k + TRAIN_BATCH // 2] for k in range(0, len(shard), TRAIN_BATCH // 2)]
        counts.append([len(token_budget_bins([lengths[i] for i in m], BUDGET, field="f")) for m in minibatches])
    assert counts[0] != counts[1], counts


def packed_group(worker_cls, role: str, zero_stage: int, algo: AlgorithmConfig, model_path: str) -> WorkerGroup:
    """2 ranks of `worker_cls` with a token budget, as rlhf.trainers.rl starts them, initialised from `model_path`."""
    train_cfg = TrainConfig(
        num_workers=2,
        zero_stage=zero_stage,
        zero3_param_persistence_threshold=0,
        max_tokens_per_micro_batch=BUDGET,
        micro_batch_size=2,
        train_batch_size=TRAIN_BATCH,
        optim=OptimConfig(lr=LR, eps=ADAM_EPS, grad_clip=100.0),  # a step linear in the gradient (docstring)
    )
    cfg = RLHFConfig(algorithm=algo, cluster=CLUSTER, run=RunConfig(seed=SEED))
    group = start_trained_group(
        cfg, worker_cls, role, train_cfg, cfg.cluster.policy, algo_cfg=algo, **token_balance(train_cfg)
    )
    try:
        group.call(worker_cls.init_model, model_path, timeout=300)
    except BaseException:
        group.shutdown()
        raise
    return group


def assert_close_on(mask: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor) -> None:
    mask = mask.bool()
    torch.testing.assert_close(actual[mask], expected[mask], rtol=0, atol=1e-5)


def padded_minibatches(batch: RolloutBatch) -> list[RolloutBatch]:
    """The optimizer steps' rows under the plain split (2 ranks, train_batch_size 8): rank r holds rows
    8r … 8r + 7 and its minibatch k rows 8r + 4k … 8r + 4k + 3; the packed group keeps these sets."""
    return [batch.select([8 * r + 4 * k + i for r in range(2) for i in range(4)]) for k in range(2)]


def padded_updates(model: torch.nn.Module, batch: RolloutBatch, loss_fn) -> dict[str, float]:
    """The padded computation in one process: each minibatch's full loss, its gradient and an AdamW step
    (the engine's optimizer, fp32). Returns the mean loss and gradient norm over the minibatches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.0)
    losses, norms = [], []
    for minibatch in padded_minibatches(batch):
        loss = loss_fn(model, minibatch)
        loss.backward()
        norms.append(float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert max(norms) < 100.0  # no clipping on either side
    return {"loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms)}


def assert_weights_equal(saved_dir: Path, expected: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    """The group's exported weights equal `expected`; the update moved them by far more than the tolerance."""
    saved = load_file(saved_dir / "model.safetensors")
    assert set(saved) == set(expected)
    moved = max(float((tensor - initial[name]).abs().max()) for name, tensor in expected.items() if name in initial)
    assert moved > 1e-3, moved
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_policy_packed_equals_padded(ray_session, tiny_model_path, tmp_path):
    algo = AlgorithmConfig(loss_agg="seq_mean_token_mean", entropy_coef=0.01, kl_coef=0.1, use_kl_loss=True)
    batch = long_tailed_batch()
    group = packed_group(PolicyWorker, "policy-packed", 3, algo, tiny_model_path)
    try:
        logprobs = group.call(PolicyWorker.compute_logprobs, batch, TEMPERATURE)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        with torch.no_grad():
            expected, _ = response_logprobs(model, batch, temperature=TEMPERATURE)
        assert_close_on(batch.response_mask, logprobs, expected)
        sign = torch.tensor([1.0, -1.0] * (ROWS // 2)).unsqueeze(1)
        batch = batch.replace(
            old_logprobs=expected - 0.05,
            ref_logprobs=expected + 0.05,
            advantages=(sign * torch.linspace(0.5, 1.5, ROWS).unsqueeze(1)).expand_as(batch.response_ids).clone(),
        )
        # two optimizer steps (two minibatches of 8 rows), the ranks with different numbers of bins
        stats = group.call(PolicyWorker.update, batch, TEMPERATURE)
        group.call(PolicyWorker.save_hf, str(tmp_path / "packed"))
    finally:
        group.shutdown()

    def policy_loss(model, minibatch):  # PolicyWorker's loss for this algo, on the whole minibatch
        mask = minibatch.response_mask
        logits = response_logits(model, minibatch, temperature=TEMPERATURE)
        logprobs = logprobs_from_logits(logits, minibatch.response_ids)
        agg = algo.loss_agg
        loss, _ = POLICY_LOSSES.get(algo.policy_loss)(
            logprobs, minibatch.old_logprobs, minibatch.advantages, mask, clip_low=0.2, clip_high=0.2, agg=agg
        )
        kl, _ = kl_loss(logprobs, minibatch.ref_logprobs, mask, kind=algo.kl_estimator, agg=agg)
        return loss + algo.kl_coef * kl - algo.entropy_coef * aggregate(entropy_from_logits(logits), mask, agg)

    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    padded = padded_updates(model.train(), batch, policy_loss)
    assert stats["policy/total_loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert stats["policy/grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
    assert_weights_equal(tmp_path / "packed", model.state_dict(), initial)


def test_critic_packed_equals_padded(ray_session, tiny_model_path, tmp_path):
    algo = AlgorithmConfig(value_clip=0.5, loss_agg="token_mean")
    batch = long_tailed_batch(seed=1)
    group = packed_group(CriticWorker, "critic-packed", 2, algo, tiny_model_path)
    try:
        values = group.call(CriticWorker.compute_values, batch)
        model = ValueModel.from_pretrained(tiny_model_path, head_seed=SEED)
        with torch.no_grad():
            expected = response_values(model, batch)
        assert_close_on(batch.response_mask, values, expected)
        returns = torch.linspace(-1.0, 1.0, ROWS).unsqueeze(1).expand_as(batch.response_ids).clone()
        batch = batch.replace(values=expected, returns=returns)
        stats = group.call(CriticWorker.update, batch)
        group.call(CriticWorker.save_hf, str(tmp_path / "packed"))
    finally:
        group.shutdown()

    def critic_loss(model, minibatch):
        values = response_values(model, minibatch)
        return value_loss(
            values, minibatch.values, minibatch.returns, minibatch.response_mask, clip_range=0.5, agg=algo.loss_agg
        )[0]

    initial = {hf_name(name): tensor.clone() for name, tensor in model.state_dict().items()}
    padded = padded_updates(model.train(), batch, critic_loss)
    assert stats["critic/loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert stats["critic/grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
    assert_weights_equal(tmp_path / "packed", {hf_name(n): t for n, t in model.state_dict().items()}, initial)


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory) -> str:
    config = tiny_config("llama", vocab_size=VOCAB)
    config.num_labels = 1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-rm")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    return str(path)


def test_frozen_roles_packed_equal_the_padded_forward(tiny_model_path, reward_model_path):
    """ReferenceWorker and RewardWorker with a token budget, called in this process (their Ray dispatch is
    the same as the trained roles'; an actor start would cost more than the check)."""
    batch = long_tailed_batch(seed=2)
    assert len(token_budget_bins(sequence_lengths(batch), BUDGET, field="f")) > 2  # packed out of row order
    reference = ReferenceWorker(ModelConfig(), ClusterConfig(), max_tokens_per_micro_batch=BUDGET)
    reference.init_model(tiny_model_path)
    reward = RewardWorker(ModelConfig(), ClusterConfig(), max_tokens_per_micro_batch=BUDGET)
    reward.init_model(reward_model_path)
    with torch.no_grad():
        expected_logprobs, _ = response_logprobs(reference.model, batch, temperature=TEMPERATURE)
        expected_scores = last_token_scores(reward.model, batch)
    assert_close_on(batch.response_mask, reference.compute_logprobs(batch, TEMPERATURE), expected_logprobs)
    torch.testing.assert_close(reward.score(batch), expected_scores, rtol=0, atol=1e-5)
