"""Every model.peft.method on a 2-rank PolicyWorker group: what trains, that it learns, what it exports.

For each method: the ranks report the trainable-parameter count that the same wrapping gives in
this process; three optimizer steps with advantage +1 on every token lower the batch's negative
mean logprob (the loss of pushing every sampled token up); save_hf writes plain weights plus
peft's adapter, and reloading them reproduces the trainer's logprobs (float32, 1e-5):

  lora, ia3, loha, lokr   the merged checkpoint == PeftModel.from_pretrained(base, adapter), and
                          == its merge_and_unload() (the adapter as peft would merge it)
  prompt/prefix/p-tuning  the checkpoint is the unchanged base; base + adapter == the trainer
  bitfit, freeze          the checkpoint is the whole trained model; no adapter
"""

from __future__ import annotations

import gc
import json
import sys

import pytest
import ray
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlhf.config import (
    AlgorithmConfig,
    ClusterConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    RLHFConfig,
    TrainConfig,
)
from rlhf.engines.adapters import ADAPTER_DIR
from rlhf.models.logprobs import response_logprobs
from rlhf.models.peft_methods import PROMPT_METHODS
from rlhf.models.peft_utils import VirtualTokenLM, apply_peft
from rlhf.trainers.roles import start_policy_group
from rlhf.workers.group import dispatch
from rlhf.workers.policy import PolicyWorker

pytestmark = pytest.mark.ray

LORA_QV = LoraConfig(rank=4, alpha=16, target_modules=["q_proj", "v_proj"])
# method -> (model config, ZeRO stage, learning rate); ZeRO-3 for the merges that gather adapter layers
CASES = {
    "lora": (ModelConfig(lora=LORA_QV), 3, 1e-2),
    "ia3": (ModelConfig(peft=PeftConfig(method="ia3")), 3, 5e-2),
    "loha": (ModelConfig(lora=LORA_QV, peft=PeftConfig(method="loha")), 3, 1e-2),
    "lokr": (ModelConfig(lora=LORA_QV, peft=PeftConfig(method="lokr")), 2, 1e-2),
    "prompt_tuning": (ModelConfig(peft=PeftConfig(method="prompt_tuning", num_virtual_tokens=4)), 3, 5e-2),
    "prefix_tuning": (ModelConfig(peft=PeftConfig(method="prefix_tuning", num_virtual_tokens=4)), 2, 5e-2),
    "p_tuning": (
        ModelConfig(peft=PeftConfig(method="p_tuning", num_virtual_tokens=4, encoder_hidden_size=32)),
        2,
        1e-2,
    ),
    "bitfit": (ModelConfig(peft=PeftConfig(method="bitfit")), 3, 5e-2),
    "freeze": (
        ModelConfig(peft=PeftConfig(method="freeze", frozen_patterns=["embed_tokens"], frozen_layers=1)),
        2,
        1e-3,
    ),
}


class ReusedPolicyWorker(PolicyWorker):
    """PolicyWorker whose model and train configs can be swapped between init_model calls.

    Starting two actors costs far more than building an engine, so every method reuses one pair of
    ranks; init_model itself (load, apply_peft, DeepSpeed) runs afresh for each method.
    """

    @dispatch("broadcast", collect="first")
    def reconfigure(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
        self.model_cfg, self.train_cfg, self.engine = model_cfg, train_cfg, None
        gc.collect()


# Ray workers cannot import test modules: ship the subclass by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def train_config(zero_stage: int, lr: float) -> TrainConfig:
    return TrainConfig(
        num_workers=2,
        zero_stage=zero_stage,
        zero3_param_persistence_threshold=0,
        micro_batch_size=2,
        train_batch_size=8,
        optim=OptimConfig(lr=lr),
    )


@pytest.fixture(scope="module")
def policy_ranks(ray_cluster):
    cfg = RLHFConfig(
        policy=train_config(3, 1e-3),
        algorithm=AlgorithmConfig(kl_coef=0.0),
        cluster=ClusterConfig(collective_timeout_s=120),
    )
    group = start_policy_group(cfg, ReusedPolicyWorker, role="policy-peft", algo_cfg=cfg.algorithm)
    yield group
    group.shutdown()


def nll(logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    return float(-(logprobs * mask).sum() / mask.sum())


@pytest.mark.parametrize("method", list(CASES))
def test_peft_method_trains_and_exports(policy_ranks, tiny_model_path, batch_factory, tmp_path, method):
    model_cfg, zero_stage, lr = CASES[method]
    expected = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_model_path), model_cfg)
    group = policy_ranks
    group.call(ReusedPolicyWorker.reconfigure, model_cfg, train_config(zero_stage, lr))
    counts = group.call(PolicyWorker.init_model, tiny_model_path, timeout=300)
    assert counts["num_trainable_parameters"] == sum(p.numel() for p in expected.parameters() if p.requires_grad)
    assert counts["num_trainable_parameters"] < counts["num_parameters"]

    batch = batch_factory(rows=8, seed=3)
    before = group.call(PolicyWorker.compute_logprobs, batch)
    for _ in range(3):
        old = group.call(PolicyWorker.compute_logprobs, batch)
        group.call(PolicyWorker.update, batch.replace(old_logprobs=old, advantages=batch.response_mask.float()))
    trained = group.call(PolicyWorker.compute_logprobs, batch)
    assert nll(trained, batch.response_mask) < nll(before, batch.response_mask) - 1e-3

    out = tmp_path / "final"
    group.call(PolicyWorker.save_hf, str(out))

    check_export(method, out, tiny_model_path, batch, trained)


def check_export(method: str, out, base_path: str, batch, trained: torch.Tensor) -> None:
    """The saved directory reproduces the trainer: as a plain model, or as base + peft adapter."""
    mask = batch.response_mask.bool()
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter = out / ADAPTER_DIR
    if method in ("bitfit", "freeze"):
        assert not adapter.exists()
        exported, _ = response_logprobs(saved, batch)
        torch.testing.assert_close(exported[mask], trained[mask], rtol=0, atol=1e-5)
        return

    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == method.upper()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    if method in ("prompt_tuning", "p_tuning"):
        with_adapter = VirtualTokenLM(with_adapter)
    with torch.no_grad():
        adapter_logprobs, _ = response_logprobs(with_adapter, batch)
    torch.testing.assert_close(adapter_logprobs[mask], trained[mask], rtol=0, atol=1e-5)
    if method in PROMPT_METHODS:  # nothing to merge: the weights are the base model's
        original = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
        for name, tensor in saved.state_dict().items():
            assert torch.equal(tensor, original[name]), name
        return
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.no_grad():
        exported = saved(**inputs).logits
        torch.testing.assert_close(exported, with_adapter(**inputs).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(exported, with_adapter.merge_and_unload()(**inputs).logits, rtol=0, atol=1e-5)
