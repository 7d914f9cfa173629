"""ReferenceWorker and RewardWorker, colocated on one placement-group bundle (0.5 CPU each), and as
ZeRO-3 groups of 2 actors that partition the model.

Reference logprobs: equal to a single-process HF forward at 1e-5. Reward: equal to the HF
sequence-classification model run on each unpadded sequence alone (its own pooling at the last
token) at 1e-5. The ZeRO-3 groups: built inside deepspeed.zero.Init (every parameter partitioned
before any engine exists, the gathered weights equal to the checkpoint's), and logprobs / scores
equal to the one whole-model actor's at 1e-5 (float32; the same kernels on reassembled weights).
"""

from __future__ import annotations

import math
import sys

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.config import ClusterConfig, ModelConfig, ResourceConfig
from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import response_logprobs
from rlhf.models.tiny import tiny_config
from rlhf.workers.group import WorkerGroup, create_placement_group
from rlhf.workers.reference import ReferenceWorker
from rlhf.workers.reward import RewardWorker

pytestmark = pytest.mark.ray

VOCAB = 64


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory) -> str:
    config = tiny_config("llama", vocab_size=VOCAB)
    config.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    path = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(path)
    return str(path)


def reference_and_reward(suffix: str, num_workers: int, **options) -> list[WorkerGroup]:
    """A ReferenceWorker group and a RewardWorker group of `num_workers` actors each (0.5 CPU per actor)."""
    groups = []
    try:
        for cls, role in ((ReferenceWorker, "reference"), (RewardWorker, "reward")):
            groups.append(
                WorkerGroup(
                    cls,
                    role=role + suffix,
                    num_workers=num_workers,
                    resources=ResourceConfig(num_cpus=0.5),
                    init_args=(ModelConfig(), ClusterConfig(collective_timeout_s=120)),
                    **options,
                )
            )
    except BaseException:
        for group in groups:
            group.shutdown()
        raise
    return groups


@pytest.fixture(scope="module")
def colocated(ray_session):
    from ray.util.placement_group import remove_placement_group

    pg = create_placement_group([{"CPU": 1.0}], "PACK", timeout_s=60, name="ref-rm")
    groups = reference_and_reward("", 1, init_kwargs={"micro_batch_size": 3}, placement_group=pg, bundle_indices=[0])
    yield tuple(groups)
    for group in groups:
        group.shutdown()
    remove_placement_group(pg)


def test_reference_logprobs_match_hf(colocated, tiny_model_path, batch_factory):
    reference, _ = colocated
    reference.call(ReferenceWorker.init_model, tiny_model_path)
    batch = batch_factory(rows=8, seed=6)
    logprobs = reference.call(ReferenceWorker.compute_logprobs, batch)
    expected, _ = response_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), batch)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logprobs[mask], expected[mask], rtol=0, atol=1e-5)


def test_reward_is_the_head_at_the_last_real_token(colocated, reward_model_path, batch_factory):
    _, reward = colocated
    reward.call(RewardWorker.init_model, reward_model_path)
    batch = batch_factory(rows=8, seed=7)
    scores = reward.call(RewardWorker.score, batch)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_path).eval()
    expected = []
    with torch.no_grad():
        for i in range(len(batch)):
            ids = batch.input_ids[i][batch.attention_mask[i].bool()].unsqueeze(0)
            expected.append(model(input_ids=ids).logits[0, 0])
    assert scores.shape == (8,)
    torch.testing.assert_close(scores, torch.stack(expected), rtol=0, atol=1e-5)


# -- ZeRO-3 groups: the model partitioned over 2 actors ----------------------------------------

ZERO3 = {"zero_stage": 3, "zero3_param_persistence_threshold": 0}  # tiny tensors partition too


@pytest.fixture(scope="module")
def zero3_groups(ray_session):
    groups = reference_and_reward("-zero3", 2, init_kwargs={"micro_batch_size": 2, **ZERO3})
    yield tuple(groups)
    for group in groups:
        group.shutdown()


def partitioned_load(worker, path: str) -> dict:
    """Runs in a ZeRO-3 reference actor (after init_model): load `path` again as init_model does and report
    how it comes out of deepspeed.zero.Init, before any engine, and its gathered tensors (rank 0)."""
    from deepspeed.runtime.zero import GatheredParameters

    model = load_causal_lm(path, dtype="float32", zero3_config=worker._zero3_config())
    named = list(model.named_parameters())
    report = {
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "numel_held": sum(p.numel() for _, p in named),
        "partition": {name: (p.ds_tensor.numel(), p.ds_numel) for name, p in named},
    }
    with GatheredParameters([p for _, p in named], modifier_rank=None):
        report["gathered"] = {name: p.detach().clone() for name, p in named} if worker.rank == 0 else {}
    return report


@pytest.fixture(scope="module")
def tied_model_path(tmp_path_factory) -> str:
    """A tiny qwen2 whose LM head is its input embedding (tie_word_embeddings; saved once, as HF saves it)."""
    config = tiny_config("qwen2", vocab_size=VOCAB)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-tied")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zero3_reference_is_partitioned_from_the_start_and_loads_the_checkpoint(
    zero3_groups, tiny_model_path, tied_model_path, batch_factory, tied
):
    reference, _ = zero3_groups
    path = tied_model_path if tied else tiny_model_path
    counts = reference.call(ReferenceWorker.init_model, path, timeout=300)
    reports = ray.get([a.__ray_call__.remote(partitioned_load, path) for a in reference.actors])
    checkpoint = load_file(f"{path}/model.safetensors")
    assert counts["num_parameters"] == sum(t.numel() for t in checkpoint.values())
    for report in reports:
        assert report["numel_held"] == 0  # p.data is empty on every rank: no full tensor left behind
        assert report["tied"] == tied
        for name, (partition, full) in report["partition"].items():
            assert partition == math.ceil(full / 2), name  # each rank holds its half
    gathered = reports[0]["gathered"]
    assert set(gathered) == set(checkpoint)
    for name, tensor in checkpoint.items():
        assert torch.equal(gathered[name], tensor), name
    batch = batch_factory(rows=8, seed=10)
    logprobs = reference.call(ReferenceWorker.compute_logprobs, batch)
    expected, _ = response_logprobs(AutoModelForCausalLM.from_pretrained(path).eval(), batch)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logprobs[mask], expected[mask], rtol=0, atol=1e-5)


def test_zero3_reference_group_matches_one_actor(colocated, zero3_groups, tiny_model_path, batch_factory):
    reference, _ = colocated
    sharded, _ = zero3_groups
    reference.call(ReferenceWorker.init_model, tiny_model_path)
    sharded.call(ReferenceWorker.init_model, tiny_model_path, timeout=300)
    batch = batch_factory(rows=8, seed=8)
    expected = reference.call(ReferenceWorker.compute_logprobs, batch, 0.7)
    logprobs = sharded.call(ReferenceWorker.compute_logprobs, batch, 0.7)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logprobs[mask], expected[mask], rtol=0, atol=1e-5)
    # shards of 5 and 3 rows: 3 and 2 micro-batches, so rank 1 pads one forward pass (else both hang)
    shards = [batch.select(slice(0, 5)), batch.select(slice(5, 8))]
    parts = ray.get([a.call.remote("compute_logprobs", s, 0.7) for a, s in zip(sharded.actors, shards)], timeout=120)
    torch.testing.assert_close(torch.cat(parts)[mask], expected[mask], rtol=0, atol=1e-5)


def test_zero3_reward_group_matches_one_actor(colocated, zero3_groups, reward_model_path, batch_factory):
    _, reward = colocated
    _, sharded = zero3_groups
    reward.call(RewardWorker.init_model, reward_model_path)
    sharded.call(RewardWorker.init_model, reward_model_path, timeout=300)
    batch = batch_factory(rows=8, seed=9)
    torch.testing.assert_close(
        sharded.call(RewardWorker.score, batch), reward.call(RewardWorker.score, batch), rtol=0, atol=1e-5
    )


# Ray workers cannot import test modules: ship `partitioned_load` by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
