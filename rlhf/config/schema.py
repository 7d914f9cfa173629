"""The schema: every config dataclass, each field with its default and one-line doc.

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

from dataclasses import dataclass, field
from typing import Any, Optional


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
    rollout_is: str = "auto"
    """Importance weights w = exp(old - rollout) between the trainer's old logprobs and the engine's (the policy that
    sampled) on every policy-loss token: truncate (TIS, min(w, rollout_is_cap)), mask (MIS, tokens with w outside
    [1/cap, cap] leave the loss), off, or auto: off with run.rollout_mode=sync, truncate in the off-policy modes
    (rlhf.algorithms.compute_rollout_is_weights). Metrics policy/is_weight_mean, policy/is_bounded_frac."""
    rollout_is_cap: float = 2.0
    """The bound of rollout_is (Yao et al. 2025 and verl use 2)."""
    mismatch_kl_threshold: float = 0.1
    """The rollout/trainer contract: per-token KL(engine || trainer) on the engine's samples (metric
    rollout/mismatch_kl, rlhf.algorithms.rollout_mismatch) above this is a broken contract. On a run's first step
    both sides hold the same weights, so it is an error there whatever mismatch_action says; later, mismatch_action.
    Float noise is ~1e-10 (float32 CPU) to ~1e-3 (bf16 engine vs float32 trainer)."""
    mismatch_action: str = "warn"
    """Above mismatch_kl_threshold after the first step: warn (a warning each such step), stop (an error), or
    correct (rollout_is=truncate from then on, with a warning; when importance weights are on already, a warning)."""
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
    old_logprobs: str = "auto"
    """Where the old policy's logprobs come from: auto (from the update's own forward, detached, when that forward is
    the old policy's: ppo_epochs 1, one optimizer step per batch (policy.train_batch_size = rollout_batch_size ×
    n_samples_per_prompt), no KL in the reward, no dropout in the policy; else a separate pass, as TRL does too) or
    recompute (always a separate no-grad pass before the update)."""
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
    threads: int = 0
    """OMP/torch threads per actor of this role; 0: cluster.threads_per_worker. On CPU with
    run.rollout_mode=one_step_off the policy may take more threads than its share of cores: it has them
    to itself once the engines finish generating (benchmarks/async_rl.py)."""


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
    weight_sync_copy_threads: int = 2
    """Threads the trainer's rank 0 copies weights into the shared-memory segment with (transport shm), a
    gathered bucket at a time: one core copies at about two thirds of a 2-core machine's memory bandwidth
    (benchmarks/weight_sync.py). The other roles wait during a sync; 1: copy on the calling thread only."""
    reuse_worker_processes: bool = True
    """In a local CPU cluster that `rlhf` or `rlhf-pipeline` keeps between runs (a stage and its final
    evaluation, the steps of a recipe): the next run's worker group of the same shape builds in the processes of
    the last one's, cleaned of it, instead of starting new ones (~6 s of CPU per rank; rlhf.workers.host).
    false: every group starts its own processes."""
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
    rollout_mode: str = "sync"
    """sync: each step generates, then trains, then syncs (the engines idle while the policy trains, and back).
    one_step_off: the engines generate step k+1's batch with the weights of step k while the policy trains on
    batch k, and the weights sync at the step boundary; every sample is one update old when trained, corrected by
    algorithm.rollout_is (auto: truncate). async: the engines work through the coming steps' prompts request by
    request while the policy trains, as far ahead as run.max_staleness allows; weight syncs land between requests.
    The off-policy modes need engines and trainers on their own resources (no rollout.enable_sleep, whole GPUs each
    on cuda). docs/async.md."""
    max_staleness: int = 1
    """Off-policy modes: how many policy updates older than the policy that trains on it a sample may be (its
    version tag against the policy's); one_step_off's are 1, async sends a request only while its samples will be
    within it. A sample past it stops the run (a bug, not noise)."""
    async_requests_per_step: int = 4
    """run.rollout_mode=async: each step's prompts reach the engines in this many requests (contiguous slices). A
    weight sync waits for the requests the engines are working on (at most two), so smaller requests let new weights
    land sooner, and bigger ones batch better on the engines."""
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
class AgentConfig:
    """Multi-turn (agentic) rollouts: the policy acts in an environment over several turns (docs/agents.md)."""

    env: Optional[str] = None
    """An environment by registered name (calculator, python) or "pkg.module:Class", built per trajectory from its
    prompt row; None: one prompt, one completion."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's constructor (on the command line: +agent.env_kwargs.NAME=VALUE)."""
    max_turns: int = 4
    """Model turns per trajectory."""
    max_tokens: int = 256
    """Response tokens per trajectory, model and environment together (the last turn is cut to fit)."""
    step_timeout_s: float = 30.0
    """Seconds an environment's reset or step may take; past it the turn ends with an error observation."""
    observation_template: str = "auto"
    """How an observation is written into the trajectory, tokenized once. "chat": a tool turn of the tokenizer's
    chat template (rlhf.data.tokenizer.tool_turn_template; an error if the template has no tool role); a string with
    "{observation}": exactly that, e.g. "{observation}" for the bare text (the tiny-world tool task); "auto": "chat"
    when the chat template has a tool role, else the bare text."""


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
    agent: AgentConfig = field(default_factory=AgentConfig)
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
