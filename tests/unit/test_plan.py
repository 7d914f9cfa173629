"""The sizing plan (`run.plan=true`, rlhf.plan): ZeRO and activation arithmetic by hand, the plan of a tiny and of
a 7B-shaped model (config.json only, no weights), every refusal naming the field to change, and the CLI path
printing the plan without starting Ray. No Ray here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rlhf.cli import CONF_DIR, to_config
from rlhf.config import RLHFConfig, validate
from rlhf.errors import ConfigError
from rlhf.plan import (
    GIB,
    ModelShape,
    activation_bytes,
    build_plan,
    format_plan,
    kv_bytes_per_token,
    zero_memory,
)

GB = 10**9

# Qwen2-7B's shape (h 3584, I 18944, 28 layers, 28 heads, 4 KV heads of 128, vocab 152064, untied head, q/k/v bias):
#   embeddings     V·h               = 152064·3584                         =   544,997,376
#   per layer: q   h·h + h           = 12,845,056 + 3,584                  =    12,848,640
#              k,v h·(4·128) + 512   = 1,835,008 + 512                     = 2 × 1,835,520
#              o   h·h               =                                          12,845,056
#              mlp 3·h·I             = 3·3584·18944                        =   203,685,888
#              2 RMSNorms 2h         =                                               7,168
#              layer                                                       =   233,057,792
#   final norm h = 3,584; LM head V·h = 544,997,376
#   Ψ = 544,997,376 + 28·233,057,792 + 3,584 + 544,997,376                = 7,615,616,512 (Qwen2-7B's published count)
PSI_7B = 7_615_616_512
# The critic: AutoModel (no LM head) + a value head of h weights and 1 bias: 7,615,616,512 − 544,997,376 + 3,585.
PSI_7B_CRITIC = 7_070_622_721
KV_PER_TOKEN_7B = 2 * 28 * 4 * 128 * 2  # keys and values × layers × KV heads × head dim × 2 bytes (bf16) = 57,344


def config_dir(tmp_path_factory, name: str, config) -> str:
    """A checkpoint directory holding only config.json: the plan reads nothing else."""
    directory = tmp_path_factory.mktemp(name)
    config.save_pretrained(directory)
    assert [p.name for p in directory.iterdir()] == ["config.json"]
    return str(directory)


@pytest.fixture(scope="module")
def qwen2_7b(tmp_path_factory) -> str:
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
    )  # fmt: skip
    return config_dir(tmp_path_factory, "qwen2-7b", config)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> str:
    from rlhf.models.tiny import tiny_config

    return config_dir(tmp_path_factory, "tiny-qwen2", tiny_config("qwen2", vocab_size=256))


def plan_config(*overrides: str) -> RLHFConfig:
    """What `rlhf <overrides>` would validate before it builds the plan."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = to_config(compose(config_name="config", overrides=["run.plan=true", *overrides]))
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------ the arithmetic


def test_zero_stages_reproduce_figure_1_of_the_zero_paper():
    """arXiv:1910.02054 Figure 1: Ψ = 7.5B, Nd = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB."""
    psi = 7_500_000_000
    totals = [zero_memory(psi, psi, 64, stage, mixed_precision=True).static for stage in range(4)]
    # (2+2+12)Ψ = 120e9; 2Ψ+2Ψ+12Ψ/64 = 30e9+1.40625e9; 2Ψ+14Ψ/64 = 15e9+1.640625e9; 16Ψ/64 = 1.875e9
    assert totals == [120 * GB, 31_406_250_000, 16_640_625_000, 1_875_000_000]


def test_fp32_offload_and_peft_states_by_hand():
    psi = 1_000_000_000
    # fp32 Adam: 4Ψ params (the master copy) + 4Ψ grads + 8Ψ (m, v); dp 4 divides optimizer, then grads, then params.
    fp32 = [zero_memory(psi, psi, 4, stage, mixed_precision=False) for stage in range(4)]
    assert [(m.params, m.grads, m.optimizer) for m in fp32] == [
        (4 * GB, 4 * GB, 8 * GB), (4 * GB, 4 * GB, 2 * GB), (4 * GB, 1 * GB, 2 * GB), (1 * GB, 1 * GB, 2 * GB),
    ]  # fmt: skip
    # offload: the rank's optimizer partition (12Ψ/4 in bf16), and with offload_params its params (2Ψ/4), go to host
    offloaded = zero_memory(psi, psi, 4, 3, mixed_precision=True, offload_optimizer=True, offload_params=True)
    assert (offloaded.params, offloaded.grads, offloaded.optimizer, offloaded.host) == (0, GB // 2, 0, 3 * GB + GB // 2)
    # LoRA with 10M trainable of 1B at ZeRO-2 bf16 on 2 ranks: params 2Ψ whole, grads 2·10M/2, optimizer 12·10M/2
    lora = zero_memory(psi, 10_000_000, 2, 2, mixed_precision=True)
    assert (lora.params, lora.grads, lora.optimizer) == (2 * GB, 10_000_000, 60_000_000)
    # QLoRA: the 990M frozen base weights at 4 bits (0.5 byte), the 10M adapters in bf16
    qlora = zero_memory(psi, 10_000_000, 1, 0, mixed_precision=True, frozen_bytes_per_param=0.5)
    assert qlora.params == 495_000_000 + 20_000_000


def shape(**changes) -> ModelShape:
    base = dict(
        field="model.path", path="x", model_type="gpt", params=0, trainable=0, layers=2, hidden=8, heads=2,
        kv_heads=2, head_dim=4, intermediate=32, vocab=10, max_positions=64, gated_mlp=False, eager_attention=False,
    )  # fmt: skip
    return ModelShape(**{**base, **changes})


def test_activation_bytes_by_hand():
    """s = 4 tokens, b = 3 rows, h = 8, a = 2 heads, 2 layers, vocab 10 (Korthikanti et al. §4.1, §4.3)."""
    gpt = shape()  # plain MLP of width I = 4h = 32: 34sbh per layer, as the paper's GPT block
    sbh = 4 * 3 * 8  # 96
    logits = 4 * 4 * 3 * 10  # fp32 logits 4sbv = 480
    assert activation_bytes(gpt, 3, 4, 2, checkpointing=False, logits=False) == 2 * 34 * sbh  # 6528
    assert activation_bytes(gpt, 3, 4, 2, checkpointing=False, logits=True) == 2 * 34 * sbh + logits
    eager = shape(eager_attention=True)  # + 5as²b = 5·2·16·3 = 480 per layer
    assert activation_bytes(eager, 3, 4, 2, checkpointing=False, logits=False) == 2 * (34 * sbh + 480)
    # gated MLP (gate, up, down): 15sbh + 2sbh + 8sbI = sb(17·8 + 8·32) = 12·392 = 4704 per layer
    assert activation_bytes(shape(gated_mlp=True), 3, 4, 2, checkpointing=False, logits=False) == 2 * 4704
    # fp32: twice the bytes
    assert activation_bytes(gpt, 3, 4, 4, checkpointing=False, logits=False) == 2 * 2 * 34 * sbh
    # gradient checkpointing: every layer keeps its input (2sbh in 16-bit) + one layer recomputed in full (34sbh)
    assert activation_bytes(gpt, 3, 4, 2, checkpointing=True, logits=False) == 2 * 2 * sbh + 34 * sbh


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(shape(layers=28, kv_heads=4, head_dim=128), 2) == KV_PER_TOKEN_7B == 57_344


# ------------------------------------------------------------------------------ whole plans


def test_plan_of_a_tiny_model_on_cpu(tiny_qwen2):
    cfg = plan_config(f"model.path={tiny_qwen2}", "cluster.nodes.host_memory_gib=16")
    plan = build_plan(cfg)
    # tiny qwen2, vocab 256: embeddings 256·128 = 32,768; per layer q 128·128+128 = 16,512, k and v 128·64+64 =
    # 8,256 each, o 16,384, MLP 3·128·384 = 147,456, norms 256 → 197,120; final norm 128; LM head 32,768
    psi = 32_768 + 2 * 197_120 + 128 + 32_768
    assert psi == 459_904
    assert [(r.name, r.ranks) for r in plan.roles] == [("policy", 2), ("rollout", 1)]  # grpo, no KL: no reference
    assert plan.roles[0].model.params == plan.roles[0].model.trainable == psi
    assert [s.node for s in plan.placement["policy"]] == [0, 0] and plan.placement["rollout"][0].node == 0
    policy = plan.memory["policy"]
    # float32, ZeRO-2 on 2 ranks: params 4Ψ, grads 4Ψ/2, optimizer 8Ψ/2
    assert (policy.params, policy.grads, policy.optimizer) == (4 * psi, 2 * psi, 4 * psi)
    # micro 8 rows × (64 prompt + 16 response) tokens, gated MLP, fp32 (×2):
    #   per layer 80·8·(15·128 + 2·128 + 8·384) = 640·5,248 = 3,358,720 → ×2 bytes ×2 layers = 13,434,880
    #   + fp32 logits 4·80·8·256 = 655,360
    assert policy.activations == 13_434_880 + 655_360
    rollout, kv = plan.memory["rollout"], plan.kv["rollout"]
    # vLLM on cpu: weights 4Ψ + rollout.kv_cache_gib (1 GiB); 2·2 layers·2 KV heads·32·4 bytes = 1,024 B per token
    assert rollout.engine == 4 * psi + GIB and kv.bytes_per_token == 1024 and kv.max_tokens == 1_048_576
    assert kv.needed_tokens == 16 * 8 * 80 and kv.max_model_len == 512  # 16 prompts × 8 samples × 80 tokens
    (ram,) = plan.loads  # one node, no GPU: everything is its RAM
    assert ram.gpu is None and ram.capacity == 16 * GIB and ram.total == 2 * policy.device + rollout.engine
    text = format_plan(plan)
    assert "stage=grpo on cluster=cpu_debug" in text and "node 0: ranks 0-1" in text
    assert "459,904 parameters" in text and "node 0 RAM" in text


def test_plan_of_a_7b_model_on_the_multi_node_preset(qwen2_7b):
    overrides = [
        "cluster=multi_node", f"model.path={qwen2_7b}", "algorithm.kl_coef=0.01", "policy.micro_batch_size=2",
        "data.max_prompt_length=512", "rollout.sampling.max_new_tokens=512",
    ]  # fmt: skip
    plan = build_plan(plan_config(*overrides))
    assert [(r.name, r.ranks) for r in plan.roles] == [("policy", 8), ("reference", 1), ("rollout", 4)]
    assert plan.roles[0].model.params == PSI_7B
    # PACK: the policy's 8 GPUs fill node 0; the reference's half GPU and the 4 engines go to node 1
    assert [(s.node, s.gpus) for s in plan.placement["policy"]] == [(0, (g,)) for g in range(8)]
    assert [(s.node, s.gpus) for s in plan.placement["reference"]] == [(1, (0,))]
    assert [(s.node, s.gpus) for s in plan.placement["rollout"]] == [(1, (g,)) for g in (1, 2, 3, 4)]
    policy = plan.memory["policy"]
    # bf16 ZeRO-3 on 8 ranks: 2Ψ/8 = 1,903,904,128 params and grads, 12Ψ/8 = 11,423,424,768 optimizer
    assert (policy.params, policy.grads, policy.optimizer, policy.host) == (
        1_903_904_128, 1_903_904_128, 11_423_424_768, 0,
    )  # fmt: skip
    # micro 2 × 1024 tokens, gated MLP, bf16: per layer 1024·2·(15·3584 + 2·3584 + 8·18944) = 2048·212,480
    # = 435,159,040, × 28 layers = 12,184,453,120; fp32 logits 4·1024·2·152,064 = 1,245,708,288
    assert policy.activations == 12_184_453_120 + 1_245_708_288
    assert plan.memory["reference"].params == 2 * PSI_7B  # frozen: bf16 weights only, 15,231,233,024
    rollout, kv = plan.memory["rollout"], plan.kv["rollout"]
    reserve = int(0.85 * 80 * GIB)  # rollout.gpu_memory_utilization 0.85 of 80 GiB = 73,014,444,032
    assert rollout.engine == reserve and kv.budget == reserve - 2 * PSI_7B == 57_783_211_008
    assert kv.max_tokens == 57_783_211_008 // KV_PER_TOKEN_7B == 1_007_659
    assert kv.needed_tokens == (128 // 4) * 8 * 1024  # 32 prompts per engine × 8 samples × 1024 tokens = 262,144
    busiest = max(load.total for load in plan.loads)
    assert busiest == reserve  # an engine's GPU; a policy GPU holds 16Ψ/8 + activations = 28,661,394,432 bytes
    # gradient checkpointing: each layer keeps its input 2sbh = 2·1024·2·3584 bytes, one layer is recomputed in full
    ckpt = build_plan(plan_config(*overrides, "model.gradient_checkpointing=true")).memory["policy"]
    assert ckpt.activations == 28 * 2 * 1024 * 2 * 3584 + 435_159_040 + 1_245_708_288
    assert "7,615,616,512 parameters" in format_plan(plan)


def test_the_critic_and_a_lora_policy_are_counted_as_built(qwen2_7b):
    overrides = ["cluster=multi_node", "cluster.nodes.count=3", "stage=ppo", f"model.path={qwen2_7b}"]
    plan = build_plan(plan_config(*overrides, "model.lora.rank=8", "model.lora.target_modules=[q_proj,v_proj]"))
    critic = next(r for r in plan.roles if r.name == "critic")
    assert critic.model.params == PSI_7B_CRITIC + 28 * 8 * (3584 + 3584 + 3584 + 512)  # + its adapters
    # LoRA rank 8 on q_proj (3584 → 3584) and v_proj (3584 → 512): 8·(in + out) each, per layer
    policy = plan.roles[0].model
    assert policy.trainable == 28 * 8 * ((3584 + 3584) + (3584 + 512)) == 2_523_136
    assert policy.params == PSI_7B + policy.trainable


@pytest.mark.parametrize(
    "overrides,roles",
    [
        (["stage=ppo", "reward.model_path={model}"], ["policy", "reference", "critic", "rollout", "reward"]),
        (["stage=sft"], ["policy"]),
        (["stage=dpo"], ["policy", "reference"]),
        (["stage=rm"], ["reward_model"]),
        (["stage=distill", "distill.teacher_path={model}"], ["policy", "teacher"]),
        (["stage=online_dpo"], ["policy", "reference", "rollout"]),
        (["stage=generate", "rollout.backend=hf"], ["rollout"]),
    ],
)
def test_each_stage_plans_the_roles_its_controller_starts(tiny_qwen2, overrides, roles):
    overrides = [o.format(model=tiny_qwen2) for o in overrides]
    plan = build_plan(plan_config(f"model.path={tiny_qwen2}", "cluster.nodes.host_memory_gib=16", *overrides))
    assert [r.name for r in plan.roles] == roles
    if "stage=dpo" in overrides:  # a preference pair is two rows: micro-batch 4 pairs = 8 rows of data.max_length
        assert (plan.roles[0].rows, plan.roles[0].seq_len) == (
            2 * plan_config("stage=dpo").policy.micro_batch_size,
            256,
        )
    if "stage=generate" in overrides:  # hf: weights + the KV cache of the sequences it decodes together
        cache = plan.kv["rollout"]
        assert cache.budget is None and cache.decoded_together == 64  # min(shard 64 × 8 samples, hf_batch_size 64)
        assert plan.memory["rollout"].engine == 4 * 459_904 + 64 * 80 * 1024
    assert format_plan(plan)


# ------------------------------------------------------------------------------ refusals


SEVEN_B = ["cluster=multi_node", "algorithm.kl_coef=0.01"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        pytest.param(
            ["stage=ppo", "cluster.nodes.count=3", "critic.zero_stage=2", "critic.num_workers=1"],
            # one ZeRO-2 rank holds all 16Ψ_critic = 113,129,963,536 bytes (105.4 GiB) of model states
            r"critic needs 107\.1 GiB per rank \(params 13\.2 GiB \+ grads 13\.2 GiB \+ optimizer 79\.0 GiB \+ "
            r"activations 1\.8 GiB\) > 80\.0 GiB of one GPU \(cluster\.nodes\.device_memory_gib\): "
            r"Raise critic\.num_workers, set critic\.zero_stage=3 or set critic\.offload_optimizer=true$",
            id="critic-states",
        ),
        pytest.param(
            ["policy.micro_batch_size=16", "data.max_prompt_length=2048", "rollout.sampling.max_new_tokens=2048"],
            r"policy needs .* activations .*: Lower policy\.micro_batch_size, set model\.gradient_checkpointing=true, "
            r"raise policy\.num_workers, set policy\.offload_optimizer=true or set policy\.offload_params=true",
            id="policy-activations",
        ),
        pytest.param(
            ["cluster.nodes.count=1"],
            r"cannot place reference: 1 rank × \{CPU 2, GPU 0\.5\} \(cluster\.placement_strategy=PACK\) .* "
            r"Raise cluster\.nodes\.count, lower reference\.num_workers or lower cluster\.reference\.num_cpus/num_gpus$",
            id="placement",
        ),
        pytest.param(
            ["cluster.nodes.gpus=4", "cluster.nodes.count=6", "cluster.placement_strategy=STRICT_PACK"],
            r"cannot place policy: 8 ranks .* or set cluster\.placement_strategy=PACK",
            id="strict-pack",
        ),
        pytest.param(
            ["rollout.gpu_memory_utilization=0.15"],  # 12.0 GiB < 14.2 GiB of bf16 weights
            r"rollout engine: its weights \(model\.path, 14\.2 GiB\) take all of its 12\.0 GiB per GPU .* "
            r"raise rollout\.gpu_memory_utilization or rollout\.tensor_parallel_size",
            id="engine-weights",
        ),
        pytest.param(
            # int(0.19 × 80 GiB) − 2Ψ = 16,320,875,724 − 15,231,233,024 = 1,089,642,700 B / 57,344 B < 32,768 tokens
            ["rollout.gpu_memory_utilization=0.19"],
            r"rollout engine caches 19,001 tokens .* < the model's 32,768 positions .* raise rollout\.gpu_memory_utilization",
            id="kv-cache",
        ),
        pytest.param(
            ["cluster.reference.num_gpus=0.5", "cluster.rollout.num_gpus=0.5"],  # 14.2 + 68.0 GiB on one GPU
            r"node 1 GPU 0 holds reference 0 14\.2 GiB, rollout 0 68\.0 GiB: 82\.2 GiB > 80\.0 GiB "
            r"\(cluster\.nodes\.device_memory_gib\): Give reference GPUs of its own \(cluster\.reference\.num_gpus=1\)"
            r".* lower rollout\.gpu_memory_utilization",
            id="shared-gpu",
        ),
        pytest.param(
            ["policy.offload_optimizer=true", "cluster.nodes.host_memory_gib=64"],  # 8 × 10.6 GiB of Adam states
            r"node 0 RAM holds policy 0 10\.6 GiB, .*: 85\.1 GiB > 64\.0 GiB \(cluster\.nodes\.host_memory_gib\): .*"
            r"set policy\.offload_optimizer=false",
            id="host-offload",
        ),
        pytest.param(
            [
                "model.dtype=float32",
                "cluster.nodes.device_memory_gib=24",
                "data.max_prompt_length=16",
                "rollout.sampling.max_new_tokens=16",
            ],  # fmt: skip
            r"reference needs 28\.4 GiB for its weights .* > 24\.0 GiB of one GPU .*: Set model\.dtype=bfloat16",
            id="frozen-weights",
        ),
    ],
)
def test_layouts_that_cannot_fit_are_refused_naming_the_field(qwen2_7b, overrides, message):
    cfg = plan_config(*SEVEN_B, f"model.path={qwen2_7b}", *overrides)
    with pytest.raises(ConfigError, match=message):
        build_plan(cfg)


def test_cuda_without_declared_gpus_is_refused(tiny_qwen2):
    cfg = plan_config(f"model.path={tiny_qwen2}", "cluster.device=cuda")  # cpu_debug declares no GPUs
    with pytest.raises(ConfigError, match=r"on cluster\.device=cuda: set cluster\.nodes\.gpus"):
        build_plan(cfg)


def test_the_tiny_engine_on_a_small_cpu_node_is_refused(tiny_qwen2):
    cfg = plan_config(f"model.path={tiny_qwen2}", "cluster.nodes.host_memory_gib=0.5")
    with pytest.raises(ConfigError, match=r"rollout engine needs 1\.0 GiB .* > 0\.5 GiB: lower rollout\.kv_cache_gib"):
        build_plan(cfg)


# ------------------------------------------------------------------------------ the command line


def test_cli_prints_the_plan_and_starts_no_ray(tiny_qwen2, tmp_path):
    """`rlhf run.plan=true ...` as the console script runs it, with Ray's temp dir pointed into tmp_path."""
    code = (
        "import sys\nfrom rlhf.cli import main\nsys.argv = ['rlhf', *sys.argv[1:]]\nmain()\n"
        "print('ray imported:', 'ray' in sys.modules)"
    )
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray"), "PYTHONUNBUFFERED": "1"}
    overrides = ["run.plan=true", f"model.path={tiny_qwen2}", f"run.output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Sizing plan for stage=grpo on cluster=cpu_debug" in proc.stdout
    assert "policy           2" in proc.stdout and "KV cache per rollout engine" in proc.stdout
    assert proc.stdout.rstrip().endswith("ray imported: False")  # so it cannot have started
    assert not (tmp_path / "ray").exists() and "Started a local Ray instance" not in proc.stderr
    assert not list(Path(tmp_path / "out").glob("metrics.jsonl"))


def test_a_zero3_reference_group_holds_its_share_of_the_weights_per_rank(qwen2_7b):
    """reference.zero_stage=3 over N actors partitions the frozen weights (rlhf.models.zero3): 2Ψ/N bytes per rank;
    the float32 reference that one 24 GiB GPU cannot hold is refused with that fix named."""
    overrides = [*SEVEN_B, f"model.path={qwen2_7b}", "reference.num_workers=4", "reference.zero_stage=3"]
    plan = build_plan(plan_config(*overrides))
    assert [(r.name, r.ranks) for r in plan.roles if r.name == "reference"] == [("reference", 4)]
    assert plan.memory["reference"].params == 2 * PSI_7B // 4  # 3,807,808,256 bytes of bf16 weights per rank
    whole = plan_config(*SEVEN_B, f"model.path={qwen2_7b}", "model.dtype=float32", "cluster.nodes.device_memory_gib=24")
    with pytest.raises(ConfigError, match=r"partition it: reference\.zero_stage=3 with reference\.num_workers=N"):
        build_plan(whole)
