"""The offline stages (pt, sft, rm and the DPO family, kto): one objective over a fixed dataset
(rlhf.trainers.offline), offline.objective naming it (rlhf.workers.objectives.OBJECTIVES)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import DTYPES, ZERO_STAGES, RLHFConfig, Stage, register_stage, require, require_choice
from rlhf.stages.common import check_inputs

NAMES = ("pt", "sft", "rm", "dpo", "ipo", "simpo", "orpo", "kto")


def validate(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    check_inputs(cfg, produced)
    validate_offline(cfg)


def validate_offline(cfg: RLHFConfig) -> None:
    """The offline stages' fields: objective and loss settings, schedule, batch arithmetic in examples."""
    from rlhf.algorithms import LOSS_AGGREGATIONS, PREFERENCE_LOSSES
    from rlhf.workers.objectives import OBJECTIVES

    run, off, policy = cfg.run, cfg.offline, cfg.policy
    OBJECTIVES.check(off.objective, "offline.objective")
    objective = OBJECTIVES.get(off.objective)
    require(
        not cfg.data.packing or objective.example_kind == "sequence",
        f"data.packing=true packs PT/SFT sequences; offline.objective={off.objective} trains on "
        f"{objective.example_kind} examples: set data.packing=false",
    )
    if objective.model_kind == "reward":
        from rlhf.models.peft_methods import check_scalar_head_peft

        check_scalar_head_peft(cfg.model, f"reward model (offline.objective={off.objective})")
    LOSS_AGGREGATIONS.check(off.loss_agg, "offline.loss_agg")
    PREFERENCE_LOSSES.check(off.preference_loss, "offline.preference_loss")
    require(off.epochs >= 1, f"offline.epochs must be >= 1 (got {off.epochs})")
    require(off.max_steps >= 0, f"offline.max_steps must be >= 0 (0: run whole epochs; got {off.max_steps})")
    require(off.beta > 0, f"offline.beta must be > 0 (got {off.beta})")
    require(0 <= off.label_smoothing < 0.5, f"offline.label_smoothing must be in [0, 0.5) (got {off.label_smoothing})")
    require(
        off.label_smoothing == 0 or off.preference_loss == "sigmoid",
        f"offline.label_smoothing={off.label_smoothing} only applies to offline.preference_loss=sigmoid (cDPO), "
        f"not {off.preference_loss!r}; set it to 0",
    )
    require(off.nll_weight >= 0, f"offline.nll_weight must be >= 0 (got {off.nll_weight})")
    require(
        off.nll_weight == 0 or off.objective == "dpo",
        f"offline.nll_weight={off.nll_weight} adds an NLL term to the dpo objective only "
        f"(offline.objective={off.objective}); set it to 0",
    )
    require(off.simpo_gamma_beta_ratio >= 0, "offline.simpo_gamma_beta_ratio must be >= 0")
    require(off.orpo_lambda >= 0, f"offline.orpo_lambda must be >= 0 (got {off.orpo_lambda})")
    require(
        off.kto_desirable_weight > 0 and off.kto_undesirable_weight > 0,
        "offline.kto_desirable_weight and offline.kto_undesirable_weight must be > 0",
    )
    require_choice(off.reference, ("precompute", "online"), "offline.reference")
    require(run.keep_last >= 1, f"run.keep_last must be >= 1 (got {run.keep_last})")
    require(run.eval_every >= 0 and run.save_every >= 0, "run.eval_every and run.save_every must be >= 0")
    require(run.eval_size >= 0, f"run.eval_size must be >= 0 (0: the whole eval set; got {run.eval_size})")
    require(
        run.resume in ("auto", "none") or bool(run.resume), "run.resume must be auto, none, or a checkpoint directory"
    )
    require_choice(cfg.model.dtype, DTYPES, "model.dtype")
    require(cfg.model.lora.rank >= 0, f"model.lora.rank must be >= 0 (got {cfg.model.lora.rank})")
    require_choice(policy.zero_stage, ZERO_STAGES, "policy.zero_stage")
    require(policy.num_workers >= 1, f"policy.num_workers must be >= 1 (got {policy.num_workers})")
    require(policy.micro_batch_size >= 1, f"policy.micro_batch_size must be >= 1 (got {policy.micro_batch_size})")
    require(policy.optim.lr > 0, f"policy.optim.lr must be > 0 (got {policy.optim.lr})")
    require(policy.offload_params is False or policy.zero_stage == 3, "policy.offload_params needs policy.zero_stage=3")
    per_pass = policy.micro_batch_size * policy.num_workers
    require(
        policy.train_batch_size >= 1 and policy.train_batch_size % per_pass == 0,
        f"policy.train_batch_size {policy.train_batch_size} examples is not divisible by policy.micro_batch_size "
        f"{policy.micro_batch_size} × policy.num_workers {policy.num_workers} = {per_pass} examples per pass "
        f"(offline stages count a preference pair or a KTO example as one example); pick a multiple of {per_pass}",
    )


def check_final_eval(cfg: RLHFConfig) -> None:
    """run.final_eval samples the trained causal LM: not for an objective that trains a reward model."""
    from rlhf.workers.objectives import OBJECTIVES

    model_kind = OBJECTIVES.get(cfg.offline.objective).model_kind
    require(
        model_kind == "causal_lm",
        f"run.final_eval samples from the trained causal LM, but stage={cfg.stage} trains a {model_kind} "
        "model; set run.final_eval=false",
    )


def run(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.offline import run_offline

    return run_offline(cfg)


def plan_roles(cfg: RLHFConfig, shape_of) -> list:
    from rlhf.plan import offline_roles

    return offline_roles(cfg, shape_of)


register_stage(
    Stage(
        names=NAMES,
        summary="offline training on a dataset: pre-training, SFT, reward model, DPO/IPO/SimPO/ORPO, KTO",
        family="offline",
        validate=validate,
        run=run,
        plan_roles=plan_roles,
        check_final_eval=check_final_eval,
    )
)
