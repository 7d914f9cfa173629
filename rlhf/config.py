"""Typed configuration: dataclasses registered in Hydra's ConfigStore, validated once at start-up.

YAML under conf/ only selects and overrides; every default is defined here, once.
Batch sizes have one meaning each:
  rollout_batch_size    prompts per RL step
  n_samples_per_prompt  responses sampled per prompt (the GRPO group size)
  train_batch_size      sequences per optimizer step (a "minibatch" of the PPO update)
  micro_batch_size      sequences per forward/backward on one data-parallel rank
Derived: sequences per step = rollout_batch_size × n_samples_per_prompt; optimizer steps per
PPO epoch = that / train_batch_size; gradient accumulation = train_batch_size / (micro × dp).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from rlhf.errors import ConfigError


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0 disables LoRA (full fine-tuning)."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that receive adapters."""


@dataclass
class ModelConfig:
    path: str = "tiny"
    """Local checkpoint dir, Hugging Face Hub name, or "tiny" for the tiny world's warmed-up policy."""
    dtype: str = "float32"
    """Parameter dtype of trainer and rollout: float32 or bfloat16."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint; off unless you trust its source."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the policy (merged into the base weights for rollout)."""


@dataclass
class DataConfig:
    train: str = "tiny"
    """RL prompts: a json/jsonl/parquet/csv file or dir, a Hub dataset name, or "tiny"."""
    eval: Optional[str] = "tiny:eval"
    """Held-out prompts for evaluation (None disables evaluation)."""
    prompt_key: str = "prompt"
    """Column holding the prompt (text or chat messages)."""
    answer_key: str = "answer"
    """Column holding the reference answer passed to rule rewards."""
    max_prompt_length: int = 64
    """Prompts longer than this many tokens are rejected at start-up."""
    use_chat_template: bool = True
    """Render prompts with the tokenizer's chat template."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded)."""


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """Advantage estimator (registry rlhf.algorithms ADVANTAGE_ESTIMATORS)."""
    policy_loss: str = "ppo"
    """Policy loss (registry POLICY_LOSSES): ppo or gspo."""
    loss_agg: str = "token_mean"
    """Loss aggregation mode (registry LOSS_AGGREGATIONS)."""
    clip_low: float = 0.2
    """Lower PPO clip range: ratio >= 1 - clip_low."""
    clip_high: float = 0.2
    """Upper PPO clip range: ratio <= 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 bounding the loss for negative advantages (None: off)."""
    rollout_is_cap: Optional[float] = None
    """Truncated importance-sampling cap for rollout/trainer logprob mismatch (None: off)."""
    gamma: float = 1.0
    """Discount factor (GAE, REINFORCE++)."""
    lam: float = 0.95
    """GAE lambda."""
    norm_adv_by_std: bool = True
    """Divide group-relative advantages by the group std (False = Dr.GRPO)."""
    kl_coef: float = 0.0
    """KL coefficient against the reference model (0 disables the reference model)."""
    kl_estimator: str = "k3"
    """KL estimator (k1, k2, k3)."""
    use_kl_loss: bool = True
    """True: KL as a loss term (GRPO); False: KL folded into the token rewards (PPO)."""
    kl_target: Optional[float] = None
    """Target KL for the adaptive controller (None: fixed coefficient)."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    value_clip: float = 0.2
    """Critic value clipping range."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k (-1: off)."""
    max_new_tokens: int = 16
    """Maximum response tokens."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (EOS always stops)."""


@dataclass
class RolloutConfig:
    backend: str = "vllm"
    """Rollout engine: vllm or hf."""
    num_engines: int = 1
    """Independent engines behind the load balancer."""
    n_samples_per_prompt: int = 8
    """Responses per prompt (the GRPO group size)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling used for training rollouts."""
    eval_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    """Sampling used for evaluation (greedy by default)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism per engine (GPU only)."""
    gpu_memory_utilization: float = 0.4
    """vLLM's GPU memory fraction."""
    kv_cache_gib: float = 1.0
    """vLLM CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = True
    """Disable CUDA graphs (start-up speed; required on CPU)."""
    enable_sleep: bool = False
    """Free vLLM memory between rollouts (colocated single-GPU mode)."""
    weight_sync_bucket_mb: int = 64
    """Bucket size for streaming weights to the engines."""
    hf_batch_size: int = 64
    """Sequences decoded together by the hf backend (prompts × samples are chunked to this)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    warmup_steps: int = 0
    """Linear warm-up optimizer steps."""
    scheduler: str = "constant"
    """LR schedule after warm-up: constant or cosine."""


@dataclass
class TrainConfig:
    """One DeepSpeed-trained role (policy or critic)."""

    num_workers: int = 2
    """Data-parallel ranks (Ray actors)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU."""
    offload_params: bool = False
    """ZeRO-3 parameter offload to CPU."""
    zero3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank (0 partitions everything)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward per rank."""
    train_batch_size: int = 32
    """Sequences per optimizer step, across all ranks."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""


@dataclass
class RewardConfig:
    fn: Optional[str] = "tiny_world"
    """Rule reward: a registered name or "pkg.module:function" (None: no rule reward)."""
    model_path: Optional[str] = None
    """Reward model checkpoint (sequence classification) hosted on RewardWorkers."""
    num_workers: int = 1
    """Reward model actors (when model_path is set)."""


@dataclass
class ResourceConfig:
    num_cpus: float = 1.0
    """CPUs per actor of this role."""
    num_gpus: float = 0.0
    """GPUs per actor of this role (fractions let roles share a GPU)."""


@dataclass
class ClusterConfig:
    name: str = "cpu_debug"
    """Preset name (cpu_debug, single_gpu, multi_node)."""
    address: Optional[str] = None
    """Ray address to join ("auto" for a running cluster); None starts a local one."""
    num_cpus: Optional[int] = None
    """CPUs for a locally started Ray (None: all)."""
    num_gpus: Optional[int] = None
    """GPUs for a locally started Ray (None: all)."""
    device: str = "cpu"
    """cpu (gloo, DS_ACCELERATOR=cpu) or cuda (NCCL)."""
    placement_strategy: str = "PACK"
    """Placement group strategy per role: PACK, STRICT_PACK or SPREAD."""
    policy: ResourceConfig = field(default_factory=ResourceConfig)
    """Resources per policy rank."""
    critic: ResourceConfig = field(default_factory=ResourceConfig)
    """Resources per critic rank."""
    reference: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=0.5))
    """Resources per reference actor."""
    reward: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=0.5))
    """Resources per reward model actor."""
    rollout: ResourceConfig = field(default_factory=ResourceConfig)
    """Resources per rollout engine."""
    threads_per_worker: int = 1
    """OMP/torch threads per actor (avoid oversubscription on CPU)."""
    collective_timeout_s: int = 600
    """Timeout of collectives and weight sync; nothing waits forever."""
    weight_sync_backend: str = "auto"
    """gloo, nccl, or auto: nccl when trainer and engines each own whole GPUs, else gloo (NCCL refuses
    two ranks on one shared GPU, as in single_gpu mode)."""


@dataclass
class RunConfig:
    total_steps: int = 20
    """RL steps (each: generate, score, update, sync)."""
    rollout_batch_size: int = 16
    """Prompts per RL step."""
    eval_every: int = 10
    """Evaluate on held-out prompts every N steps (0: only at the end)."""
    eval_size: int = 64
    """Held-out prompts used per evaluation."""
    save_every: int = 0
    """Checkpoint every N steps (0: only the final model)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), none, or a checkpoint path."""
    output_dir: str = "outputs/run"
    """Where checkpoints, metrics and the final model go."""
    seed: int = 0
    """Global seed."""
    deterministic: bool = False
    """Deterministic algorithms and seeded sampling (for exact resume)."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl."""
    progress_bar: bool = True
    """Show a progress bar on the driver."""


@dataclass
class RLHFConfig:
    stage: str = "grpo"
    """What to run; conf/stage/<name>.yaml sets the algorithm's defaults (grpo, ppo, ...)."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    critic_model_path: Optional[str] = None
    """Critic initial weights (None: the policy checkpoint with a fresh value head)."""
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: TrainConfig = field(default_factory=TrainConfig)
    critic: TrainConfig = field(default_factory=lambda: TrainConfig(optim=OptimConfig(lr=5e-5)))
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form settings for plugins (never read by the core)."""


RL_STAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo")
OFFLINE_STAGES: tuple[str, ...] = ()
"""Stages driven by the offline controller (rlhf/trainers/offline.py); filled in as they land."""
UTILITY_STAGES: tuple[str, ...] = ()
"""Stages that train nothing (export, report, ...)."""
ZERO_STAGES = (0, 1, 2, 3)
DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda")
ROLLOUT_BACKENDS = ("vllm", "hf")
PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(value: Any, allowed: tuple, field_name: str) -> None:
    _require(value in allowed, f"{field_name}={value!r} is not one of {', '.join(map(str, allowed))}")


def _check_train(cfg: TrainConfig, role: str, sequences_per_step: int) -> None:
    _choice(cfg.zero_stage, ZERO_STAGES, f"{role}.zero_stage")
    _require(cfg.num_workers >= 1, f"{role}.num_workers must be >= 1 (got {cfg.num_workers})")
    _require(cfg.micro_batch_size >= 1, f"{role}.micro_batch_size must be >= 1 (got {cfg.micro_batch_size})")
    _require(cfg.optim.lr > 0, f"{role}.optim.lr must be > 0 (got {cfg.optim.lr})")
    _require(cfg.offload_params is False or cfg.zero_stage == 3, f"{role}.offload_params needs {role}.zero_stage=3")
    per_pass = cfg.micro_batch_size * cfg.num_workers
    _require(
        cfg.train_batch_size % per_pass == 0,
        f"{role}.train_batch_size {cfg.train_batch_size} is not divisible by {role}.micro_batch_size "
        f"{cfg.micro_batch_size} × {role}.num_workers {cfg.num_workers} = {per_pass}; "
        f"pick a multiple of {per_pass}",
    )
    _require(
        sequences_per_step % cfg.train_batch_size == 0,
        f"sequences per step run.rollout_batch_size × rollout.n_samples_per_prompt = {sequences_per_step} "
        f"is not divisible by {role}.train_batch_size {cfg.train_batch_size}",
    )


def validate(cfg: RLHFConfig) -> None:
    """Check every field once, before any cluster work; raise ConfigError saying what to change."""
    _choice(cfg.stage, RL_STAGES + OFFLINE_STAGES + UTILITY_STAGES, "stage")
    if cfg.stage in RL_STAGES:
        validate_rl(cfg)


def validate_rl(cfg: RLHFConfig) -> None:
    """The RL stages' fields (rollout, algorithm, reward, batch arithmetic of policy and critic)."""
    from rlhf.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES

    run, algo, rollout = cfg.run, cfg.algorithm, cfg.rollout
    _require(run.total_steps >= 1, f"run.total_steps must be >= 1 (got {run.total_steps})")
    _require(run.rollout_batch_size >= 1, f"run.rollout_batch_size must be >= 1 (got {run.rollout_batch_size})")
    _require(run.keep_last >= 1, f"run.keep_last must be >= 1 (got {run.keep_last})")
    _require(run.eval_every >= 0 and run.save_every >= 0, "run.eval_every and run.save_every must be >= 0")
    _require(
        run.resume in ("auto", "none") or bool(run.resume),
        "run.resume must be auto, none, or a checkpoint directory",
    )
    ADVANTAGE_ESTIMATORS.check(algo.advantage, "algorithm.advantage")
    POLICY_LOSSES.check(algo.policy_loss, "algorithm.policy_loss")
    LOSS_AGGREGATIONS.check(algo.loss_agg, "algorithm.loss_agg")
    KL_ESTIMATORS.check(algo.kl_estimator, "algorithm.kl_estimator")
    _require(0 <= algo.clip_low < 1, f"algorithm.clip_low must be in [0, 1) (got {algo.clip_low})")
    _require(algo.clip_high >= 0, f"algorithm.clip_high must be >= 0 (got {algo.clip_high})")
    _require(algo.dual_clip is None or algo.dual_clip > 1, f"algorithm.dual_clip must be > 1 (got {algo.dual_clip})")
    _require(algo.kl_coef >= 0, f"algorithm.kl_coef must be >= 0 (got {algo.kl_coef})")
    _require(algo.ppo_epochs >= 1, f"algorithm.ppo_epochs must be >= 1 (got {algo.ppo_epochs})")
    _require(0 < algo.gamma <= 1 and 0 <= algo.lam <= 1, "algorithm.gamma must be in (0, 1] and lam in [0, 1]")
    group_based = algo.advantage in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
    _require(
        not group_based or rollout.n_samples_per_prompt >= 2,
        f"algorithm.advantage={algo.advantage} compares samples of one prompt: "
        f"set rollout.n_samples_per_prompt >= 2 (got {rollout.n_samples_per_prompt})",
    )
    _choice(rollout.backend, ROLLOUT_BACKENDS, "rollout.backend")
    _require(rollout.num_engines >= 1, f"rollout.num_engines must be >= 1 (got {rollout.num_engines})")
    _require(rollout.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt must be >= 1")
    _require(rollout.sampling.max_new_tokens >= 1, "rollout.sampling.max_new_tokens must be >= 1")
    _require(
        0 < rollout.sampling.top_p <= 1, f"rollout.sampling.top_p must be in (0, 1] (got {rollout.sampling.top_p})"
    )
    _require(rollout.sampling.temperature > 0, "rollout.sampling.temperature must be > 0 for training rollouts")
    _choice(cfg.model.dtype, DTYPES, "model.dtype")
    _require(cfg.model.lora.rank >= 0, f"model.lora.rank must be >= 0 (got {cfg.model.lora.rank})")
    _choice(cfg.cluster.device, DEVICES, "cluster.device")
    _choice(cfg.cluster.placement_strategy, PLACEMENT_STRATEGIES, "cluster.placement_strategy")
    _choice(cfg.cluster.weight_sync_backend, ("auto", "gloo", "nccl"), "cluster.weight_sync_backend")
    sequences = run.rollout_batch_size * rollout.n_samples_per_prompt
    _check_train(cfg.policy, "policy", sequences)
    if uses_critic(cfg):
        _check_train(cfg.critic, "critic", sequences)
    _require(cfg.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
    _require(
        cfg.reward.fn is not None or cfg.reward.model_path is not None,
        "no reward: set reward.fn (a rule reward) and/or reward.model_path (a reward model)",
    )


def weight_sync_backend(cluster: ClusterConfig) -> str:
    """The transport between the policy's rank 0 and the rollout engines."""
    if cluster.weight_sync_backend != "auto":
        return cluster.weight_sync_backend
    whole_gpus = cluster.policy.num_gpus >= 1 and cluster.rollout.num_gpus >= 1
    return "nccl" if cluster.device == "cuda" and whole_gpus else "gloo"


def uses_critic(cfg: RLHFConfig) -> bool:
    """PPO-style estimators need a value model; the GRPO family does not."""
    return cfg.algorithm.advantage == "gae"


def uses_reference(cfg: RLHFConfig) -> bool:
    """The reference model is only needed when a KL term is on."""
    return cfg.algorithm.kl_coef > 0


def register_configs() -> None:
    """Register the root schema so conf/config.yaml is checked against the dataclasses."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlhf_schema", node=RLHFConfig)


__all__ = [name for name in dir() if name.endswith("Config")] + ["ConfigError", "register_configs"]
