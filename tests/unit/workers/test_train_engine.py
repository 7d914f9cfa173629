"""Pure parts of the train engine: batch arithmetic, DeepSpeed config, LR schedule, full-weight export.

The export runs single-process on a plain (non-ZeRO) model, where GatheredParameters is a no-op;
the ZeRO-3 gather itself is covered by tests/integration/workers.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import LoraConfig, OptimConfig, TrainConfig
from rlhf.engines.train_engine import (
    GatedAdamW,
    NonFiniteCounter,
    build_lr_scheduler,
    build_optimizer,
    deepspeed_config,
    gated_cpu_adam,
    gradient_accumulation_steps,
    iter_full_parameters,
    write_hf_checkpoint,
)
from rlhf.errors import ConfigError
from rlhf.models.peft_utils import apply_lora
from rlhf.models.tiny import build_tiny_model

VOCAB = 64


def test_gradient_accumulation_is_train_batch_over_micro_times_dp():
    # 32 / (4 × 2) = 4 micro-batches per rank per optimizer step
    assert gradient_accumulation_steps(TrainConfig(train_batch_size=32, micro_batch_size=4), dp=2) == 4


def test_inconsistent_batch_sizes_show_the_arithmetic():
    with pytest.raises(ConfigError, match=r"train_batch_size 96 is not divisible by micro_batch_size 5 × dp 4 = 20"):
        gradient_accumulation_steps(TrainConfig(train_batch_size=96, micro_batch_size=5), dp=4)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    cfg = TrainConfig(zero_stage=stage, train_batch_size=16, micro_batch_size=2, zero3_param_persistence_threshold=0)
    ds = deepspeed_config(cfg, dp=2, bf16=False, device="cpu")
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["bf16"] == {"enabled": False}
    if stage == 3:
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_deepspeed_config_offload_rules():
    ds = deepspeed_config(
        TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True), dp=2, bf16=True, device="cuda"
    )
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        deepspeed_config(TrainConfig(zero_stage=2, offload_params=True), dp=2, bf16=False, device="cpu")


def test_lr_schedule_warmup_then_cosine_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_lr_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=3, scheduler="cosine"), num_training_steps=13)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # warm-up 1/4, 2/4, 3/4; then cosine from 1 at step 3 down to 0 at step 13
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.5)
    assert lrs[13] == pytest.approx(0.0, abs=1e-12)


def test_cosine_needs_the_number_of_steps():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="num_training_steps"):
        build_lr_scheduler(opt, OptimConfig(scheduler="cosine"), num_training_steps=None)


def test_full_parameters_of_a_plain_model_are_its_state_dict():
    model = build_tiny_model("llama", vocab_size=VOCAB, seed=0)
    exported = dict(iter_full_parameters(model, rank=0, bucket_bytes=1 << 16))
    expected = model.state_dict()
    assert list(exported) == list(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    assert not dict(iter_full_parameters(model, rank=1))  # only rank 0 yields


def test_lora_export_equals_merge_and_unload_with_plain_names():
    model = apply_lora(build_tiny_model("qwen2", vocab_size=VOCAB, seed=0), LoraConfig(rank=4, alpha=8))
    with torch.no_grad():  # LoRA B starts at 0; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    exported = dict(iter_full_parameters(model, rank=0, bucket_bytes=1 << 15))
    merged = model.merge_and_unload().state_dict()
    assert set(exported) == set(merged)
    assert all("lora" not in n and "base_layer" not in n and not n.startswith("base_model") for n in exported)
    assert "model.layers.0.self_attn.q_proj.weight" in exported
    for name, tensor in merged.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-6, atol=1e-6)


def test_hf_checkpoint_is_sharded_atomically_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("qwen2", vocab_size=VOCAB, seed=1)
    target = tmp_path / "hf"
    target.mkdir()
    (target / "stale.txt").write_text("replaced")
    write_hf_checkpoint(target, iter_full_parameters(model, rank=0), config=model.config, max_shard_bytes=400_000)
    assert not (target / "stale.txt").exists()
    assert not list(tmp_path.glob("hf.*"))  # no temp or old dirs left behind
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert set(load_file(target / shards[0])) <= set(model.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_hf_checkpoint_streams_each_tensor_before_taking_the_next(tmp_path):
    # the producer reuses one buffer for every tensor, as a released ZeRO-3 bucket would be reused:
    # a writer that kept a reference instead of writing at once would save the last value everywhere
    buffer = torch.empty(6)
    gen = torch.Generator().manual_seed(0)
    expected: dict[str, torch.Tensor] = {}

    def produce():
        for i in range(300):  # more header entries than a 4 KiB reservation holds: several shards
            buffer.copy_(torch.randn(6, generator=gen))
            expected[f"layers.{i}.weight"] = buffer.clone().view(2, 3)
            yield f"layers.{i}.weight", buffer.view(2, 3)
        yield "bf16", torch.arange(5, dtype=torch.bfloat16)
        yield "mask", torch.tensor([True, False, True])
        yield "scalar", torch.tensor(2.5)
        yield "empty", torch.zeros(0, 4)
        yield "transposed", torch.arange(6.0).view(2, 3).t()

    expected.update(
        bf16=torch.arange(5, dtype=torch.bfloat16),
        mask=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4),
        transposed=torch.arange(6.0).view(2, 3).t(),
    )
    config = build_tiny_model("qwen2", vocab_size=VOCAB, seed=0).config
    target = write_hf_checkpoint(tmp_path / "hf", produce(), config=config, max_shard_bytes=1 << 20)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(target / shard))
    assert set(loaded) == set(expected) == set(index["weight_map"])
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_bf16_configs_state_deepspeeds_overflow_check():
    # the non-finite guard relies on DeepSpeed skipping bf16 steps with an inf/NaN gradient norm
    assert deepspeed_config(TrainConfig(), dp=2, bf16=True, device="cpu")["bf16"] == {
        "enabled": True,
        "check_grad_overflow": True,
    }


@pytest.mark.parametrize("cpu_offload", [False, True], ids=["torch-adamw", "cpu-adam"])
def test_gated_optimizer_and_schedule_stand_still_while_skipping(cpu_offload):
    module = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    param = module.weight
    opt = build_optimizer(module, OptimConfig(lr=1.0), cpu_offload=cpu_offload)
    assert isinstance(opt, gated_cpu_adam() if cpu_offload else GatedAdamW)
    sched = build_lr_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=3), num_training_steps=None)
    param.grad = torch.tensor([[1.0], [float("nan")]])
    opt.skip = True
    opt.step()
    sched.step()
    assert torch.equal(param.detach(), torch.ones(2, 1)) and not opt.state
    assert sched.get_last_lr() == [0.25] and sched.last_epoch == 0
    opt.skip = False
    param.grad = torch.tensor([[1.0], [1.0]])
    opt.step()
    sched.step()
    assert (param.detach() < 1).all() and sched.get_last_lr() == [0.5]


def test_cpu_adam_steps_like_torch_adamw_with_the_same_decay_groups():
    # non-default betas, eps and weight decay, so a setting CPU Adam dropped would show; the decay
    # group (2-d weights) and the no-decay group (biases, norms) must each get their own decay
    cfg = OptimConfig(lr=1e-2, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.1)
    model = build_tiny_model("qwen2", vocab_size=VOCAB, seed=0)
    copy = build_tiny_model("qwen2", vocab_size=VOCAB, seed=0)
    torch_adamw, cpu_adam = build_optimizer(model, cfg), build_optimizer(copy, cfg, cpu_offload=True)
    assert [g["weight_decay"] for g in cpu_adam.param_groups] == [0.1, 0.0]
    initial = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), copy.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        torch_adamw.step()
        cpu_adam.step()
    assert min((p - p0).abs().max().item() for p, p0 in zip(model.parameters(), initial)) > 1e-3  # every tensor moved
    for (name, p), q in zip(model.named_parameters(), copy.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=name)


def test_nonfinite_counter_counts_streaks_and_totals():
    counter = NonFiniteCounter()
    for step, (loss, grad) in enumerate([(True, True), (False, True), (False, False), (True, False)]):
        counter.record(step=step, loss=loss, grad_norm=grad)
    assert (counter.consecutive, counter.total, counter.last_step, counter.last_was_loss) == (1, 3, 3, True)
    assert counter.metrics("policy", skipped=2) == {
        "policy/nonfinite_skipped": 2.0,
        "policy/nonfinite_consecutive": 1.0,
        "policy/nonfinite_total": 3.0,
        "policy/nonfinite_loss": 1.0,
    }
