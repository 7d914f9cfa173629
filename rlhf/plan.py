"""Sizing before launching: `rlhf ... run.plan=true` prints this plan and exits; nothing starts Ray.

The plan lists the worker groups the stage would start (role, ranks, resources per rank), places them
on the declared nodes (cluster.nodes) the way Ray's placement-group strategies do, and estimates each
rank's memory: model states under ZeRO (`zero_memory`), activations (`activation_bytes`) and the
engines' KV cache (`kv_cache`). Parameters are counted on the meta device from each model's
config.json; no weights are read. A layout that cannot fit raises ConfigError naming the fields to
change. Every figure is an estimate: docs/launch.md ("Sizing before launching") gives the formulas
and what they leave out.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from rlhf.config import (
    ClusterConfig,
    ModelConfig,
    RLHFConfig,
    TrainConfig,
    engine_resources,
    get_stage,
    uses_critic,
    uses_reference,
)
from rlhf.errors import ConfigError

GIB = 2**30
CUDA_DEVICE_MEMORY_GIB = 80.0
"""cluster.nodes.device_memory_gib when unset on cuda (an 80 GB A100/H100)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
QLORA_BYTES_PER_PARAM = 0.5
"""A 4-bit base weight (quantisation constants not counted)."""
_EPS = 1e-9


# ------------------------------------------------------------------------------ the models


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model: counts from a meta-device instance, sizes from config.json."""

    field: str
    """The config field that names it (model.path, critic_model_path, reward.model_path, ...)."""
    path: str
    model_type: str
    params: int
    """Parameters of the model as the role builds it (LM head, value head or score head; PEFT adapters)."""
    trainable: int
    """Of those, the ones that train (all without PEFT)."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    gated_mlp: bool
    """SwiGLU-style MLP (gate, up and down projections) rather than GPT's two matrices."""
    eager_attention: bool
    """attn_implementation eager: the attention scores are stored for backward (sdpa/flash recompute them)."""


def read_model_shape(field_name: str, path: str, model_cfg: ModelConfig, kind: str, peft: bool) -> ModelShape:
    """Count `path`'s parameters on the meta device (torch.device("meta"): shapes, no storage, no weights read).

    kind: causal_lm (LM head), value (AutoModel backbone + the critic's 1-output value head with bias) or
    reward (AutoModelForSequenceClassification, num_labels=1). peft: apply model.peft as the trained role does
    (rlhf.models.peft_utils.apply_peft), so `trainable` counts the adapters; qlora is counted as lora.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.models.loading import resolve_model_path
    from rlhf.models.peft_methods import peft_method
    from rlhf.models.peft_utils import apply_peft

    resolved = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{field_name}={path!r}: the plan cannot read its config.json ({str(e).splitlines()[0]}); "
            f"point {field_name} at a local checkpoint directory"
        ) from None
    text = config.get_text_config()
    head = {"causal_lm": 0, "value": text.hidden_size + 1, "reward": 0}[kind]
    with torch.device("meta"):
        if kind == "reward":
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        elif kind == "value":
            model = AutoModel.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
        eager = getattr(model.config, "_attn_implementation", None) == "eager"
        gated = any(name.endswith(("gate_proj", "gate_up_proj")) for name, _ in model.named_modules())
        method = peft_method(model_cfg)
        if peft and method != "none":
            counted = model_cfg
            if method == "qlora":
                counted = dataclasses.replace(model_cfg, peft=dataclasses.replace(model_cfg.peft, method="lora"))
            task = {"causal_lm": "CAUSAL_LM", "value": "FEATURE_EXTRACTION", "reward": "SEQ_CLS"}[kind]
            model = apply_peft(model, counted, task_type=task, head="score" if kind == "reward" else None)
    params = sum(p.numel() for p in model.parameters()) + head
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) + head
    heads = text.num_attention_heads
    return ModelShape(
        field=field_name,
        path=str(path),
        model_type=getattr(text, "model_type", "") or config.model_type,
        params=params,
        trainable=trainable,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None) or 0,
        gated_mlp=gated,
        eager_attention=eager,
    )


# ------------------------------------------------------------------------------ the arithmetic


@dataclass
class RankMemory:
    """Estimated bytes of one rank: on its accelerator (or, on cpu, in its node's RAM) and in host RAM."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    engine: int = 0
    """What a rollout engine holds on each of its devices (vLLM on cuda: gpu_memory_utilization × device)."""
    host: int = 0
    """Offloaded optimizer states and parameters (in host RAM whatever the device)."""

    @property
    def static(self) -> int:
        """Held for the whole run: parameters, gradients, optimizer states."""
        return self.params + self.grads + self.optimizer

    @property
    def device(self) -> int:
        return self.static + self.activations + self.engine


def zero_memory(
    params: int,
    trainable: int,
    dp: int,
    stage: int,
    *,
    mixed_precision: bool,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    frozen_bytes_per_param: Optional[float] = None,
) -> RankMemory:
    """Bytes of model states per data-parallel rank under ZeRO with Adam.

    Mixed precision (Rajbhandari et al. 2020, arXiv:1910.02054 §3.1 and §5, Figure 1): 2Ψ 16-bit
    parameters + 2Ψ 16-bit gradients + KΨ optimizer states, K = 12 (fp32 master parameters, momentum,
    variance: 4 + 4 + 4 bytes). fp32 training, by the same accounting: 4Ψ parameters (they are the
    master copy) + 4Ψ gradients + 8Ψ (momentum, variance). Stage 1 divides the optimizer states by
    dp (P_os), stage 2 the gradients too (P_os+g), stage 3 the parameters too (P_os+g+p): e.g. 7.5B
    parameters on 64 ranks take 120, 31.4, 16.6 and 1.9 GB at stages 0-3 (Figure 1). Offload moves the
    rank's optimizer states (and with offload_params its parameters) to host memory (ZeRO-Offload,
    arXiv:2101.06840). With PEFT only the `trainable` parameters have gradients and optimizer states;
    the frozen ones cost their dtype's bytes (`frozen_bytes_per_param`: 0.5 for a 4-bit QLoRA base).

    Args:
        params: Ψ, every parameter of the model. trainable: those that train. dp: data-parallel ranks.
        stage: ZeRO stage 0-3.
    """
    width = 2 if mixed_precision else 4
    optimizer_bytes = 12 if mixed_precision else 8
    frozen = (params - trainable) * (width if frozen_bytes_per_param is None else frozen_bytes_per_param)
    param_bytes = trainable * width + frozen
    grads = trainable * width
    optimizer = trainable * optimizer_bytes
    states = RankMemory(
        params=math.ceil(param_bytes / dp) if stage >= 3 else math.ceil(param_bytes),
        grads=math.ceil(grads / dp) if stage >= 2 else grads,
        optimizer=math.ceil(optimizer / dp) if stage >= 1 else optimizer,
    )
    if offload_optimizer:
        states.host, states.optimizer = states.host + states.optimizer, 0
    if offload_params:
        states.host, states.params = states.host + states.params, 0
    return states


def activation_bytes(
    shape: ModelShape, rows: int, seq_len: int, dtype_bytes: int, *, checkpointing: bool, logits: bool
) -> int:
    """Activations kept for backward by one micro-batch of `rows` sequences of `seq_len` tokens (an estimate).

    Korthikanti et al. 2022 (arXiv:2205.05198 §4.1, eq. 1), bytes per transformer layer with 16-bit
    activations, s tokens, b rows, h hidden, a heads: attention 11sbh + 5as²b, two norms 4sbh, MLP
    19sbh (GPT's 4h MLP): 34sbh + 5as²b. Here the MLP term follows the model: 2sbh + 4sbI for a plain
    MLP of width I (19sbh at I = 4h, dropout mask included), 2sbh + 8sbI for a gated one (gate and up
    outputs, the activation, their product). The 5as²b attention scores count only with eager
    attention: sdpa/flash kernels recompute them in backward (the paper's selective recomputation,
    §5). fp32 activations take twice the bytes. With gradient checkpointing (the paper's full
    recomputation, 2sbhL) each layer keeps only its input, and one layer at a time is recomputed in
    full. An LM head adds its fp32 logits, 4sbv (the output layer, in the paper's total-memory count).
    """
    s, b, h = seq_len, rows, shape.hidden
    mlp = 2 * h + (8 if shape.gated_mlp else 4) * shape.intermediate + (0 if shape.gated_mlp else h)
    per_layer = s * b * (15 * h + mlp)
    if shape.eager_attention:
        per_layer += 5 * shape.heads * s * s * b
    per_layer = per_layer * dtype_bytes // 2
    if checkpointing:
        total = shape.layers * s * b * h * dtype_bytes + per_layer
    else:
        total = shape.layers * per_layer
    return total + (4 * s * b * shape.vocab if logits else 0)


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Keys and values of one token in every layer: 2 × layers × kv_heads × head_dim × dtype bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


# ------------------------------------------------------------------------------ the roles


@dataclass
class Role:
    """One worker group the stage would start, in the order it starts them."""

    name: str
    kind: str
    """trained (DeepSpeed ranks), frozen (a whole model per actor) or engine (a rollout engine)."""
    ranks: int
    cpus: float
    gpus: float
    """Per rank: the placement-group bundle."""
    ranks_field: str
    """The config field that sets `ranks` (empty when fixed at 1)."""
    resources_field: str
    """The cluster.<role> resources it takes."""
    model: ModelShape
    train: Optional[TrainConfig] = None
    train_field: str = ""
    """trained: the TrainConfig's name (policy, critic)."""
    rows: int = 0
    """trained: sequences per forward/backward (micro batch × rows per example)."""
    seq_len: int = 0
    """trained: longest sequence; engine: longest prompt + response."""
    sequences: Optional[int] = None
    """engine: sequences one engine holds in one step's generate (None: not known before the run)."""
    logits: bool = False
    """trained: an LM head whose fp32 logits the loss keeps."""
    zero_stage: int = 0
    """frozen: 3 when the ranks form one ZeRO-3 group that partitions the weights (reference/reward.zero_stage)."""

    @property
    def weight_shards(self) -> int:
        """frozen: the parts its weights are split into, one per rank under ZeRO-3 (rlhf.models.zero3), else 1."""
        return self.ranks if self.zero_stage == 3 else 1


@dataclass(frozen=True)
class NodeShape:
    count: int
    cpus: float
    gpus: int
    device_memory: int
    host_memory: int
    device: str


@dataclass(frozen=True)
class Slot:
    node: int
    gpus: tuple[int, ...]


@dataclass
class KVCache:
    weights: int
    """Bytes of the engine's weights (all of its tensor-parallel shards)."""
    bytes_per_token: int
    budget: Optional[int]
    """Bytes an engine can cache (None: the hf backend grows its cache as it needs)."""
    max_model_len: int
    needed_tokens: Optional[int]
    """One step's sequences per engine × (prompt + response) tokens (None: not known before the run)."""
    decoded_together: Optional[int] = None
    """hf: the sequences it decodes at once (rollout.hf_batch_size at most), whose KV cache it holds."""

    @property
    def max_tokens(self) -> Optional[int]:
        return None if self.budget is None else max(self.budget, 0) // self.bytes_per_token


@dataclass
class Occupant:
    """One rank's share of a device: what it holds all run, its activations, an engine's reservation."""

    role: str
    rank: int
    static: int
    activations: int = 0
    engine: int = 0


@dataclass
class DeviceLoad:
    node: int
    gpu: Optional[int]
    """None: the node's RAM (on cpu all of every rank's memory; on cuda the offloaded states)."""
    capacity: int
    sleep: bool = False
    """The engines sleep while the trainers run (rollout.enable_sleep on cuda): engines and activations take turns."""
    occupants: list[Occupant] = field(default_factory=list)

    @property
    def total(self) -> int:
        static = sum(o.static for o in self.occupants)
        activations = sum(o.activations for o in self.occupants)
        engines = sum(o.engine for o in self.occupants)
        return static + (max(activations, engines) if self.sleep else activations + engines)

    @property
    def where(self) -> str:
        return f"node {self.node} " + ("RAM" if self.gpu is None else f"GPU {self.gpu}")


@dataclass
class Plan:
    stage: str
    cluster: str
    nodes: NodeShape
    roles: list[Role]
    placement: dict[str, list[Slot]]
    memory: dict[str, RankMemory]
    kv: dict[str, KVCache]
    loads: list[DeviceLoad]
    notes: list[str]


ShapeOf = Callable[[str, str, str, bool], ModelShape]


def node_shape(cluster: ClusterConfig) -> NodeShape:
    """cluster.nodes with its unset fields filled in (see NodesConfig)."""
    nodes = cluster.nodes
    if nodes.host_memory_gib is not None:
        host = int(nodes.host_memory_gib * GIB)
    else:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpus = (
        nodes.cpus if nodes.cpus is not None else cluster.num_cpus if cluster.num_cpus is not None else os.cpu_count()
    )
    gpus = nodes.gpus if nodes.gpus is not None else cluster.num_gpus
    if gpus is None and cluster.device == "cuda":
        raise ConfigError(
            "the plan needs the GPUs per node on cluster.device=cuda: set cluster.nodes.gpus (and "
            "cluster.nodes.count, cluster.nodes.cpus, cluster.nodes.device_memory_gib) to the cluster's nodes"
        )
    if nodes.device_memory_gib is not None:
        device_memory = int(nodes.device_memory_gib * GIB)
    else:
        device_memory = int(CUDA_DEVICE_MEMORY_GIB * GIB) if cluster.device == "cuda" else host
    return NodeShape(nodes.count, float(cpus or 1), int(gpus or 0), device_memory, host, cluster.device)


def plan_roles(cfg: RLHFConfig, shape_of: ShapeOf) -> list[Role]:
    """The worker groups `cfg.stage` starts, in the order its controller starts them (its Stage.plan_roles)."""
    stage = get_stage(cfg.stage)
    return stage.plan_roles(cfg, shape_of) if stage.plan_roles else []  # export, report: nothing on Ray


def generation_roles(cfg: RLHFConfig, shape_of: ShapeOf) -> list[Role]:
    """stage=generate / eval: the rollout engines (generate: one shard per call) and the reward roles."""
    sequences = None
    if cfg.stage == "generate":
        per_engine = math.ceil(cfg.generate.shard_size / cfg.rollout.num_engines)
        sequences = per_engine * cfg.rollout.n_samples_per_prompt
    return [_engines(cfg, shape_of, "rollout", cfg.model.path, sequences)] + _reward_roles(cfg, shape_of)


def _rl_seq_len(cfg: RLHFConfig) -> int:
    return cfg.data.max_prompt_length + cfg.rollout.sampling.max_new_tokens


def _step_sequences(cfg: RLHFConfig, engines: int) -> int:
    """Sequences one of `engines` engines generates per step: its share of the prompts × samples."""
    return math.ceil(cfg.run.rollout_batch_size / engines) * cfg.rollout.n_samples_per_prompt


def _trained(
    cfg: RLHFConfig, name: str, train_field: str, shape: ModelShape, rows: int, seq_len: int, logits: bool = True
) -> Role:
    train: TrainConfig = getattr(cfg, train_field)
    resources = getattr(cfg.cluster, train_field)
    return Role(
        name, "trained", train.num_workers, resources.num_cpus, resources.num_gpus, f"{train_field}.num_workers",
        f"cluster.{train_field}", shape, train=train, train_field=train_field, rows=rows, seq_len=seq_len,
        logits=logits,
    )  # fmt: skip


def _frozen(
    cfg: RLHFConfig, name: str, ranks: int, ranks_field: str, resources: str, shape: ModelShape, zero_stage: int = 0
) -> Role:
    res = getattr(cfg.cluster, resources)
    return Role(
        name, "frozen", ranks, res.num_cpus, res.num_gpus, ranks_field, f"cluster.{resources}", shape,
        zero_stage=zero_stage,
    )  # fmt: skip


def _engines(cfg: RLHFConfig, shape_of: ShapeOf, name: str, path: str, sequences: Optional[int]) -> Role:
    res = engine_resources(cfg.rollout, cfg.cluster)
    shape = shape_of("model.path", path, "causal_lm", False)
    return Role(
        name, "engine", cfg.rollout.num_engines, res.num_cpus, res.num_gpus, "rollout.num_engines",
        "cluster.rollout", shape, seq_len=_rl_seq_len(cfg), sequences=sequences,
    )  # fmt: skip


def _reward_roles(cfg: RLHFConfig, shape_of: ShapeOf) -> list[Role]:
    """The reward model's actors and the LLM judge's engines (rlhf.rewards.pipeline), when configured."""
    roles = []
    reward = cfg.reward
    if reward.model_path:
        shape = shape_of("reward.model_path", reward.model_path, "reward", False)
        roles.append(
            _frozen(cfg, "reward", reward.num_workers, "reward.num_workers", "reward", shape, reward.zero_stage)
        )
    if reward.judge.model_path:
        judge = reward.judge
        res = cfg.cluster.reward
        shape = shape_of("reward.judge.model_path", judge.model_path, "causal_lm", False)
        sequences = math.ceil(cfg.run.rollout_batch_size * cfg.rollout.n_samples_per_prompt / judge.num_engines)
        roles.append(
            Role(
                "judge",
                "engine",
                judge.num_engines,
                res.num_cpus,
                res.num_gpus,
                "reward.judge.num_engines",
                "cluster.reward",
                shape,
                seq_len=judge.max_prompt_tokens + judge.max_new_tokens,
                sequences=sequences,
            )  # fmt: skip
        )
    return roles


def rl_roles(cfg: RLHFConfig, shape_of: ShapeOf) -> list[Role]:
    """rlhf.trainers.rl.RLTrainer._start_roles: policy, reference, critic, rollout, then the reward roles."""
    path, seq = cfg.model.path, _rl_seq_len(cfg)
    roles = [
        _trained(
            cfg, "policy", "policy", shape_of("model.path", path, "causal_lm", True), cfg.policy.micro_batch_size, seq
        )
    ]
    if uses_reference(cfg):
        ref = cfg.reference
        shape = shape_of("model.path", path, "causal_lm", False)
        roles.append(
            _frozen(cfg, "reference", ref.num_workers, "reference.num_workers", "reference", shape, ref.zero_stage)
        )
    if uses_critic(cfg):
        critic_field = "critic_model_path" if cfg.critic_model_path else "model.path"
        shape = shape_of(critic_field, cfg.critic_model_path or path, "value", True)
        roles.append(_trained(cfg, "critic", "critic", shape, cfg.critic.micro_batch_size, seq, logits=False))
    roles.append(_engines(cfg, shape_of, "rollout", path, _step_sequences(cfg, cfg.rollout.num_engines)))
    return roles + _reward_roles(cfg, shape_of)


def online_dpo_roles(cfg: RLHFConfig, shape_of: ShapeOf) -> list[Role]:
    """rlhf.trainers.online_dpo: the policy trains on pairs; a reference when the objective needs the initial one."""
    from rlhf.workers.objectives import OBJECTIVES

    objective = OBJECTIVES.get(cfg.offline.objective)
    path, seq = cfg.model.path, _rl_seq_len(cfg)
    rows = cfg.policy.micro_batch_size * objective.rows_per_example
    roles = [_trained(cfg, "policy", "policy", shape_of("model.path", path, "causal_lm", True), rows, seq)]
    if objective.needs_reference and cfg.online_dpo.reference == "initial":
        ref_field = "offline.reference_path" if cfg.offline.reference_path else "model.path"
        shape = shape_of(ref_field, cfg.offline.reference_path or path, "causal_lm", False)
        roles.append(_frozen(cfg, "reference", 1, "", "reference", shape))
    roles.append(_engines(cfg, shape_of, "rollout", path, _step_sequences(cfg, cfg.rollout.num_engines)))
    return roles + _reward_roles(cfg, shape_of)


def offline_roles(cfg: RLHFConfig, shape_of: ShapeOf) -> list[Role]:
    """rlhf.trainers.offline: the trained model (a reward model for stage=rm) and the reference if the loss needs one."""
    from rlhf.workers.objectives import OBJECTIVES

    objective = OBJECTIVES.get(cfg.offline.objective)
    reward = objective.model_kind == "reward"
    name, kind = ("reward_model", "reward") if reward else ("policy", "causal_lm")
    rows = cfg.policy.micro_batch_size * objective.rows_per_example
    shape = shape_of("model.path", cfg.model.path, kind, True)
    roles = [_trained(cfg, name, "policy", shape, rows, cfg.data.max_length, logits=not reward)]
    if objective.needs_reference:
        ref_field = "offline.reference_path" if cfg.offline.reference_path else "model.path"
        ref = shape_of(ref_field, cfg.offline.reference_path or cfg.model.path, "causal_lm", False)
        roles.append(_frozen(cfg, "reference", 1, "", "reference", ref))
    return roles


def distill_roles(cfg: RLHFConfig, shape_of: ShapeOf) -> list[Role]:
    """rlhf.trainers.distill: the student, the teacher actors, and engines when it samples on-policy."""
    on_policy = cfg.distill.mode == "on_policy"
    seq = max(cfg.data.max_length, _rl_seq_len(cfg)) if on_policy else cfg.data.max_length
    student = shape_of("model.path", cfg.model.path, "causal_lm", True)
    teacher = shape_of("distill.teacher_path", cfg.distill.teacher_path, "causal_lm", False)
    roles = [
        _trained(cfg, "policy", "policy", student, cfg.policy.micro_batch_size, seq),
        _frozen(cfg, "teacher", cfg.distill.num_workers, "distill.num_workers", "teacher", teacher),
    ]
    if on_policy:
        roles.append(_engines(cfg, shape_of, "rollout", cfg.model.path, _step_sequences(cfg, cfg.rollout.num_engines)))
    return roles


# ------------------------------------------------------------------------------ memory per rank


def _frozen_width(mem: RankMemory, role: Role) -> float:
    """Bytes per weight of a frozen role's rank (its share of the parameters when partitioned)."""
    return mem.params / math.ceil(role.model.params / role.weight_shards)


def role_memory(role: Role, cfg: RLHFConfig, nodes: NodeShape) -> tuple[RankMemory, Optional[KVCache]]:
    """One rank's estimated memory, and an engine's KV cache."""
    from rlhf.models.peft_methods import peft_method

    width = DTYPE_BYTES[cfg.model.dtype]
    shape = role.model
    if role.kind == "frozen":  # ZeRO-3 inference: each rank holds its 1/N of the weights (rlhf.models.zero3)
        return RankMemory(params=math.ceil(shape.params / role.weight_shards) * width), None
    if role.kind == "trained":
        train = role.train
        assert train is not None
        memory = zero_memory(
            shape.params, shape.trainable, train.num_workers, train.zero_stage,
            mixed_precision=cfg.model.dtype == "bfloat16", offload_optimizer=train.offload_optimizer,
            offload_params=train.offload_params,
            frozen_bytes_per_param=QLORA_BYTES_PER_PARAM if peft_method(cfg.model) == "qlora" else None,
        )  # fmt: skip
        memory.activations = activation_bytes(
            shape, role.rows, role.seq_len, width, checkpointing=cfg.model.gradient_checkpointing, logits=role.logits
        )
        return memory, None
    return _engine_memory(role, cfg, nodes, width)


def _engine_memory(role: Role, cfg: RLHFConfig, nodes: NodeShape, width: int) -> tuple[RankMemory, KVCache]:
    """vLLM on cuda reserves gpu_memory_utilization of each of its GPUs and caches what the weights leave;
    vLLM on cpu caches rollout.kv_cache_gib (whole GiB); hf holds the KV of the sequences it decodes together."""
    shape, rollout = role.model, cfg.rollout
    weights = shape.params * width
    per_token = kv_bytes_per_token(shape, width)
    backend = (cfg.reward.judge.backend or rollout.backend) if role.name == "judge" else rollout.backend
    needed = None if role.sequences is None else role.sequences * role.seq_len
    if backend == "vllm" and nodes.device == "cuda":
        reserve = int(rollout.gpu_memory_utilization * nodes.device_memory)
        tensor_parallel = int(role.gpus) if role.gpus >= 1 else 1
        kv = KVCache(weights, per_token, reserve * tensor_parallel - weights, shape.max_positions, needed)
        return RankMemory(engine=reserve), kv
    if backend == "vllm":
        budget = max(1, math.ceil(rollout.kv_cache_gib)) * GIB  # VLLM_CPU_KVCACHE_SPACE is whole GiB
        return RankMemory(engine=weights + budget), KVCache(weights, per_token, budget, shape.max_positions, needed)
    together = min(role.sequences or rollout.hf_batch_size, rollout.hf_batch_size)
    kv = KVCache(weights, per_token, None, shape.max_positions, needed, decoded_together=together)
    return RankMemory(engine=weights + together * role.seq_len * per_token), kv


# ------------------------------------------------------------------------------ placement


@dataclass
class _FreeNode:
    cpus: float
    gpus: list[float]
    """Free fraction of each GPU."""


def _take(node: _FreeNode, cpus: float, gpus: float) -> Optional[tuple[int, ...]]:
    """Reserve one bundle on `node` (fractional GPUs first-fit on one GPU, whole ones on free GPUs); its GPUs, or None."""
    if node.cpus + _EPS < cpus:
        return None
    if gpus == 0:
        taken: tuple[int, ...] = ()
    elif gpus < 1:
        fitting = [i for i, free in enumerate(node.gpus) if free + _EPS >= gpus]
        if not fitting:
            return None
        taken = (fitting[0],)
    else:
        whole = [i for i, free in enumerate(node.gpus) if free >= 1 - _EPS]
        if len(whole) < math.ceil(gpus):
            return None
        taken = tuple(whole[: math.ceil(gpus)])
    node.cpus -= cpus
    for i in taken:
        node.gpus[i] -= min(gpus, 1.0)
    return taken


def place_group(free: list[_FreeNode], ranks: int, cpus: float, gpus: float, strategy: str) -> Optional[list[Slot]]:
    """Where Ray would put a placement group of `ranks` equal bundles; commits into `free`, or None if it cannot.

    PACK: every bundle on the first node that holds them all, else as few nodes as the bundles fill in
    order; STRICT_PACK: one node or nothing; SPREAD: each bundle on the node with the fewest of the group.
    (Ray's own scheduler also weighs node load; this follows its documented intent.)
    """
    for index in range(len(free)):  # PACK and STRICT_PACK: one node if any holds the whole group
        if strategy == "SPREAD":
            break
        trial = copy.deepcopy(free[index])
        taken = [_take(trial, cpus, gpus) for _ in range(ranks)]
        if all(t is not None for t in taken):
            free[index] = trial
            return [Slot(index, t) for t in taken if t is not None]
    if strategy == "STRICT_PACK":
        return None
    trial_nodes, slots, used = copy.deepcopy(free), [], []
    for _ in range(ranks):
        if strategy == "SPREAD":
            order = sorted(range(len(free)), key=lambda n: (sum(s.node == n for s in slots), n))
        else:
            order = used + [n for n in range(len(free)) if n not in used]
        slot = next((Slot(n, t) for n in order if (t := _take(trial_nodes[n], cpus, gpus)) is not None), None)
        if slot is None:
            return None
        slots.append(slot)
        used += [slot.node] if slot.node not in used else []
    free[:] = trial_nodes
    return slots


def place_roles(roles: list[Role], nodes: NodeShape, strategy: str) -> dict[str, list[Slot]]:
    """Every role's ranks on the declared nodes, in start order; ConfigError naming the fields when one does not fit."""
    free = [_FreeNode(nodes.cpus, [1.0] * nodes.gpus) for _ in range(nodes.count)]
    placement: dict[str, list[Slot]] = {}
    for role in roles:
        slots = place_group(free, role.ranks, role.cpus, role.gpus, strategy)
        if slots is None:
            raise ConfigError(_unplaceable(role, nodes, strategy, free, list(placement)))
        placement[role.name] = slots
    return placement


def _unplaceable(role: Role, nodes: NodeShape, strategy: str, free: list[_FreeNode], before: list[str]) -> str:
    left = "; ".join(
        f"node {i}: {n.cpus:g} CPUs, {sum(f >= 1 - _EPS for f in n.gpus)} whole GPUs" for i, n in enumerate(free)
    )
    fixes = ["raise cluster.nodes.count"]
    if role.ranks_field:
        fixes.append(f"lower {role.ranks_field}")
    fixes.append(f"lower {role.resources_field}.num_cpus/num_gpus")
    if strategy == "STRICT_PACK":
        fixes.append("set cluster.placement_strategy=PACK (a group may then span nodes)")
    return (
        f"cannot place {role.name}: {role.ranks} rank{'s' if role.ranks != 1 else ''} × "
        f"{{CPU {role.cpus:g}, GPU {role.gpus:g}}} "
        f"(cluster.placement_strategy={strategy}) on cluster.nodes: {nodes.count} × ({nodes.cpus:g} CPUs, "
        f"{nodes.gpus} GPUs); free after {', '.join(before) or 'no earlier role'}: {left}. "
        f"{_either(fixes)}"
    )


def _either(fixes: list[str]) -> str:
    fixes = list(dict.fromkeys(fixes))
    text = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + " or " + fixes[-1]
    return text[0].upper() + text[1:]


# ------------------------------------------------------------------------------ devices and checks


def device_loads(
    roles: list[Role], placement: dict[str, list[Slot]], memory: dict[str, RankMemory], nodes: NodeShape, sleep: bool
) -> list[DeviceLoad]:
    """What each GPU and each node's RAM holds; on cpu a rank's whole memory is its node's RAM."""
    on_gpu = nodes.device == "cuda"
    gpu_loads = {
        (n, g): DeviceLoad(n, g, nodes.device_memory, sleep) for n in range(nodes.count) for g in range(nodes.gpus)
    }
    ram = {n: DeviceLoad(n, None, nodes.host_memory) for n in range(nodes.count)}
    for role in roles:
        mem = memory[role.name]
        for rank, slot in enumerate(placement[role.name]):
            if on_gpu and slot.gpus:
                share = len(slot.gpus)
                for g in slot.gpus:
                    occupant = Occupant(role.name, rank, mem.static // share, mem.activations // share, mem.engine)
                    gpu_loads[(slot.node, g)].occupants.append(occupant)
                if mem.host:
                    ram[slot.node].occupants.append(Occupant(role.name, rank, mem.host))
            else:
                occupant = Occupant(role.name, rank, mem.static + mem.host, mem.activations, mem.engine)
                ram[slot.node].occupants.append(occupant)
    return [load for load in (*gpu_loads.values(), *ram.values()) if load.occupants]


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"  # messages: one decimal, as people compare them with a device's size


def check_roles(roles: list[Role], memory: dict[str, RankMemory], kv: dict[str, KVCache], nodes: NodeShape) -> None:
    """ConfigError when one rank alone cannot fit its device, or an engine's KV cache cannot hold one sequence."""
    for role in roles:
        mem = memory[role.name]
        alone = mem.device if nodes.device == "cuda" and role.gpus else mem.device + mem.host
        capacity = nodes.device_memory if nodes.device == "cuda" and role.gpus else nodes.host_memory
        where = "one GPU (cluster.nodes.device_memory_gib)" if capacity == nodes.device_memory else "one node's RAM"
        if role.kind == "trained" and alone > capacity:
            raise ConfigError(
                f"{role.name} needs {_gib(alone)} per rank ({_breakdown(mem)}) > {_gib(capacity)} of {where}: "
                f"{_either(_trained_fixes(role, mem, nodes))}"
            )
        if role.kind == "frozen" and alone > capacity:
            fixes = ["set model.dtype=bfloat16"] if _frozen_width(mem, role) == 4 else []  # float32 weights
            if role.ranks_field and role.name in ("reference", "reward") and role.zero_stage != 3:
                fixes.append(f"partition it: {role.name}.zero_stage=3 with {role.ranks_field}=N")
            raise ConfigError(
                f"{role.name} needs {_gib(alone)} for its weights ({role.model.field}, "
                f"{role.model.params:,} parameters) > {_gib(capacity)} of {where}: "
                f"{_either(fixes + [f'give {role.name} a larger device ({role.resources_field})'])}"
            )
        if role.name in kv:
            _check_engine(role, mem, kv[role.name], capacity, nodes)


def _check_engine(role: Role, mem: RankMemory, kv: KVCache, capacity: int, nodes: NodeShape) -> None:
    if mem.engine > capacity:  # vLLM on cpu (weights + kv_cache_gib) or hf (weights + the KV of its batch)
        fix = "lower rollout.hf_batch_size" if kv.budget is None else "lower rollout.kv_cache_gib"
        raise ConfigError(
            f"{role.name} engine needs {_gib(mem.engine)} (weights {_gib(kv.weights)} + KV cache "
            f"{_gib(mem.engine - kv.weights)}) > {_gib(capacity)}: {fix}"
        )
    if kv.budget is None:
        return
    budget_field = "rollout.kv_cache_gib"
    if nodes.device == "cuda":
        budget_field = "rollout.gpu_memory_utilization or rollout.tensor_parallel_size"
    if kv.budget <= 0:
        raise ConfigError(
            f"{role.name} engine: its weights ({role.model.field}, {_gib(kv.weights)}) take all of its "
            f"{_gib(mem.engine)} per GPU and leave no KV cache: raise {budget_field}"
        )
    if kv.max_tokens is not None and kv.max_model_len and kv.max_tokens < kv.max_model_len:
        raise ConfigError(
            f"{role.name} engine caches {kv.max_tokens:,} tokens ({_gib(kv.budget)} / {kv.bytes_per_token:,} bytes "
            f"per token) < the model's {kv.max_model_len:,} positions (vLLM's max_model_len; it refuses to "
            f"start): raise {budget_field}"
        )


def _trained_fixes(role: Role, mem: RankMemory, nodes: NodeShape) -> list[str]:
    train, name = role.train, role.train_field
    assert train is not None
    fixes = []
    if train.zero_stage >= 1:
        fixes.append(f"raise {name}.num_workers")
    if train.zero_stage < 3:
        fixes.append(f"set {name}.zero_stage=3")
    if not train.offload_optimizer and nodes.device == "cuda":
        fixes.append(f"set {name}.offload_optimizer=true")
    if train.zero_stage == 3 and not train.offload_params and nodes.device == "cuda":
        fixes.append(f"set {name}.offload_params=true")
    activation_fixes = [f"lower {name}.micro_batch_size", "set model.gradient_checkpointing=true"]
    if mem.activations * 2 >= mem.device:  # activations dominate: their fixes first
        return activation_fixes + fixes
    return fixes + (activation_fixes if mem.activations * 4 >= mem.device else [])


def _breakdown(mem: RankMemory) -> str:
    parts = [("params", mem.params), ("grads", mem.grads), ("optimizer", mem.optimizer)]
    parts += [("activations", mem.activations), ("host", mem.host)]
    return " + ".join(f"{name} {_gib(value)}" for name, value in parts if value)


def check_loads(loads: list[DeviceLoad], roles: list[Role]) -> None:
    """ConfigError for a GPU whose sharers together exceed it, or a node whose RAM cannot hold its ranks' share."""
    by_name = {role.name: role for role in roles}
    for load in loads:
        if load.total <= load.capacity:
            continue
        held = ", ".join(f"{o.role} {o.rank} {_gib(o.static + o.activations + o.engine)}" for o in load.occupants)
        names = list(dict.fromkeys(o.role for o in load.occupants))
        if load.gpu is not None:
            fixes = [f"give {n} GPUs of its own ({by_name[n].resources_field}.num_gpus=1)" for n in names]
            kinds = {by_name[n].kind for n in names}
            if "engine" in kinds:
                fixes.append("lower rollout.gpu_memory_utilization")
            if {"engine", "trained"} <= kinds and not load.sleep:  # engines then free the GPU while ranks train
                fixes.append("set rollout.enable_sleep=true")
            capacity = "cluster.nodes.device_memory_gib"
        else:
            fixes = ["raise cluster.nodes.count with cluster.placement_strategy=SPREAD"]
            fixes += [f"set {by_name[n].train_field}.offload_optimizer=false" for n in names if _offloads(by_name[n])]
            fixes.append("declare the nodes' real RAM in cluster.nodes.host_memory_gib")
            capacity = "cluster.nodes.host_memory_gib"
        raise ConfigError(
            f"{load.where} holds {held}: {_gib(load.total)} > {_gib(load.capacity)} ({capacity}): {_either(fixes)}"
        )


def _offloads(role: Role) -> bool:
    return role.train is not None and (role.train.offload_optimizer or role.train.offload_params)


# ------------------------------------------------------------------------------ the plan


def build_plan(cfg: RLHFConfig) -> Plan:
    """The sizing plan of a validated config; ConfigError when the layout cannot be placed or cannot fit."""
    nodes = node_shape(cfg.cluster)
    shapes: dict[tuple[str, str, bool], ModelShape] = {}

    def shape_of(field_name: str, path: str, kind: str, peft: bool) -> ModelShape:
        key = (path, kind, peft)
        if key not in shapes:
            shapes[key] = read_model_shape(field_name, path, cfg.model, kind, peft)
        return shapes[key]

    roles = plan_roles(cfg, shape_of)
    placement = place_roles(roles, nodes, cfg.cluster.placement_strategy)
    memory, kv = {}, {}
    for role in roles:
        memory[role.name], cache = role_memory(role, cfg, nodes)
        if cache is not None:
            kv[role.name] = cache
    sleep = cfg.rollout.enable_sleep and nodes.device == "cuda"
    loads = device_loads(roles, placement, memory, nodes, sleep)
    check_roles(roles, memory, kv, nodes)
    check_loads(loads, roles)
    return Plan(cfg.stage, cfg.cluster.name, nodes, roles, placement, memory, kv, loads, _notes(roles, kv))


def _notes(roles: list[Role], kv: dict[str, KVCache]) -> list[str]:
    notes = []
    for role in roles:
        cache = kv.get(role.name)
        if cache and cache.max_tokens and cache.needed_tokens and cache.needed_tokens > cache.max_tokens:
            waves = math.ceil(cache.needed_tokens / cache.max_tokens)
            notes.append(
                f"{role.name}: one step needs {cache.needed_tokens:,} cached tokens per engine > {cache.max_tokens:,}: "
                f"the engine runs its sequences in about {waves} waves (slower, not an error)"
            )
    return notes


# ------------------------------------------------------------------------------ printing


def format_plan(plan: Plan) -> str:
    """The plan as text: nodes, models, roles and placement, memory per rank, KV caches, devices."""
    nodes = plan.nodes
    gpus = f"{nodes.gpus} GPUs × {_size(nodes.device_memory)}" if nodes.gpus else "no GPUs"
    lines = [
        f"Sizing plan for stage={plan.stage} on cluster={plan.cluster}: estimates, nothing was started",
        f"nodes (cluster.nodes): {nodes.count} × ({nodes.cpus:g} CPUs, {gpus}, {_size(nodes.host_memory)} RAM), "
        f"device {nodes.device}",
    ]
    if not plan.roles:
        return "\n".join([*lines, f"stage={plan.stage} starts no worker groups", ""])
    lines.append("models:")
    for shape in dict.fromkeys(dataclasses.replace(r.model, trainable=r.model.params) for r in plan.roles):
        lines.append(
            f"  {shape.field}={shape.path} ({shape.model_type}): {shape.params:,} parameters, {shape.layers} layers, "
            f"hidden {shape.hidden}, {shape.heads} heads ({shape.kv_heads} KV × {shape.head_dim}), "
            f"MLP {shape.intermediate}{' gated' if shape.gated_mlp else ''}, vocab {shape.vocab}"
        )
    lines += ["", f"{'role':<13}{'ranks':>5}  {'per rank':<18}placement"]
    for role in plan.roles:
        bundle = f"CPU {role.cpus:g}, GPU {role.gpus:g}"
        lines.append(f"{role.name:<13}{role.ranks:>5}  {bundle:<18}{_placement_text(plan.placement[role.name])}")
    lines += ["", *_memory_lines(plan), *_kv_lines(plan), "", "devices (all sharers at their peak):"]
    for load in plan.loads:
        held = ", ".join(f"{o.role} {o.rank}" for o in load.occupants[:6])
        more = f" and {len(load.occupants) - 6} more" if len(load.occupants) > 6 else ""
        lines.append(f"  {load.where}: {_size(load.total)} of {_size(load.capacity)} ({held}{more})")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join([*lines, ""])


def _placement_text(slots: list[Slot]) -> str:
    by_node: dict[int, list[tuple[int, Slot]]] = {}
    for rank, slot in enumerate(slots):
        by_node.setdefault(slot.node, []).append((rank, slot))
    parts = []
    for node, ranked in by_node.items():
        ranks = _span([r for r, _ in ranked])
        gpus = sorted({g for _, s in ranked for g in s.gpus})
        word = "rank" if len(ranked) == 1 else "ranks"
        parts.append(f"node {node}: {word} {ranks}" + (f" (GPU {_span(gpus)})" if gpus else ""))
    return "; ".join(parts)


def _span(numbers: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2, 5"."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def _memory_lines(plan: Plan) -> list[str]:
    lines = [
        "memory per rank (model states: ZeRO, arXiv:1910.02054 §5; activations: arXiv:2205.05198 §4, an estimate):",
        f"  {'role':<13}{'ZeRO':>4}  {'offload':<13}{'trainable':>15}"
        + "".join(f"{h:>12}" for h in ("params", "grads", "optimizer", "activations", "device", "host"))
        + "  micro-batch",
    ]
    for role in plan.roles:
        mem, train = plan.memory[role.name], role.train
        zero, offload, trainable = "-", "-", "frozen" if role.kind == "frozen" else "-"
        if role.kind == "frozen" and role.zero_stage:
            zero = str(role.zero_stage)
        if train is not None:
            zero, trainable = str(train.zero_stage), f"{role.model.trainable:,}"
            offloaded = [
                n for n, on in (("optimizer", train.offload_optimizer), ("params", train.offload_params)) if on
            ]
            offload = "+".join(offloaded) or "-"
        batch = f"{role.rows} × {role.seq_len} tokens" if role.kind == "trained" else role.kind
        values = [mem.params, mem.grads, mem.optimizer, mem.activations, mem.device, mem.host]
        cells = "".join(f"{_size(v) if v else '-':>12}" for v in values)
        lines.append(f"  {role.name:<13}{zero:>4}  {offload:<13}{trainable:>15}{cells}  {batch}")
    return lines


def _size(n: float) -> str:
    """Bytes in GiB, or MiB/KiB when smaller than 1 GiB/MiB (tiny models)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _kv_lines(plan: Plan) -> list[str]:
    lines = []
    for role in plan.roles:
        cache = plan.kv.get(role.name)
        if cache is None:
            continue
        per_token = f"{cache.bytes_per_token:,} B per token (2 × layers × KV heads × head dim × dtype bytes)"
        needed = "n/a" if cache.needed_tokens is None else f"{cache.needed_tokens:,}"
        if cache.budget is None:
            budget = f"hf: holds the {cache.decoded_together} sequences it decodes together (rollout.hf_batch_size)"
        else:
            budget = f"{_size(cache.budget)} after weights {_size(cache.weights)} → {cache.max_tokens:,} tokens"
        lines.append(
            f"KV cache per {role.name} engine: {per_token}; {budget}; one step needs {needed} tokens "
            f"({role.sequences or 'n/a'} sequences × {role.seq_len}); max_model_len {cache.max_model_len:,}"
        )
    return lines
