"""ReferenceWorker and RewardWorker, colocated on one placement-group bundle (0.5 CPU each).

Reference logprobs: equal to a single-process HF forward at 1e-5. Reward: equal to the HF
sequence-classification model run on each unpadded sequence alone (its own pooling at the last
token) at 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.config import ClusterConfig, ModelConfig, ResourceConfig
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


@pytest.fixture(scope="module")
def colocated(ray_session):
    from ray.util.placement_group import remove_placement_group

    pg = create_placement_group([{"CPU": 1.0}], "PACK", timeout_s=60, name="ref-rm")
    half = ResourceConfig(num_cpus=0.5)
    groups = []
    try:
        for cls, role in ((ReferenceWorker, "reference"), (RewardWorker, "reward")):
            groups.append(
                WorkerGroup(
                    cls,
                    role=role,
                    num_workers=1,
                    resources=half,
                    init_args=(ModelConfig(), ClusterConfig()),
                    init_kwargs={"micro_batch_size": 3},
                    placement_group=pg,
                    bundle_indices=[0],
                )
            )
        yield tuple(groups)
    finally:
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
