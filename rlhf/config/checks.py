"""Checks of the schema that every stage shares: field types and bounds (check_fields, FIELD_BOUNDS), the
cluster, token budgets and frozen groups, batch arithmetic (check_train), the reward numbers, and derived
values (uses_critic, engine_resources, ...). They read the config and the stage registry, nothing above.

`validate` runs the checks every stage shares, then the stage's own (its `validate` in rlhf.stages):
one call, before any cluster work.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Optional

from rlhf.config.schema import ClusterConfig, ResourceConfig, RewardConfig, RLHFConfig, RolloutConfig, TrainConfig
from rlhf.config.stages import get_stage, names_where
from rlhf.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
INFERENCE_ZERO_STAGES = (0, 3)
"""zero_stage of a frozen model (reference, reward model): 0 whole on each actor, 3 partitioned over them."""
DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda")
ROLLOUT_BACKENDS = ("vllm", "hf")
MISMATCH_ACTIONS = ("warn", "stop", "correct")
ROLLOUT_MODES = ("sync", "one_step_off", "async")
"""run.rollout_mode: when the engines generate relative to the update (docs/async.md)."""
OLD_LOGPROBS = ("auto", "recompute")
"""algorithm.old_logprobs: from the update's own forward where exact (auto), or a separate pass."""
PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_choice(value: Any, allowed: tuple, field_name: str) -> None:
    require(value in allowed, f"{field_name}={value!r} is not one of {', '.join(map(str, allowed))}")


def check_train(cfg: TrainConfig, role: str, sequences_per_step: int, arithmetic: str = "sequences per step") -> None:
    """ZeRO and batch arithmetic of one trained role; `arithmetic` says how sequences_per_step was computed."""
    require_choice(cfg.zero_stage, ZERO_STAGES, f"{role}.zero_stage")
    require(cfg.num_workers >= 1, f"{role}.num_workers must be >= 1 (got {cfg.num_workers})")
    require(cfg.micro_batch_size >= 1, f"{role}.micro_batch_size must be >= 1 (got {cfg.micro_batch_size})")
    require(cfg.optim.lr > 0, f"{role}.optim.lr must be > 0 (got {cfg.optim.lr})")
    require(cfg.offload_params is False or cfg.zero_stage == 3, f"{role}.offload_params needs {role}.zero_stage=3")
    per_pass = cfg.micro_batch_size * cfg.num_workers
    require(
        cfg.train_batch_size % per_pass == 0,
        f"{role}.train_batch_size {cfg.train_batch_size} is not divisible by {role}.micro_batch_size "
        f"{cfg.micro_batch_size} × {role}.num_workers {cfg.num_workers} = {per_pass}; "
        f"pick a multiple of {per_pass}",
    )
    fits = [size for size in range(per_pass, sequences_per_step + 1, per_pass) if sequences_per_step % size == 0]
    require(
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
    "cluster.*.threads": ">= 0",
    "cluster.collective_timeout_s": ">= 1",
    "cluster.weight_sync_copy_threads": ">= 1",
    "cluster.nodes.count": ">= 1",
    "cluster.nodes.device_memory_gib": "> 0",
    "cluster.nodes.host_memory_gib": "> 0",
    "reward.remote.max_concurrency": ">= 1",
    "algorithm.kl_horizon": ">= 1",
    "algorithm.max_sampling_rounds": ">= 1",
    "run.keep_last": ">= 1",
    "run.max_staleness": ">= 0",
    "run.async_requests_per_step": ">= 1",
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
    "algorithm.mismatch_kl_threshold": "> 0",
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


def field_bound(path: str) -> str:
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
        require(problem is None, f"{name} must be {problem}")
        items = [(f"{name}[{i}]", f"{key}.#", v) for i, v in enumerate(value)] if isinstance(value, list) else []
        for shown, item_key, item in items or [(name, key, value)]:
            if dataclasses.is_dataclass(item):
                check_fields(item, f"{shown}.", f"{item_key}.")
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                require(math.isfinite(item), f"{shown} must be a finite number (got {item})")
                rule = field_bound(item_key)
                require(_in_bounds(item, rule), f"{shown} must be {_rule_text(rule)} (got {item})")


def _rule_text(rule: str) -> str:
    return rule if rule[0] not in "([" else f"in {rule}"


def check_cluster(cluster: ClusterConfig) -> None:
    """The cluster preset's choices, the same for every stage that starts Ray."""
    require_choice(cluster.device, DEVICES, "cluster.device")
    require_choice(cluster.placement_strategy, PLACEMENT_STRATEGIES, "cluster.placement_strategy")
    require_choice(cluster.weight_sync_backend, ("auto", "gloo", "nccl"), "cluster.weight_sync_backend")
    require_choice(cluster.weight_sync_transport, WEIGHT_SYNC_TRANSPORTS, "cluster.weight_sync_transport")
    check_call_timeout(cluster)


def validate(cfg: RLHFConfig, *, produced: Collection[Path] = ()) -> None:
    """Check every field once, before any cluster work; raise ConfigError saying what to change.

    Machine-independent: a cuda preset validates on a machine without a GPU (what this machine has
    is checked when Ray starts, rlhf.utils.ray_session). Local model and dataset paths must exist,
    except inside the `produced` directories (resolved), which an earlier pipeline step will write.
    The checks here hold for every stage; the stage's own `validate` (rlhf.stages) does the rest.
    """
    stage = get_stage(cfg.stage)
    check_fields(cfg)
    for role in ("policy", "critic"):
        optim = getattr(cfg, role).optim
        require_choice(optim.scheduler, SCHEDULERS, f"{role}.optim.scheduler")
        require(len(optim.betas) == 2, f"{role}.optim.betas must be two numbers [beta1, beta2] (got {optim.betas})")
    require_choice(cfg.run.tracking.wandb_mode, WANDB_MODES, "run.tracking.wandb_mode")
    require(
        stage.family == "rl" or cfg.run.rollout_mode == "sync",
        f"run.rollout_mode={cfg.run.rollout_mode} overlaps generation with the RL update (stage=grpo, ppo, ...); "
        f"stage={cfg.stage} runs its own loop: leave run.rollout_mode=sync",
    )
    require(
        stage.family == "rl" or cfg.stage == "eval" or cfg.agent.env is None,
        f"agent.env={cfg.agent.env} makes rollouts multi-turn in the RL stages (stage=grpo, dr_grpo, rloo, ...) "
        f"and stage=eval; stage={cfg.stage} has no such rollout: leave agent.env unset (null)",
    )
    stage.validate(cfg, produced)


def check_shared(cfg: RLHFConfig) -> None:
    """The cluster preset, token budgets and frozen groups: what every stage's `validate` checks after the
    model/dataset paths and PEFT (rlhf.stages.common.check_inputs)."""
    check_cluster(cfg.cluster)
    _check_token_budget_stage(cfg)
    _check_inference_groups(cfg)


def _check_inference_groups(cfg: RLHFConfig) -> None:
    """zero_stage of the reference and reward-model groups; reference.* sizes only the RL stages' reference."""
    require_choice(cfg.reference.zero_stage, INFERENCE_ZERO_STAGES, "reference.zero_stage")
    require_choice(cfg.reward.zero_stage, INFERENCE_ZERO_STAGES, "reward.zero_stage")
    require(
        get_stage(cfg.stage).reference_group or (cfg.reference.num_workers == 1 and cfg.reference.zero_stage == 0),
        f"reference.num_workers={cfg.reference.num_workers} / reference.zero_stage={cfg.reference.zero_stage} "
        f"shape the RL stages' reference group; stage={cfg.stage} runs one whole reference actor: leave them at 1 / 0",
    )


def check_shards(rows: int, arithmetic: str, num_workers: int, field_name: str) -> None:
    """`rows` per step split into num_workers equal data-parallel shards (every frozen-model actor scores one)."""
    require(
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


def check_call_timeout(cluster: ClusterConfig) -> None:
    require(
        cluster.call_timeout_s == 0 or cluster.call_timeout_s > cluster.collective_timeout_s > 0,
        f"cluster.call_timeout_s ({cluster.call_timeout_s}) must exceed cluster.collective_timeout_s "
        f"({cluster.collective_timeout_s}), so a stuck collective reports from inside the rank first; or be 0 (no limit)",
    )


def _token_budgets(cfg: RLHFConfig) -> dict[str, Optional[int]]:
    """Each role's max_tokens_per_micro_batch."""
    return {
        "policy": cfg.policy.max_tokens_per_micro_batch,
        "critic": cfg.critic.max_tokens_per_micro_batch,
        "reference": cfg.reference.max_tokens_per_micro_batch,
        "reward": cfg.reward.max_tokens_per_micro_batch,
    }


def _check_token_budget_stage(cfg: RLHFConfig) -> None:
    """Token budgets only where the stage runs the role (its Stage.token_budget_roles): policy, critic and
    reference in the RL stages; the reward model wherever the reward pipeline scores samples (RL,
    online_dpo, generate, eval)."""
    stage = get_stage(cfg.stage)
    budgets = [
        f"{role}.max_tokens_per_micro_batch"
        for role, budget in _token_budgets(cfg).items()
        if budget and role not in stage.token_budget_roles
    ]
    if budgets:
        trained = names_where(lambda s: "policy" in s.token_budget_roles)
        scoring = names_where(lambda s: "reward" in s.token_budget_roles and "policy" not in s.token_budget_roles)
        raise ConfigError(
            f"{', '.join(budgets)}: token-budget micro-batches are for the RL stages ({', '.join(trained)}; the "
            f"reward model's also for {', '.join(scoring)}), not stage={cfg.stage}; "
            "unset it (PT/SFT pack examples with data.packing=true)"
        )
    if cfg.reward.max_tokens_per_micro_batch and "policy" not in stage.token_budget_roles:
        check_token_budgets(cfg, roles=("reward",))  # the RL stages check every budget after their arithmetic


def check_token_budgets(cfg: RLHFConfig, roles: Collection[str] = ("policy", "critic", "reference", "reward")) -> None:
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
        require(
            not budget or budget >= longest,
            f"{role}.max_tokens_per_micro_batch={budget} cannot hold the longest sequence, data.max_prompt_length "
            f"{cfg.data.max_prompt_length} + {name} {new_tokens} = {longest} tokens; set it to at least {longest} "
            "(or 0 for padded micro-batches)",
        )


REWARD_NORM_MODES = ("none", "running", "batch")


def check_reward(reward: RewardConfig) -> None:
    """Numbers and choices of the reward sources; functions, regexes and templates are checked by
    rlhf.rewards.pipeline.build_reward_pipeline (also before Ray starts)."""
    require(
        bool(reward.fn or reward.components or reward.model_path or reward.remote.url or reward.judge.model_path),
        "no reward: set reward.fn (a rule reward), reward.components, reward.model_path (a reward model), "
        "reward.remote.url (a reward server) and/or reward.judge.model_path (an LLM judge)",
    )
    for i, component in enumerate(reward.components):
        require(bool(component.fn), f"reward.components[{i}].fn is required (a registered name or pkg.module:function)")
    require(reward.num_workers >= 1, f"reward.num_workers must be >= 1 (got {reward.num_workers})")
    require_choice(reward.model_norm.mode, REWARD_NORM_MODES, "reward.model_norm.mode")
    clip = reward.model_norm.clip
    require(clip is None or clip > 0, f"reward.model_norm.clip must be > 0 or null (got {clip})")
    remote = reward.remote
    require(remote.batch_size >= 1, f"reward.remote.batch_size must be >= 1 (got {remote.batch_size})")
    require(remote.max_concurrency >= 1, f"reward.remote.max_concurrency must be >= 1 (got {remote.max_concurrency})")
    require(remote.timeout_s > 0, f"reward.remote.timeout_s must be > 0 (got {remote.timeout_s})")
    require(remote.max_retries >= 0, f"reward.remote.max_retries must be >= 0 (got {remote.max_retries})")
    require(remote.backoff_s >= 0, f"reward.remote.backoff_s must be >= 0 (got {remote.backoff_s})")
    judge = reward.judge
    require(
        judge.score_max > judge.score_min,
        f"reward.judge.score_max {judge.score_max} must be > reward.judge.score_min {judge.score_min}",
    )
    require(judge.num_engines >= 1, f"reward.judge.num_engines must be >= 1 (got {judge.num_engines})")
    require(judge.max_new_tokens >= 1, f"reward.judge.max_new_tokens must be >= 1 (got {judge.max_new_tokens})")
    require(
        judge.max_prompt_tokens >= 1, f"reward.judge.max_prompt_tokens must be >= 1 (got {judge.max_prompt_tokens})"
    )
    if judge.backend is not None:
        require_choice(judge.backend, ROLLOUT_BACKENDS, "reward.judge.backend")


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


def role_threads(resources: ResourceConfig, cluster_cfg: ClusterConfig) -> int:
    """OMP/torch threads of one actor of a role: its `threads`, or cluster.threads_per_worker when 0."""
    return resources.threads or cluster_cfg.threads_per_worker


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


def off_policy(cfg: RLHFConfig) -> bool:
    """The engines generate while the policy trains (run.rollout_mode other than sync): samples lag the policy."""
    return cfg.run.rollout_mode != "sync"


def rollout_is_mode(cfg: RLHFConfig) -> str:
    """algorithm.rollout_is with auto resolved: truncate in the off-policy rollout modes, else off."""
    mode = cfg.algorithm.rollout_is
    if mode == "auto":
        return "truncate" if off_policy(cfg) else "off"
    return mode


def check_rollout_mode(cfg: RLHFConfig) -> None:
    """run.rollout_mode against the layout: overlapping generation with training needs resources of its own."""
    run, cluster = cfg.run, cfg.cluster
    require_choice(run.rollout_mode, ROLLOUT_MODES, "run.rollout_mode")
    if not off_policy(cfg):
        return
    require(
        run.max_staleness >= 1,
        f"run.rollout_mode={run.rollout_mode} trains samples generated while the policy trained on earlier ones, so "
        f"they are at least one update old: run.max_staleness must be >= 1 (got {run.max_staleness}), or use "
        "run.rollout_mode=sync",
    )
    if run.rollout_mode == "async":
        require(
            run.async_requests_per_step <= run.rollout_batch_size,
            f"run.async_requests_per_step={run.async_requests_per_step} cuts each step's {run.rollout_batch_size} "
            "prompts (run.rollout_batch_size) into that many engine requests: it must be at most "
            "run.rollout_batch_size",
        )
    require(
        not cfg.rollout.enable_sleep,
        f"run.rollout_mode={run.rollout_mode} generates while the policy trains, but rollout.enable_sleep=true puts "
        "the engines to sleep so the trainer can use their GPU memory (a colocated layout, as in "
        "cluster=single_gpu): use run.rollout_mode=sync there, or give the engines GPUs of their own "
        "(cluster=multi_node) with rollout.enable_sleep=false",
    )
    if cluster.device == "cuda":
        shared = [
            f"cluster.{role}.num_gpus={res.num_gpus:g}"
            for role, res in (("policy", cluster.policy), ("rollout", cluster.rollout))
            if res.num_gpus < 1
        ]
        require(
            not shared,
            f"run.rollout_mode={run.rollout_mode} runs the engines and the policy at the same time, so each needs "
            f"whole GPUs of its own; {', '.join(shared)} shares a GPU (a colocated layout, which stays "
            "run.rollout_mode=sync). Set num_gpus >= 1 for both (cluster=multi_node does), or use run.rollout_mode=sync",
        )


def one_update_per_batch(cfg: RLHFConfig) -> bool:
    """Each RL batch gets exactly one optimizer step of the policy: its update's forward is the old policy."""
    sequences = cfg.run.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    return cfg.algorithm.ppo_epochs == 1 and cfg.policy.train_batch_size == sequences


def uses_reference(cfg: RLHFConfig) -> bool:
    """The reference model is only needed when a KL term is on."""
    return cfg.algorithm.kl_coef > 0


def register_configs() -> None:
    """Register the root schema so conf/config.yaml is checked against the dataclasses."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlhf_schema", node=RLHFConfig)
