"""model.peft on the models with a scalar head: the reward model of stage=rm and PPO's critic.

For each case the ranks train a few optimizer steps, and a full snapshot of the parameters before
and after shows what trained: every parameter the method freezes is bit-identical afterwards, the
head and the method's own parameters (LoRA matrices, biases, the unfrozen blocks) moved. The export
then reproduces the trainer's scores (float32, 1e-5): the merged `final/` as the RL stages'
RewardWorker loads it, and for LoRA also base + `final/adapter/` (peft restores the trained head,
saved as modules_to_save).
"""

from __future__ import annotations

import gc
import re
import sys

import pytest
import ray
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from rlhf.config import LoraConfig, ModelConfig, OfflineConfig, OptimConfig, PeftConfig, RLHFConfig, TrainConfig
from rlhf.engines.adapters import ADAPTER_DIR
from rlhf.models.logprobs import last_token_scores
from rlhf.models.value_model import ValueModel, response_values
from rlhf.trainers.roles import start_policy_group, start_trained_group
from rlhf.workers.critic import CriticWorker
from rlhf.workers.group import dispatch
from rlhf.workers.reward_trainer import RewardModelWorker

pytestmark = pytest.mark.ray

LORA_QV = LoraConfig(rank=4, alpha=16, target_modules=["q_proj", "v_proj"])
HEAD = re.compile(r"(^|\.)score\.(modules_to_save\.default\.)?weight$")
# method -> (model config, ZeRO stage, which parameter names train besides the head)
RM_CASES = {
    "lora": (ModelConfig(lora=LORA_QV, peft=PeftConfig(method="lora")), 3, re.compile(r"\.lora_[AB]\.")),
    "bitfit": (ModelConfig(peft=PeftConfig(method="bitfit")), 2, re.compile(r"\.bias$")),
    "freeze": (
        ModelConfig(peft=PeftConfig(method="freeze", frozen_patterns=["embed_tokens"], frozen_layers=1)),
        2,
        re.compile(r"layers\.1\.|(^|\.)norm\.weight$"),
    ),
}


class ParameterSnapshots:
    """Test-only window into a trained worker: every parameter (gathered under ZeRO-3) with requires_grad."""

    engine: object

    @dispatch("broadcast", collect="first")
    def parameter_snapshot(self) -> dict[str, tuple[torch.Tensor, bool]]:
        from deepspeed.runtime.zero import GatheredParameters

        named = list(self.engine.module.named_parameters())
        with GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: (p.detach().clone().cpu(), p.requires_grad) for name, p in named}


class InspectedRewardModelWorker(ParameterSnapshots, RewardModelWorker):
    """RewardModelWorker whose configs can be swapped between init_model calls (one pair of ranks for every case)."""

    @dispatch("broadcast", collect="first")
    def reconfigure(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
        self.model_cfg, self.train_cfg, self.engine = model_cfg, train_cfg, None
        gc.collect()

    @dispatch("broadcast", collect="first")
    def scores(self, batch) -> torch.Tensor:
        """The trainer's scores [B] of `batch` (every rank takes part in the ZeRO-3 forward)."""
        engine = self.engine
        engine.eval()
        with torch.no_grad():
            return last_token_scores(self._forward_model(), batch.to(engine.device)).cpu()


class InspectedCriticWorker(ParameterSnapshots, CriticWorker):
    pass


# Ray workers cannot import test modules: ship the subclasses by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def train_config(zero_stage: int, num_workers: int = 2) -> TrainConfig:
    return TrainConfig(
        num_workers=num_workers,
        zero_stage=zero_stage,
        zero3_param_persistence_threshold=0,
        micro_batch_size=2,
        train_batch_size=8,
        optim=OptimConfig(lr=1e-2),
    )


def what_trained(before: dict, after: dict) -> tuple[set[str], set[str]]:
    """(names with requires_grad, names whose tensor changed); frozen ones must not have changed."""
    trainable = {name for name, (_, requires_grad) in after.items() if requires_grad}
    changed = {name for name in after if not torch.equal(before[name][0], after[name][0])}
    return trainable, changed


@pytest.fixture(scope="module")
def reward_ranks(ray_cluster):
    cfg = RLHFConfig(policy=train_config(2), offline=OfflineConfig(objective="reward"))
    group = start_policy_group(cfg, InspectedRewardModelWorker, role="rm-peft", offline_cfg=cfg.offline)
    yield group
    group.shutdown()


@pytest.mark.parametrize("method", list(RM_CASES))
def test_reward_model_trains_only_what_the_method_allows(
    reward_ranks, tiny_model_path, batch_factory, tmp_path, method
):
    model_cfg, zero_stage, own = RM_CASES[method]
    group = reward_ranks
    group.call(InspectedRewardModelWorker.reconfigure, model_cfg, train_config(zero_stage))
    counts = group.call(RewardModelWorker.init_model, tiny_model_path, timeout=300)
    before = group.call(InspectedRewardModelWorker.parameter_snapshot)
    pairs = batch_factory(rows=16, seed=3)  # rows 2i, 2i+1: chosen, rejected (8 pairs, one optimizer step)
    for _ in range(3):
        group.call(RewardModelWorker.train_step, pairs)
    after = group.call(InspectedRewardModelWorker.parameter_snapshot)

    trainable, changed = what_trained(before, after)
    assert trainable == {n for n in after if HEAD.search(n) or own.search(n)}, sorted(trainable)
    assert changed <= trainable, sorted(changed - trainable)  # every frozen weight is bit-identical
    assert any(HEAD.search(n) for n in changed) and any(own.search(n) for n in changed), sorted(changed)
    assert counts["num_trainable_parameters"] == sum(after[n][0].numel() for n in trainable)

    trained = group.call(InspectedRewardModelWorker.scores, pairs)
    final = tmp_path / "final"
    group.call(RewardModelWorker.save_hf, str(final))
    # what reward.model_path=<final> loads in the RL stages (rlhf.workers.reward.RewardWorker)
    saved = AutoModelForSequenceClassification.from_pretrained(final, num_labels=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(last_token_scores(saved, pairs), trained, rtol=0, atol=1e-5)
    if method != "lora":
        assert not (final / ADAPTER_DIR).exists()
        return
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)  # a fresh random head
    with_adapter = PeftModel.from_pretrained(base, final / ADAPTER_DIR).eval()
    with torch.no_grad():
        from_adapter = last_token_scores(with_adapter.get_base_model(), pairs)
    torch.testing.assert_close(from_adapter, trained, rtol=0, atol=1e-5)


def test_lora_critic_trains_adapters_and_value_head_only(ray_cluster, tiny_model_path, batch_factory, tmp_path):
    model_cfg = ModelConfig(lora=LORA_QV, peft=PeftConfig(method="lora"))
    # one actor: the export's merge is the same code as the reward model's ZeRO-3 case
    cfg = RLHFConfig(model=model_cfg, critic=train_config(1, num_workers=1))
    group = start_trained_group(
        cfg, InspectedCriticWorker, "critic-peft", cfg.critic, cfg.cluster.critic, algo_cfg=cfg.algorithm
    )
    try:
        group.call(CriticWorker.init_model, tiny_model_path, timeout=300)
        batch = batch_factory(rows=8, seed=5)
        before = group.call(InspectedCriticWorker.parameter_snapshot)
        old_values = group.call(CriticWorker.compute_values, batch)
        returns = torch.linspace(-1.0, 1.0, 8).unsqueeze(1).expand_as(old_values).clone()
        for _ in range(3):
            group.call(CriticWorker.update, batch.replace(values=old_values, returns=returns))
        after = group.call(InspectedCriticWorker.parameter_snapshot)
        values = group.call(CriticWorker.compute_values, batch)
        group.call(CriticWorker.save_hf, str(tmp_path / "critic"))
    finally:
        group.shutdown()

    trainable, changed = what_trained(before, after)
    own = re.compile(r"^value_head\.|\.lora_[AB]\.")
    assert trainable == {n for n in after if own.search(n)}, sorted(trainable)
    assert changed <= trainable, sorted(changed - trainable)
    assert any(n.startswith("value_head.") for n in changed) and any("lora_B" in n for n in changed)
    reloaded = ValueModel.from_pretrained(tmp_path / "critic", head_seed=1).eval()  # merged backbone + trained head
    with torch.no_grad():
        exported = response_values(reloaded, batch)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(exported[mask], values[mask], rtol=0, atol=1e-5)
