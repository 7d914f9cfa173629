"""Typed configuration: dataclasses registered in Hydra's ConfigStore, validated once at start-up.

YAML under conf/ only selects and overrides; every default is defined here, once.
Batch sizes have one meaning each:
  rollout_batch_size    prompts per RL step
  n_samples_per_prompt  responses sampled per prompt (the GRPO group size)
  train_batch_size      sequences per optimizer step (a "minibatch" of the PPO update)
  micro_batch_size      sequences per forward/backward on one data-parallel rank
  max_tokens_per_micro_batch  RL roles: instead, packed micro-batches of at most this many real
                        tokens (their number per step varies; see rlhf.data.token_budget)
Derived: sequences per step = rollout_batch_size × n_samples_per_prompt; optimizer steps per
PPO epoch = that / train_batch_size; gradient accumulation = train_batch_size / (micro × dp).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
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
class PeftConfig:
    """Which parameters of the trained model (policy, stage=rm's reward model, PPO's critic) train
    (rlhf.models.peft_utils.apply_peft); a reward model's or critic's scalar head always trains."""

    method: str = "none"
    """none (full fine-tuning; LoRA when model.lora.rank > 0), lora, qlora (4-bit base, CUDA +
    bitsandbytes), prompt_tuning, prefix_tuning, p_tuning, ia3, loha, lokr, bitfit (biases only) or
    freeze (the patterns below). lora/qlora/loha/lokr read rank/alpha/dropout/targets from model.lora."""
    num_virtual_tokens: int = 8
    """prompt_tuning, prefix_tuning, p_tuning: learned virtual tokens (offline stages only)."""
    encoder_hidden_size: int = 128
    """p_tuning: hidden size of the prompt encoder MLP."""
    ia3_target_modules: Optional[list[str]] = None
    """ia3: modules that get a learned scale vector (None: peft's default for the architecture)."""
    ia3_feedforward_modules: Optional[list[str]] = None
    """ia3: the subset of ia3_target_modules scaled on their input (None: peft's default)."""
    trainable_patterns: list[str] = field(default_factory=list)
    """freeze: regexes (re.search on parameter names); when given, only matching parameters train."""
    frozen_patterns: list[str] = field(default_factory=list)
    """freeze, bitfit: regexes of parameters kept frozen, e.g. ["embed_tokens", "lm_head"]."""
    frozen_layers: int = 0
    """freeze, bitfit: also freeze the first N transformer blocks (names with "layers.<i>." for i < N)."""
    quant_type: str = "nf4"
    """qlora: 4-bit data type of the frozen base (nf4 or fp4)."""
    double_quant: bool = True
    """qlora: quantise the quantisation constants too (QLoRA, arXiv:2305.14314 §3)."""


@dataclass
class ExportConfig:
    """stage=export: merge an adapter or a run's checkpoint into a plain HF checkpoint (rlhf.trainers.export)."""

    base: Optional[str] = None
    """Base model (dir, Hub name or tiny name); None: the adapter's base_model_name_or_path, or the
    checkpoint's model.path."""
    adapter: Optional[str] = None
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) to merge into base."""
    checkpoint: Optional[str] = None
    """Instead of adapter: a run's final/ directory or one of its step_XXXXXXXX checkpoints."""
    output: Optional[str] = None
    """Directory of the exported checkpoint (None: <run.output_dir>/export); replaced if it exists."""
    dtype: str = "auto"
    """Tensor dtype written: float32, bfloat16, float16, or auto (the base checkpoint's)."""


@dataclass
class ModelConfig:
    path: str = "tiny"
    """Local checkpoint dir, Hugging Face Hub name, or "tiny" for the tiny world's warmed-up policy."""
    dtype: str = "float32"
    """Parameter dtype of trainer and rollout: float32 or bfloat16."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint; off unless you trust its source."""
    use_safetensors: bool = True
    """Load weights only from .safetensors files (as transformers' from_pretrained(use_safetensors=True)):
    a local checkpoint of any model field holding only pickled weights (pytorch_model.bin, *.pt, *.pth)
    is refused at start-up, since unpickling can run code. False also accepts those (only from a trusted source)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the policy (merged into the base weights for rollout); also the low-rank
    settings (rank, alpha, dropout, target_modules) of peft.method qlora, loha and lokr."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Parameter-efficient method of the trained models (rlhf.models.peft_utils); none + lora.rank > 0 is LoRA."""


@dataclass
class DatasetSpec:
    """One source of an offline training mixture (DataConfig.mixture)."""

    path: str = ""
    """A json/jsonl/parquet/csv/arrow file or dir, a Hub dataset name, or "tiny:<kind>:<split>"."""
    weight: float = 1.0
    """Relative share of the mixture's rows (normalised over all sources; must be > 0)."""
    split: str = "train"
    """Split of a directory or Hub dataset to read."""
    max_rows: Optional[int] = None
    """Use at most this many rows of the source (its first rows, before mixing); None: all."""


@dataclass
class DataConfig:
    train: str = "tiny"
    """RL prompts or offline data: a json/jsonl/parquet/csv/arrow file or dir, a Hub name, or "tiny"
    ("tiny" in an offline stage means "tiny:<kind>:train" of the stage's data kind)."""
    eval: Optional[str] = "tiny:eval"
    """Held-out prompts or offline data for evaluation (None disables it, or see eval_fraction); offline
    stages read a directory or Hub dataset here at its "test" split."""
    mixture: list[DatasetSpec] = field(default_factory=list)
    """Offline stages: weighted sources that replace `train` when non-empty. The mixture has as
    many rows as its sources together; source i gets round(weight_i / sum(weights) × that) of them
    (largest remainder), drawn from its rows shuffled with the seed, repeating whole passes when
    it has fewer (rlhf.data.datasets.mix_records)."""
    eval_fraction: float = 0.0
    """Offline stages with eval=None: hold out this fraction of each train source (seeded) for evaluation."""
    prompt_key: str = "prompt"
    """Column holding the prompt (text or chat messages)."""
    answer_key: str = "answer"
    """Column holding the reference answer passed to rule rewards."""
    response_key: str = "response"
    """Column holding the response of instruction/KTO rows (a "completion" column is read when it is missing)."""
    messages_key: str = "messages"
    """Column holding a chat conversation (list of {"role", "content"}) for messages-format SFT."""
    text_key: str = "text"
    """Column holding plain text for pre-training."""
    chosen_key: str = "chosen"
    """Column holding the preferred response (text or messages ending with the assistant turn)."""
    rejected_key: str = "rejected"
    """Column holding the dispreferred response (same form as chosen)."""
    label_key: str = "label"
    """Column holding a KTO row's desirability (true/false, 1/0, "yes"/"no")."""
    margin_key: str = "margin"
    """Optional column holding a preference pair's margin (0.0 when absent)."""
    format: str = "auto"
    """Offline row format: text | instruction | messages | preference | kto; auto: the stage's."""
    max_length: int = 256
    """Offline stages: the most prompt + response tokens of one example (and the packed row length)."""
    overlong: str = "truncate"
    """Longer examples: "truncate" (cut the response, keep >= 1 token, else drop) or "drop"; counted and logged."""
    packing: bool = False
    """PT/SFT: pack several examples into rows of max_length tokens (no attention across examples)."""
    loss_on: str = "response"
    """SFT loss on "response" tokens only (assistant turns) or on "all" tokens."""
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
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose scores are all equal and generate more prompts until
    run.rollout_batch_size informative groups are collected (arXiv:2503.14476 §3.2)."""
    max_sampling_rounds: int = 3
    """Dynamic sampling: at most this many generation rounds per step (each of run.rollout_batch_size
    prompts); if still short, the batch is padded with uninformative groups (zero advantage)."""


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
    """Roles sharing a GPU (cluster=single_gpu): the engines sleep after each generate (KV cache dropped, weights
    to host memory) so the trainer has the memory, wake their weights for each weight sync and their KV cache
    for the next generate (rlhf.workers.rollout.SleepBetweenRollouts). In the stages that train between
    rollouts (RL, online_dpo, on-policy distill) and for the LLM judge's engines; generate/eval keep their
    engines awake (nothing trains between their batches). No-op on CPU."""
    weight_sync_bucket_mb: int = 64
    """Bucket size for streaming weights to the engines."""
    hf_batch_size: int = 64
    """Sequences decoded together by the hf backend (prompts × samples are chunked to this)."""
    max_restarts: int = 3
    """Engine restarts allowed over an RL run: a dead engine is recreated, given the current policy
    weights and its work retried; one more death stops the run (0: stop at the first)."""


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
    """ZeRO optimizer state offload to CPU, stepped there by DeepSpeed's CPU Adam (its op builds on first use)."""
    offload_params: bool = False
    """ZeRO-3 parameter offload to CPU."""
    zero3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank (0 partitions everything)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward per rank."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Token budget: pack sequences (real prompt + response tokens) into micro-batches of at most this many tokens instead of micro_batch_size padded rows, and balance ranks by tokens (RL roles; None or 0: off)."""
    train_batch_size: int = 32
    """Sequences per optimizer step, across all ranks."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""


@dataclass
class RewardComponentConfig:
    """One more weighted term of the reward: a registered reward or "pkg.module:function" (docs/rewards.md)."""

    fn: Optional[str] = None
    """A registered reward name (e.g. overlong_penalty) or "pkg.module:function"; required."""
    weight: float = 1.0
    """Multiplier of this term in the total reward."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword hyperparameters bound to the function (checked against its signature at start-up)."""
    name: Optional[str] = None
    """Metric name (reward/<name>_mean); None: the function's name."""


@dataclass
class RewardNormConfig:
    """Normalisation of a reward source's raw scores before weighting (the reward model's)."""

    mode: str = "none"
    """none, running (whiten by mean/std of every score seen so far) or batch (by this batch's)."""
    clip: Optional[float] = None
    """Clip the (normalised) scores to [-clip, clip]; None: no clipping."""
    eps: float = 1e-8
    """Added to the variance before the square root."""


@dataclass
class RemoteRewardConfig:
    """An HTTP reward server (`python -m rlhf.rewards.serve`) scored through a batching client."""

    url: Optional[str] = None
    """Server base URL, e.g. http://127.0.0.1:8000 (None: no remote reward)."""
    token_env: str = "RLHF_REWARD_TOKEN"
    """Name of the environment variable holding the bearer token (the token never goes in config)."""
    weight: float = 1.0
    """Multiplier of the remote scores in the total reward."""
    batch_size: int = 64
    """Rows per HTTP request."""
    max_concurrency: int = 4
    """Requests in flight at once."""
    timeout_s: float = 60.0
    """Per-request timeout."""
    max_retries: int = 3
    """Retries after a timeout, connection error or 5xx (4xx is not retried)."""
    backoff_s: float = 1.0
    """Wait before retry k is backoff_s × 2^k."""


@dataclass
class JudgeConfig:
    """An LLM judge (RLAIF) on its own greedy rollout engine; pointwise verdicts become rewards."""

    model_path: Optional[str] = None
    """Judge checkpoint (causal LM; local dir, Hub name or "tiny"); None: no judge."""
    weight: float = 1.0
    """Multiplier of the judge's normalised score in the total reward."""
    backend: Optional[str] = None
    """Judge engine backend, vllm or hf (None: rollout.backend); resources from cluster.reward."""
    num_engines: int = 1
    """Judge engines."""
    template: str = (
        "Rate how well the response answers the question, from 1 (wrong) to 10 (perfect).\n"
        "Question: {prompt}\nResponse: {response}\nReply with 'Score: <1-10>'."
    )
    """Rubric with placeholders {prompt}, {response} and optionally {reference} (metadata["answer"]); {{ }} for braces."""
    pattern: str = r"(?i)score\s*[:=]?\s*(-?\d+(?:\.\d+)?)"
    """Regex whose first group is the number in a pointwise verdict (the last match counts)."""
    score_min: float = 1.0
    """Lowest verdict the rubric allows; maps to 0.0."""
    score_max: float = 10.0
    """Highest verdict the rubric allows; maps to 1.0."""
    unparseable_score: float = 0.0
    """Normalised score given to a verdict with no number in [score_min, score_max] (counted in reward/judge_unparseable)."""
    pairwise_template: str = (
        "Which response answers the question better?\nQuestion: {prompt}\n[A]: {response_a}\n[B]: {response_b}\n"
        "Reply with [[A]] or [[B]]."
    )
    """Pairwise rubric with {prompt}, {response_a}, {response_b} and optionally {reference}."""
    pairwise_pattern: str = r"\[\[\s*([AB])\s*\]\]"
    """Regex whose first group is A or B in a pairwise verdict (the last match counts)."""
    use_chat_template: bool = True
    """Wrap the rendered rubric in the judge tokenizer's chat template (when it has one)."""
    max_prompt_tokens: int = 448
    """Longer rendered rubrics keep their last this-many tokens (the instruction sits at the end)."""
    max_new_tokens: int = 32
    """Verdict length (greedy decoding)."""


@dataclass
class RewardConfig:
    fn: Optional[str] = "tiny_world"
    """Rule reward: a registered name or "pkg.module:function" (None: no rule reward). Signature in docs/rewards.md."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword hyperparameters of `fn`."""
    weight: float = 1.0
    """Multiplier of `fn` in the total reward."""
    components: list[RewardComponentConfig] = field(default_factory=list)
    """More weighted rule/plugin terms added to the total (e.g. overlong_penalty)."""
    model_path: Optional[str] = None
    """Reward model checkpoint (sequence classification) hosted on RewardWorkers."""
    num_workers: int = 1
    """Reward model actors (when model_path is set); each scores its share of the batch."""
    zero_stage: int = 0
    """0: every actor holds the whole reward model; 3: the actors form one ZeRO-3 group that partitions it."""
    zero3_param_persistence_threshold: int = 100_000
    """zero_stage 3: parameters with fewer elements stay whole on every actor (0 partitions everything)."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Reward model token budget: packed micro-batches of at most this many real tokens (None or 0: policy.micro_batch_size padded rows)."""
    model_weight: float = 1.0
    """Multiplier of the (normalised) reward-model score in the total reward."""
    model_norm: RewardNormConfig = field(default_factory=RewardNormConfig)
    """Normalisation of the reward-model scores."""
    remote: RemoteRewardConfig = field(default_factory=RemoteRewardConfig)
    """HTTP reward server (used when remote.url is set)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM judge (used when judge.model_path is set)."""


@dataclass
class ReferenceConfig:
    """The frozen reference policy of the RL stages (its KL term)."""

    num_workers: int = 1
    """Reference actors; each computes the logprobs of its share of the batch."""
    zero_stage: int = 0
    """0: every actor holds the whole model; 3: the actors form one ZeRO-3 group that partitions it."""
    zero3_param_persistence_threshold: int = 100_000
    """zero_stage 3: parameters with fewer elements stay whole on every actor (0 partitions everything)."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Token budget: packed micro-batches of at most this many real tokens (None or 0: policy.micro_batch_size padded rows)."""


@dataclass
class ResourceConfig:
    num_cpus: float = 1.0
    """CPUs per actor of this role."""
    num_gpus: float = 0.0
    """GPUs per actor of this role (fractions let roles share a GPU)."""


@dataclass
class NodesConfig:
    """The nodes that `run.plan=true` places the roles on and sizes them against (rlhf.plan); the run itself
    is placed by Ray on whatever nodes it has."""

    count: int = 1
    """Nodes in the cluster."""
    cpus: Optional[float] = None
    """Logical CPUs per node (None: cluster.num_cpus, else this machine's CPU count)."""
    gpus: Optional[int] = None
    """GPUs per node (None: cluster.num_gpus, else 0 on cluster.device cpu; cuda needs a number)."""
    device_memory_gib: Optional[float] = None
    """Memory of one accelerator in GiB (None: 80 on cuda; on cpu the ranks share host_memory_gib)."""
    host_memory_gib: Optional[float] = None
    """Host RAM per node in GiB (None: this machine's)."""


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
    teacher: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=0.5))
    """Resources per distillation teacher actor."""
    rollout: ResourceConfig = field(default_factory=ResourceConfig)
    """Resources per rollout engine."""
    threads_per_worker: int = 1
    """OMP/torch threads per actor (avoid oversubscription on CPU)."""
    collective_timeout_s: int = 600
    """Timeout of collectives and weight sync; nothing waits forever."""
    call_timeout_s: int = 3600
    """Longest the driver waits for one call on a worker group (generate, update, save, ...): a wedged
    rank raises WorkerError instead of hanging the run. Above collective_timeout_s, so a stuck
    collective reports from inside the rank first; 0: no limit."""
    weight_sync_backend: str = "auto"
    """gloo, nccl, or auto: nccl when trainer and engines each own whole GPUs, else gloo (NCCL refuses
    two ranks on one shared GPU, as in single_gpu mode)."""
    weight_sync_transport: str = "auto"
    """collective (broadcast over weight_sync_backend), shm (a shared-memory segment in /dev/shm that the
    engines map: trainer rank 0 and every engine on one Ray node), or auto: shm on cluster.device cpu when
    every engine has rank 0's Ray node id and can open its segment (checked at join), else collective."""
    nodes: NodesConfig = field(default_factory=NodesConfig)
    """Shape and number of the nodes, for the sizing plan (run.plan=true) only."""


@dataclass
class ReportConfig:
    """`stage=report`: plots (and the sweep table) of finished runs, without training."""

    run_dir: Optional[str] = None
    """A run's output directory (holding metrics.jsonl) or a sweep directory (numbered job dirs)."""


@dataclass
class TrackingConfig:
    """Experiment trackers beyond the always-on metrics.jsonl (API keys come from the environment only)."""

    project: str = "rlhf"
    """W&B project / MLflow experiment name."""
    run_name: Optional[str] = None
    """Run name shown by the trackers (None: the output directory's name)."""
    wandb_mode: str = "offline"
    """W&B mode: offline (no network; `wandb sync` later), online, or disabled."""
    mlflow_tracking_uri: Optional[str] = None
    """MLflow tracking URI (None: a local file store under <output_dir>/mlruns)."""


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
    max_consecutive_nonfinite: int = 3
    """Stop the run (NonFiniteError, naming the last good checkpoint) after this many optimizer steps
    in a row of one trained role were skipped for a non-finite loss or gradient norm; 0: never stop.
    Such steps are always skipped (no update) and counted (<role>/nonfinite_* metrics)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), none, or a checkpoint path."""
    output_dir: str = "outputs/run"
    """Where checkpoints, metrics and the final model go."""
    seed: int = 0
    """Global seed."""
    deterministic: bool = False
    """Deterministic torch algorithms in the driver and every actor (cuBLAS workspace fixed on GPU), so
    a rerun on the same machine and layout repeats the run exactly; sampling is seeded from run.seed
    either way. What it does and does not guarantee: docs/reliability.md."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl."""
    wandb: bool = False
    """Log metrics to Weights & Biases (run.tracking.wandb_mode; offline works without network)."""
    mlflow: bool = False
    """Log metrics to MLflow (run.tracking.mlflow_tracking_uri; a local file store by default)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Settings of the W&B and MLflow loggers."""
    plots: bool = True
    """Write PNG plots of the metrics into <output_dir>/plots at the end of the run."""
    progress_bar: bool = True
    """Show a progress bar on the driver."""
    plan: bool = False
    """Print the sizing plan (roles, ranks, placement per node, estimated memory per rank, KV cache of the
    engines) and exit without starting Ray; a layout that cannot fit is a ConfigError (rlhf.plan)."""
    final_eval: bool = False
    """After a training stage saves <output_dir>/final and stops its actors, evaluate it as stage=eval
    does (rlhf.trainers.evaluate: pass@k, accuracy, reward means) into <output_dir>/final_eval.
    Reads eval.{data, max_prompts, n_samples, k, greedy, correct_threshold, reference_model}, prompts
    from eval.data or else data.eval (read as prompts: data.prompt_key/answer_key; for offline stages
    point eval.data at a prompt set when data.eval holds other rows), rollout.* and reward.*; not
    eval.output, eval.samples or run.eval_size. Checked before training; not for stage=rm."""


@dataclass
class OfflineConfig:
    """Offline stages (pt, sft, rm, dpo, ipo, simpo, orpo, kto) on the same runtime as RL.

    Batch sizes of `policy` count *examples* here: one sequence (pt, sft), one preference pair
    (rm and the DPO family: a chosen and a rejected row), or one KTO example (its row plus the
    mismatched row of the KL reference point). A pair's two rows always sit on one rank, so
    policy.train_batch_size must divide by policy.micro_batch_size × policy.num_workers examples.
    These stages also read run.{eval_every, eval_size, save_every, keep_last, resume, output_dir,
    seed} (steps are optimizer steps), never run.total_steps or run.rollout_batch_size.
    """

    objective: str = "sft"
    """Training objective (registry rlhf.workers.objectives.OBJECTIVES); each stage yaml sets it."""
    epochs: int = 1
    """Passes over the training examples (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0: epochs × (train examples // policy.train_batch_size)."""
    loss_agg: str = "token_mean"
    """PT/SFT token-loss aggregation (registry LOSS_AGGREGATIONS)."""
    beta: float = 0.1
    """DPO family / KTO inverse temperature (tau for ipo); SimPO's reward scale (2.0 in its stage)."""
    preference_loss: str = "sigmoid"
    """DPO-family variant (registry PREFERENCE_LOSSES): sigmoid (DPO/cDPO), ipo, hinge."""
    label_smoothing: float = 0.0
    """cDPO: probability that a preference label is flipped (sigmoid only, in [0, 0.5))."""
    nll_weight: float = 0.0
    """dpo only: weight of the chosen responses' per-token NLL added to the DPO loss (RPO, Pang et al. 2024
    arXiv:2404.19733; TRL's rpo_alpha); 0: plain DPO. stage=online_dpo has its own, online_dpo.nll_weight."""
    simpo_gamma_beta_ratio: float = 0.5
    """SimPO target margin gamma divided by beta (TRL's simpo_gamma is gamma = offline.beta × this)."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term next to the chosen responses' NLL."""
    kto_desirable_weight: float = 1.0
    """KTO lambda_D: weight of the desirable examples' loss."""
    kto_undesirable_weight: float = 1.0
    """KTO lambda_U: weight of the undesirable examples' loss."""
    rm_use_margin: bool = False
    """Reward model: subtract each pair's margin column inside the Bradley-Terry loss (Llama 2)."""
    reference: str = "precompute"
    """Reference log-probabilities: precompute (once over the data at start, then the reference
    model is freed; KTO's re-paired KL rows are still scored per batch) or online (every batch)."""
    reference_path: Optional[str] = None
    """Reference model checkpoint (None: model.path, the policy's starting weights)."""
    eval_at_start: bool = True
    """Evaluate once before the first step, so logs show where the held-out metrics started."""


@dataclass
class DistillConfig:
    """Knowledge distillation (stage=distill): the student (model.path) learns the teacher's token distributions."""

    teacher_path: str = "tiny"
    """Teacher checkpoint: local dir, Hub name or tiny-world name; its vocabulary must match the student's."""
    loss: str = "forward_kl"
    """Divergence (registry DISTILLATION_LOSSES): forward_kl KL(T||S), reverse_kl KL(S||T), jsd."""
    beta: float = 0.5
    """Generalised JSD interpolation in [0, 1] (jsd only; 0 = forward KL, 1 = reverse KL)."""
    temperature: float = 1.0
    """Softmax temperature of teacher and student in the loss (> 0)."""
    top_k: int = 64
    """Teacher tokens shipped per position, plus a tail bucket for the rest (0: the full vocabulary)."""
    mode: str = "offline"
    """offline: teacher-forced on the dataset's responses; on_policy: on the student's own samples."""
    lmbda: float = 1.0
    """on_policy: fraction of steps (seeded draw per step) that sample from the student; the rest
    use the dataset's responses (GKD's lambda, arXiv:2306.13649 Algorithm 1)."""
    num_workers: int = 1
    """Teacher actors (each holds the whole teacher; batches are split across them)."""


@dataclass
class ExpandConfig:
    """generate.expand: seed-prompt expansion, Self-Instruct style (Wang et al. 2022, arXiv:2212.10560).

    Attempt a shows the model `shots` seed instructions of data.train (drawn with seed (run.seed, a))
    in `template`, samples one continuation with `sampling` (seed run.seed × 2^32 + 2^31 + a) and
    parses its first line as a new instruction; empty, unparseable, too long (> data.max_prompt_length
    tokens as a prompt) and duplicate ones (same words as, or ROUGE-L F1 > similarity_threshold with, a
    seed or a kept instruction) are dropped. Rounds of generate.shard_size attempts are the resume unit
    (rlhf.trainers.expand).
    """

    enabled: bool = False
    """Write <generate.output>/expanded/ (new prompts with provenance), expanded_rejected/ and expansion.json."""
    num_new: int = 100
    """Stop once this many new instructions are kept."""
    shots: int = 8
    """Seed instructions shown per attempt (Self-Instruct shows 8); at most the number of seed prompts."""
    similarity_threshold: float = 0.7
    """Near duplicate: ROUGE-L F1 above this against any seed or kept instruction (Self-Instruct §2.2: 0.7)."""
    max_attempts: int = 1000
    """Give up after this many sampled continuations, kept or not (>= num_new)."""
    template: str = "Come up with a series of tasks:\n\n{examples}\nTask {next}:"
    """Few-shot prompt: {examples} becomes "Task 1: <seed>" lines, {next} the next task number."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.5, max_new_tokens=64, stop=["\n"])
    )
    """Sampling of the new instructions (Self-Instruct: temperature 0.7, top_p 0.5); one line each."""
    then_generate: bool = False
    """Then run the usual generation (samples/, sft/, preference/) over the seeds plus the kept instructions."""


@dataclass
class GenerateConfig:
    """stage=generate: sample responses over data.train's prompts into a dataset (rlhf.trainers.generate).

    Uses rollout.sampling and rollout.n_samples_per_prompt; sample j of prompt i is drawn with
    seed run.seed × 2^32 + i × n + j, so a resumed run writes exactly the rows of an uninterrupted one.
    """

    output: Optional[str] = None
    """Output directory (None: <run.output_dir>/generated); holds samples/, sft/, preference/ and generation.json."""
    format: str = "jsonl"
    """File format of the written shards: jsonl or parquet."""
    shard_size: int = 64
    """Prompts per shard; a shard is written to a temporary name and renamed when complete (the resume unit)."""
    max_prompts: int = 0
    """Use the first this-many prompts of data.train (0: all)."""
    keep: str = "all"
    """Rejection sampling into sft/: all (no sft/ set), best (the top-scored sample per prompt, if it
    reaches threshold) or above_threshold (every sample scoring >= threshold)."""
    threshold: float = 1.0
    """Score a sample must reach to be kept by keep=best|above_threshold (1.0: correct under rule rewards)."""
    pairs: bool = False
    """Also write preference/ (prompt, chosen = best, rejected = worst sample; groups whose scores are all equal skipped)."""
    max_shards_per_run: int = 0
    """Stop cleanly after writing this many new shards (0: run to the end); a rerun continues (job slicing)."""
    expand: ExpandConfig = field(default_factory=ExpandConfig)
    """Seed-prompt expansion before (or instead of) sampling responses; off by default."""


@dataclass
class EvalConfig:
    """stage=eval (and trainers' end-of-run evaluation): accuracy, pass@k, reward means, win rate (rlhf.trainers.evaluate)."""

    data: Optional[str] = None
    """Prompts to evaluate (None: data.eval)."""
    samples: Optional[str] = None
    """Instead of generating: re-score a stage=generate samples dataset (rule reward only, no model needed)."""
    max_prompts: int = 0
    """Evaluate the first this-many prompts (0: all)."""
    n_samples: int = 8
    """Samples per prompt drawn with rollout.sampling for pass@k (>= max(k))."""
    k: list[int] = field(default_factory=lambda: [1, 4, 8])
    """pass@k values reported (unbiased estimator, Chen et al. 2021, arXiv:2107.03374 eq. 1)."""
    greedy: bool = True
    """Also report greedy accuracy (one rollout.eval_sampling response per prompt)."""
    correct_threshold: float = 1.0
    """A response is correct when reward.fn scores it >= this (1.0: the rule checker accepts it)."""
    reference_model: Optional[str] = None
    """Win rate against this model's greedy responses, judged pairwise by reward.judge (both orders); None: off."""
    output: Optional[str] = None
    """Directory of eval_results.json and eval_results.md (None: <run.output_dir>/eval)."""


@dataclass
class OnlineDPOConfig:
    """stage=online_dpo: online / iterative DPO (rlhf.trainers.online_dpo); one round is one run step.

    A round samples rollout.n_samples_per_prompt responses to each of run.rollout_batch_size prompts
    from the current policy, scores them with the reward terms, pairs the best with the worst sample
    of each prompt, trains offline.objective (dpo; offline.beta, preference_loss, label_smoothing) on
    the pairs, then syncs the weights into the rollout engines; run.total_steps rounds in all.
    policy.train_batch_size counts *pairs* per optimizer step, as in the offline DPO stage.
    """

    reference: str = "initial"
    """initial: the frozen starting policy (offline.reference_path or model.path), as in online DPO
    (arXiv:2402.04792); previous: the policy as it was when the round began (iterative DPO, Xiong et
    al. arXiv:2312.11456 / Snorkel), which needs no reference model."""
    epochs: int = 1
    """Passes over one round's pairs, each of pairs // policy.train_batch_size optimizer steps
    (pairs beyond the last full minibatch are left out and counted in online_dpo/pairs_unused)."""
    nll_weight: float = 0.0
    """offline.objective=dpo only: weight of the chosen samples' per-token NLL added to the DPO loss
    (iterative RPO, Pang et al. 2024 arXiv:2404.19733, weight 1; TRL's rpo_alpha). 0: plain DPO."""


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
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The RL stages' reference model: actors and ZeRO-3 partitioning."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    """Offline stages' objective, schedule and loss settings (policy.* sizes count examples there)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    """stage=export's inputs and output."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """stage=generate's output, shards and rejection sampling."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """stage=eval's prompts, pass@k and win-rate settings."""
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    """stage=online_dpo's reference model and passes per round (the loss settings are offline.*)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form settings for plugins (never read by the core)."""


RL_STAGES = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo", "ppo")
OFFLINE_STAGES: tuple[str, ...] = ("pt", "sft", "rm", "dpo", "ipo", "simpo", "orpo", "kto", "distill")
"""Stages driven by the offline controller (rlhf/trainers/offline.py); filled in as they land."""
UTILITY_STAGES: tuple[str, ...] = ("export", "report")
"""Stages that train nothing (export, report, ...)."""
GENERATION_STAGES: tuple[str, ...] = ("generate", "eval")
"""Stages that sample from a model on rollout engines and train nothing (rlhf.trainers.generate, .evaluate)."""
ONLINE_PREFERENCE_STAGES: tuple[str, ...] = ("online_dpo",)
"""Stages that train a preference loss on pairs of the policy's own scored samples (rlhf.trainers.online_dpo)."""
ZERO_STAGES = (0, 1, 2, 3)
INFERENCE_ZERO_STAGES = (0, 3)
"""zero_stage of a frozen model (reference, reward model): 0 whole on each actor, 3 partitioned over them."""
DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda")
ROLLOUT_BACKENDS = ("vllm", "hf")
PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(value: Any, allowed: tuple, field_name: str) -> None:
    _require(value in allowed, f"{field_name}={value!r} is not one of {', '.join(map(str, allowed))}")


def _check_train(cfg: TrainConfig, role: str, sequences_per_step: int, arithmetic: str = "sequences per step") -> None:
    """ZeRO and batch arithmetic of one trained role; `arithmetic` says how sequences_per_step was computed."""
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
    fits = [size for size in range(per_pass, sequences_per_step + 1, per_pass) if sequences_per_step % size == 0]
    _require(
        sequences_per_step % cfg.train_batch_size == 0,
        f"{arithmetic} = {sequences_per_step} sequences per step is not divisible by {role}.train_batch_size "
        f"{cfg.train_batch_size} ({sequences_per_step} / {cfg.train_batch_size} = "
        f"{sequences_per_step / cfg.train_batch_size:g} optimizer steps); "
        + (
            f"pick {role}.train_batch_size from {', '.join(map(str, fits[-4:]))}"
            if fits
            else f"make the sequences per step a multiple of {per_pass}"
        ),
    )


FIELD_BOUNDS: dict[str, str] = {
    # signed: weights (a penalty is a negative weight), judge scales, score thresholds
    "reward.weight": "any",
    "reward.model_weight": "any",
    "reward.components.#.weight": "any",
    "reward.remote.weight": "any",
    "reward.judge.weight": "any",
    "reward.judge.score_min": "any",
    "reward.judge.score_max": "any",
    "reward.judge.unparseable_score": "any",
    "generate.threshold": "any",
    "eval.correct_threshold": "any",
    "*sampling.top_k": ">= -1",
    # at least one
    "*num_workers": ">= 1",
    "*num_engines": ">= 1",
    "*batch_size": ">= 1",
    "*max_new_tokens": ">= 1",
    "*max_prompt_tokens": ">= 1",
    "*epochs": ">= 1",
    "data.max_prompt_length": ">= 1",
    "data.max_length": ">= 2",
    "rollout.n_samples_per_prompt": ">= 1",
    "rollout.tensor_parallel_size": ">= 1",
    "rollout.weight_sync_bucket_mb": ">= 1",
    "cluster.threads_per_worker": ">= 1",
    "cluster.collective_timeout_s": ">= 1",
    "cluster.nodes.count": ">= 1",
    "cluster.nodes.device_memory_gib": "> 0",
    "cluster.nodes.host_memory_gib": "> 0",
    "reward.remote.max_concurrency": ">= 1",
    "algorithm.kl_horizon": ">= 1",
    "algorithm.max_sampling_rounds": ">= 1",
    "run.keep_last": ">= 1",
    "eval.n_samples": ">= 1",
    "eval.k.#": ">= 1",
    "generate.shard_size": ">= 1",
    "data.mixture.#.max_rows": ">= 1",
    "model.peft.num_virtual_tokens": ">= 1",
    "model.peft.encoder_hidden_size": ">= 1",
    # strictly positive
    "*optim.lr": "> 0",
    "*.eps": "> 0",
    "reward.remote.timeout_s": "> 0",
    "rollout.kv_cache_gib": "> 0",
    "algorithm.kl_target": "> 0",
    "algorithm.rollout_is_cap": "> 0",
    "algorithm.dual_clip": "> 1",
    "reward.model_norm.clip": "> 0",
    "data.mixture.#.weight": "> 0",
    "offline.beta": "> 0",
    "distill.temperature": "> 0",
    "model.lora.alpha": "> 0",
    # fractions and probabilities
    "*sampling.top_p": "(0, 1]",
    "rollout.gpu_memory_utilization": "(0, 1]",
    "*optim.betas.#": "[0, 1)",
    "model.lora.dropout": "[0, 1)",
    "data.eval_fraction": "[0, 1)",
    "algorithm.gamma": "(0, 1]",
    "algorithm.lam": "[0, 1]",
    "offline.label_smoothing": "[0, 0.5)",
    "distill.beta": "[0, 1]",
    "distill.lmbda": "[0, 1]",
    "generate.expand.similarity_threshold": "[0, 1]",
}
"""Allowed range of numeric config fields, by dotted path ("#" stands for a list index; "*" matches
any prefix; the first exact, then the first pattern match wins). A number not listed must be finite
and >= 0. Checked for every stage by `check_fields`, before the stage's own cross-field checks."""

SCHEDULERS = ("constant", "cosine")
WANDB_MODES = ("offline", "online", "disabled")


def _bound(path: str) -> str:
    import fnmatch

    if path in FIELD_BOUNDS:
        return FIELD_BOUNDS[path]
    return next((rule for pattern, rule in FIELD_BOUNDS.items() if fnmatch.fnmatchcase(path, pattern)), ">= 0")


def _in_bounds(value: float, rule: str) -> bool:
    if rule == "any":
        return True
    if rule[0] in "([":
        low, high = (float(x) for x in rule[1:-1].split(","))
        above = value >= low if rule[0] == "[" else value > low
        below = value <= high if rule[-1] == "]" else value < high
        return above and below
    op, limit = rule.split()
    return value >= float(limit) if op == ">=" else value > float(limit)


def _type_problem(value: Any, hint: Any) -> Optional[str]:
    """None when `value` fits the type hint `hint` (Optional, list, dict, int, float, str, bool, Any)."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        return _type_problem(value, next(a for a in args if a is not type(None)))
    if origin is list:
        if not isinstance(value, list):
            return f"a list (got {type(value).__name__} {value!r})"
        return next((p for p in (_type_problem(v, args[0]) for v in value) if p), None)
    if origin is dict:
        return None if isinstance(value, dict) else f"a mapping (got {type(value).__name__} {value!r})"
    if hint is bool:
        return None if isinstance(value, bool) else f"true or false (got {type(value).__name__} {value!r})"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"an integer (got {type(value).__name__} {value!r})"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"a number (got {type(value).__name__} {value!r})"
    if hint is str:
        return None if isinstance(value, str) else f"a string (got {type(value).__name__} {value!r})"
    return None


def check_fields(node: Any, path: str = "", pattern: str = "") -> None:
    """Every field of a config dataclass tree has its declared type, and every number is finite and in
    FIELD_BOUNDS; raise ConfigError naming the first field that is not (its dotted path)."""
    import dataclasses
    import math
    import typing

    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        name, key, value = f"{path}{f.name}", f"{pattern}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{name}.", f"{key}.")
            continue
        problem = _type_problem(value, hints[f.name])
        _require(problem is None, f"{name} must be {problem}")
        items = [(f"{name}[{i}]", f"{key}.#", v) for i, v in enumerate(value)] if isinstance(value, list) else []
        for shown, item_key, item in items or [(name, key, value)]:
            if dataclasses.is_dataclass(item):
                check_fields(item, f"{shown}.", f"{item_key}.")
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                _require(math.isfinite(item), f"{shown} must be a finite number (got {item})")
                rule = _bound(item_key)
                _require(_in_bounds(item, rule), f"{shown} must be {_rule_text(rule)} (got {item})")


def _rule_text(rule: str) -> str:
    return rule if rule[0] not in "([" else f"in {rule}"


def _check_cluster(cluster: ClusterConfig) -> None:
    """The cluster preset's choices, the same for every stage that starts Ray."""
    _choice(cluster.device, DEVICES, "cluster.device")
    _choice(cluster.placement_strategy, PLACEMENT_STRATEGIES, "cluster.placement_strategy")
    _choice(cluster.weight_sync_backend, ("auto", "gloo", "nccl"), "cluster.weight_sync_backend")
    _choice(cluster.weight_sync_transport, WEIGHT_SYNC_TRANSPORTS, "cluster.weight_sync_transport")
    _check_call_timeout(cluster)


def validate(cfg: RLHFConfig, *, produced: Collection[Path] = ()) -> None:
    """Check every field once, before any cluster work; raise ConfigError saying what to change.

    Machine-independent: a cuda preset validates on a machine without a GPU (what this machine has
    is checked when Ray starts, rlhf.utils.ray_session). Local model and dataset paths must exist,
    except inside the `produced` directories (resolved), which an earlier pipeline step will write.
    """
    _choice(
        cfg.stage, RL_STAGES + OFFLINE_STAGES + UTILITY_STAGES + GENERATION_STAGES + ONLINE_PREFERENCE_STAGES, "stage"
    )
    check_fields(cfg)
    for role in ("policy", "critic"):
        optim = getattr(cfg, role).optim
        _choice(optim.scheduler, SCHEDULERS, f"{role}.optim.scheduler")
        _require(len(optim.betas) == 2, f"{role}.optim.betas must be two numbers [beta1, beta2] (got {optim.betas})")
    _choice(cfg.run.tracking.wandb_mode, WANDB_MODES, "run.tracking.wandb_mode")
    from rlhf.data.sources import check_dataset_paths
    from rlhf.models.loading import check_model_paths

    check_model_paths(cfg, produced)
    check_dataset_paths(cfg, produced)
    from rlhf.models.peft_utils import validate_peft

    validate_peft(cfg)
    _check_cluster(cfg.cluster)
    _check_token_budget_stage(cfg)
    _check_inference_groups(cfg)
    if cfg.stage == "distill":
        validate_distill(cfg)
    elif cfg.stage in RL_STAGES:
        validate_rl(cfg)
    elif cfg.stage in OFFLINE_STAGES:
        validate_offline(cfg)
    elif cfg.stage in GENERATION_STAGES:
        from rlhf.trainers.generate import validate_generation

        validate_generation(cfg)
    elif cfg.stage in ONLINE_PREFERENCE_STAGES:
        from rlhf.trainers.online_dpo import validate_online_dpo

        validate_online_dpo(cfg)


def _check_inference_groups(cfg: RLHFConfig) -> None:
    """zero_stage of the reference and reward-model groups; reference.* sizes only the RL stages' reference."""
    _choice(cfg.reference.zero_stage, INFERENCE_ZERO_STAGES, "reference.zero_stage")
    _choice(cfg.reward.zero_stage, INFERENCE_ZERO_STAGES, "reward.zero_stage")
    _require(
        cfg.stage in RL_STAGES or (cfg.reference.num_workers == 1 and cfg.reference.zero_stage == 0),
        f"reference.num_workers={cfg.reference.num_workers} / reference.zero_stage={cfg.reference.zero_stage} "
        f"shape the RL stages' reference group; stage={cfg.stage} runs one whole reference actor: leave them at 1 / 0",
    )


def _check_shards(rows: int, arithmetic: str, num_workers: int, field_name: str) -> None:
    """`rows` per step split into num_workers equal data-parallel shards (every frozen-model actor scores one)."""
    _require(
        rows % num_workers == 0,
        f"{arithmetic} = {rows} rows per step cannot be split into {field_name} {num_workers} equal shards; "
        f"make the rows per step a multiple of {num_workers}",
    )


DISTILL_MODES = ("offline", "on_policy")


def distill_sequences_per_step(cfg: RLHFConfig) -> int:
    """Rows per distillation step: policy.train_batch_size offline; prompts × samples on-policy."""
    if cfg.distill.mode == "offline":
        return cfg.policy.train_batch_size
    return cfg.run.rollout_batch_size * cfg.rollout.n_samples_per_prompt


def _check_call_timeout(cluster: ClusterConfig) -> None:
    _require(
        cluster.call_timeout_s == 0 or cluster.call_timeout_s > cluster.collective_timeout_s > 0,
        f"cluster.call_timeout_s ({cluster.call_timeout_s}) must exceed cluster.collective_timeout_s "
        f"({cluster.collective_timeout_s}), so a stuck collective reports from inside the rank first; or be 0 (no limit)",
    )


def validate_distill(cfg: RLHFConfig) -> None:
    """stage=distill: the distill.* fields, the student's batch arithmetic, and the rollout when on-policy."""
    from rlhf.algorithms import DISTILLATION_LOSSES, LOSS_AGGREGATIONS

    d, run = cfg.distill, cfg.run
    DISTILLATION_LOSSES.check(d.loss, "distill.loss")
    LOSS_AGGREGATIONS.check(cfg.algorithm.loss_agg, "algorithm.loss_agg")
    _choice(d.mode, DISTILL_MODES, "distill.mode")
    _require(0.0 <= d.beta <= 1.0, f"distill.beta must be in [0, 1] (got {d.beta})")
    _require(d.temperature > 0, f"distill.temperature must be > 0 (got {d.temperature})")
    _require(d.top_k >= 0, f"distill.top_k must be >= 0, 0 meaning the full vocabulary (got {d.top_k})")
    _require(0.0 <= d.lmbda <= 1.0, f"distill.lmbda must be in [0, 1] (got {d.lmbda})")
    _require(d.num_workers >= 1, f"distill.num_workers must be >= 1 (got {d.num_workers})")
    _require(run.eval_every >= 0 and run.save_every >= 0, "run.eval_every and run.save_every must be >= 0")
    _require(bool(d.teacher_path), "distill.teacher_path is empty; set it to the teacher checkpoint")
    _require(run.total_steps >= 1, f"run.total_steps must be >= 1 (got {run.total_steps})")
    _require(run.eval_every >= 0, f"run.eval_every must be >= 0 (got {run.eval_every})")
    _choice(cfg.model.dtype, DTYPES, "model.dtype")
    rows = distill_sequences_per_step(cfg)
    _check_train(cfg.policy, "policy", rows)
    _require(
        rows % d.num_workers == 0,
        f"{rows} rows per distillation step cannot be split over distill.num_workers {d.num_workers} teachers",
    )
    if d.mode == "on_policy":
        rollout = cfg.rollout
        _choice(rollout.backend, ROLLOUT_BACKENDS, "rollout.backend")
        _require(rollout.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt must be >= 1")
        _require(rollout.sampling.max_new_tokens >= 1, "rollout.sampling.max_new_tokens must be >= 1")
        _require(rollout.sampling.temperature > 0, "rollout.sampling.temperature must be > 0 for on-policy samples")


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
    _require(
        algo.max_sampling_rounds >= 1, f"algorithm.max_sampling_rounds must be >= 1 (got {algo.max_sampling_rounds})"
    )
    _require(
        not algo.dynamic_sampling or rollout.n_samples_per_prompt >= 2,
        "algorithm.dynamic_sampling keeps groups whose samples score differently: "
        f"set rollout.n_samples_per_prompt >= 2 (got {rollout.n_samples_per_prompt})",
    )
    _choice(rollout.backend, ROLLOUT_BACKENDS, "rollout.backend")
    _require(rollout.num_engines >= 1, f"rollout.num_engines must be >= 1 (got {rollout.num_engines})")
    _require(rollout.max_restarts >= 0, f"rollout.max_restarts must be >= 0 (got {rollout.max_restarts})")
    _require(rollout.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt must be >= 1")
    _require(rollout.sampling.max_new_tokens >= 1, "rollout.sampling.max_new_tokens must be >= 1")
    _require(
        0 < rollout.sampling.top_p <= 1, f"rollout.sampling.top_p must be in (0, 1] (got {rollout.sampling.top_p})"
    )
    _require(rollout.sampling.temperature > 0, "rollout.sampling.temperature must be > 0 for training rollouts")
    _choice(cfg.model.dtype, DTYPES, "model.dtype")
    _require(cfg.model.lora.rank >= 0, f"model.lora.rank must be >= 0 (got {cfg.model.lora.rank})")
    sequences = run.rollout_batch_size * rollout.n_samples_per_prompt
    arithmetic = (
        f"run.rollout_batch_size {run.rollout_batch_size} × rollout.n_samples_per_prompt {rollout.n_samples_per_prompt}"
    )
    _check_train(cfg.policy, "policy", sequences, arithmetic)
    if uses_critic(cfg):
        from rlhf.models.peft_utils import check_scalar_head_peft

        _check_train(cfg.critic, "critic", sequences, arithmetic)
        check_scalar_head_peft(cfg.model, f"critic (algorithm.advantage={algo.advantage})")
    _require(cfg.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
    if uses_reference(cfg):
        _check_shards(sequences, arithmetic, cfg.reference.num_workers, "reference.num_workers")
    if cfg.reward.model_path:
        _check_shards(sequences, arithmetic, cfg.reward.num_workers, "reward.num_workers")
    _check_reward(cfg.reward)
    _check_token_budgets(cfg)


def _token_budgets(cfg: RLHFConfig) -> dict[str, Optional[int]]:
    """Each role's max_tokens_per_micro_batch."""
    return {
        "policy": cfg.policy.max_tokens_per_micro_batch,
        "critic": cfg.critic.max_tokens_per_micro_batch,
        "reference": cfg.reference.max_tokens_per_micro_batch,
        "reward": cfg.reward.max_tokens_per_micro_batch,
    }


def _check_token_budget_stage(cfg: RLHFConfig) -> None:
    """Token budgets only where the stage runs the role: policy, critic and reference in the RL stages; the
    reward model wherever the reward pipeline scores samples (RL, online_dpo, generate, eval)."""
    scoring_stages = RL_STAGES + ONLINE_PREFERENCE_STAGES + GENERATION_STAGES
    budgets = [
        f"{role}.max_tokens_per_micro_batch"
        for role, budget in _token_budgets(cfg).items()
        if budget and cfg.stage not in (scoring_stages if role == "reward" else RL_STAGES)
    ]
    _require(
        not budgets,
        f"{', '.join(budgets)}: token-budget micro-batches are for the RL stages ({', '.join(RL_STAGES)}; the "
        f"reward model's also for {', '.join(ONLINE_PREFERENCE_STAGES + GENERATION_STAGES)}), not stage={cfg.stage}; "
        "unset it (PT/SFT pack examples with data.packing=true)",
    )
    if cfg.reward.max_tokens_per_micro_batch and cfg.stage not in RL_STAGES:
        _check_token_budgets(cfg, roles=("reward",))


def _check_token_budgets(cfg: RLHFConfig, roles: Collection[str] = ("policy", "critic", "reference", "reward")) -> None:
    """Every token budget holds the longest sequence a rollout can make (prompt + response); the reward
    model's also the longest evaluation sample (rollout.eval_sampling), which it may score too."""
    sampling, eval_sampling = cfg.rollout.sampling, cfg.rollout.eval_sampling
    for role, budget in _token_budgets(cfg).items():
        if role not in roles or (role == "critic" and not uses_critic(cfg)):
            continue
        name, new_tokens = "rollout.sampling.max_new_tokens", sampling.max_new_tokens
        if role == "reward" and eval_sampling.max_new_tokens > new_tokens:
            name, new_tokens = "rollout.eval_sampling.max_new_tokens", eval_sampling.max_new_tokens
        longest = cfg.data.max_prompt_length + new_tokens
        _require(
            not budget or budget >= longest,
            f"{role}.max_tokens_per_micro_batch={budget} cannot hold the longest sequence, data.max_prompt_length "
            f"{cfg.data.max_prompt_length} + {name} {new_tokens} = {longest} tokens; set it to at least {longest} "
            "(or 0 for padded micro-batches)",
        )


REWARD_NORM_MODES = ("none", "running", "batch")


def _check_reward(reward: RewardConfig) -> None:
    """Numbers and choices of the reward sources; functions, regexes and templates are checked by
    rlhf.rewards.pipeline.build_reward_pipeline (also before Ray starts)."""
    _require(
        bool(reward.fn or reward.components or reward.model_path or reward.remote.url or reward.judge.model_path),
        "no reward: set reward.fn (a rule reward), reward.components, reward.model_path (a reward model), "
        "reward.remote.url (a reward server) and/or reward.judge.model_path (an LLM judge)",
    )
    for i, component in enumerate(reward.components):
        _require(
            bool(component.fn), f"reward.components[{i}].fn is required (a registered name or pkg.module:function)"
        )
    _require(reward.num_workers >= 1, f"reward.num_workers must be >= 1 (got {reward.num_workers})")
    _choice(reward.model_norm.mode, REWARD_NORM_MODES, "reward.model_norm.mode")
    clip = reward.model_norm.clip
    _require(clip is None or clip > 0, f"reward.model_norm.clip must be > 0 or null (got {clip})")
    remote = reward.remote
    _require(remote.batch_size >= 1, f"reward.remote.batch_size must be >= 1 (got {remote.batch_size})")
    _require(remote.max_concurrency >= 1, f"reward.remote.max_concurrency must be >= 1 (got {remote.max_concurrency})")
    _require(remote.timeout_s > 0, f"reward.remote.timeout_s must be > 0 (got {remote.timeout_s})")
    _require(remote.max_retries >= 0, f"reward.remote.max_retries must be >= 0 (got {remote.max_retries})")
    _require(remote.backoff_s >= 0, f"reward.remote.backoff_s must be >= 0 (got {remote.backoff_s})")
    judge = reward.judge
    _require(
        judge.score_max > judge.score_min,
        f"reward.judge.score_max {judge.score_max} must be > reward.judge.score_min {judge.score_min}",
    )
    _require(judge.num_engines >= 1, f"reward.judge.num_engines must be >= 1 (got {judge.num_engines})")
    _require(judge.max_new_tokens >= 1, f"reward.judge.max_new_tokens must be >= 1 (got {judge.max_new_tokens})")
    _require(
        judge.max_prompt_tokens >= 1, f"reward.judge.max_prompt_tokens must be >= 1 (got {judge.max_prompt_tokens})"
    )
    if judge.backend is not None:
        _choice(judge.backend, ROLLOUT_BACKENDS, "reward.judge.backend")


def validate_offline(cfg: RLHFConfig) -> None:
    """The offline stages' fields: objective and loss settings, schedule, batch arithmetic in examples."""
    from rlhf.algorithms import LOSS_AGGREGATIONS, PREFERENCE_LOSSES
    from rlhf.workers.objectives import OBJECTIVES

    run, off, policy = cfg.run, cfg.offline, cfg.policy
    OBJECTIVES.check(off.objective, "offline.objective")
    objective = OBJECTIVES.get(off.objective)
    _require(
        not cfg.data.packing or objective.example_kind == "sequence",
        f"data.packing=true packs PT/SFT sequences; offline.objective={off.objective} trains on "
        f"{objective.example_kind} examples: set data.packing=false",
    )
    if objective.model_kind == "reward":
        from rlhf.models.peft_utils import check_scalar_head_peft

        check_scalar_head_peft(cfg.model, f"reward model (offline.objective={off.objective})")
    LOSS_AGGREGATIONS.check(off.loss_agg, "offline.loss_agg")
    PREFERENCE_LOSSES.check(off.preference_loss, "offline.preference_loss")
    _require(off.epochs >= 1, f"offline.epochs must be >= 1 (got {off.epochs})")
    _require(off.max_steps >= 0, f"offline.max_steps must be >= 0 (0: run whole epochs; got {off.max_steps})")
    _require(off.beta > 0, f"offline.beta must be > 0 (got {off.beta})")
    _require(0 <= off.label_smoothing < 0.5, f"offline.label_smoothing must be in [0, 0.5) (got {off.label_smoothing})")
    _require(
        off.label_smoothing == 0 or off.preference_loss == "sigmoid",
        f"offline.label_smoothing={off.label_smoothing} only applies to offline.preference_loss=sigmoid (cDPO), "
        f"not {off.preference_loss!r}; set it to 0",
    )
    _require(off.nll_weight >= 0, f"offline.nll_weight must be >= 0 (got {off.nll_weight})")
    _require(
        off.nll_weight == 0 or off.objective == "dpo",
        f"offline.nll_weight={off.nll_weight} adds an NLL term to the dpo objective only "
        f"(offline.objective={off.objective}); set it to 0",
    )
    _require(off.simpo_gamma_beta_ratio >= 0, "offline.simpo_gamma_beta_ratio must be >= 0")
    _require(off.orpo_lambda >= 0, f"offline.orpo_lambda must be >= 0 (got {off.orpo_lambda})")
    _require(
        off.kto_desirable_weight > 0 and off.kto_undesirable_weight > 0,
        "offline.kto_desirable_weight and offline.kto_undesirable_weight must be > 0",
    )
    _choice(off.reference, ("precompute", "online"), "offline.reference")
    _require(run.keep_last >= 1, f"run.keep_last must be >= 1 (got {run.keep_last})")
    _require(run.eval_every >= 0 and run.save_every >= 0, "run.eval_every and run.save_every must be >= 0")
    _require(run.eval_size >= 0, f"run.eval_size must be >= 0 (0: the whole eval set; got {run.eval_size})")
    _require(
        run.resume in ("auto", "none") or bool(run.resume), "run.resume must be auto, none, or a checkpoint directory"
    )
    _choice(cfg.model.dtype, DTYPES, "model.dtype")
    _require(cfg.model.lora.rank >= 0, f"model.lora.rank must be >= 0 (got {cfg.model.lora.rank})")
    _choice(policy.zero_stage, ZERO_STAGES, "policy.zero_stage")
    _require(policy.num_workers >= 1, f"policy.num_workers must be >= 1 (got {policy.num_workers})")
    _require(policy.micro_batch_size >= 1, f"policy.micro_batch_size must be >= 1 (got {policy.micro_batch_size})")
    _require(policy.optim.lr > 0, f"policy.optim.lr must be > 0 (got {policy.optim.lr})")
    _require(
        policy.offload_params is False or policy.zero_stage == 3, "policy.offload_params needs policy.zero_stage=3"
    )
    per_pass = policy.micro_batch_size * policy.num_workers
    _require(
        policy.train_batch_size >= 1 and policy.train_batch_size % per_pass == 0,
        f"policy.train_batch_size {policy.train_batch_size} examples is not divisible by policy.micro_batch_size "
        f"{policy.micro_batch_size} × policy.num_workers {policy.num_workers} = {per_pass} examples per pass "
        f"(offline stages count a preference pair or a KTO example as one example); pick a multiple of {per_pass}",
    )


WEIGHT_SYNC_TRANSPORTS = ("auto", "collective", "shm")


def weight_sync_transport(cluster: ClusterConfig) -> str:
    """What the trainer's rank 0 asks for at join: auto stays auto (shm if the engines share its Ray node) on CPU."""
    if cluster.weight_sync_transport == "auto" and cluster.device != "cpu":
        return "collective"  # GPU buffers: NCCL, or gloo staging that shm would not beat
    return cluster.weight_sync_transport


def weight_sync_backend(cluster: ClusterConfig) -> str:
    """The transport between the policy's rank 0 and the rollout engines."""
    if cluster.weight_sync_backend != "auto":
        return cluster.weight_sync_backend
    whole_gpus = cluster.policy.num_gpus >= 1 and cluster.rollout.num_gpus >= 1
    return "nccl" if cluster.device == "cuda" and whole_gpus else "gloo"


def engine_resources(rollout_cfg: RolloutConfig, cluster_cfg: ClusterConfig) -> ResourceConfig:
    """One engine's placement bundle: `cluster.rollout`, with tensor_parallel_size whole GPUs for TP > 1."""
    tp, resources = rollout_cfg.tensor_parallel_size, cluster_cfg.rollout
    if tp == 1:
        return resources
    if cluster_cfg.device != "cuda" or rollout_cfg.backend != "vllm":
        raise ConfigError(f"rollout.tensor_parallel_size {tp} needs backend vllm on cluster.device cuda")
    if resources.num_gpus != 1:
        raise ConfigError(
            f"rollout.tensor_parallel_size {tp} gives each engine {tp} whole GPUs; set cluster.rollout.num_gpus=1 "
            f"(the per-shard share), got {resources.num_gpus}"
        )
    return ResourceConfig(num_cpus=resources.num_cpus, num_gpus=tp)


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
