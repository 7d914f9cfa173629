"""Every RL stage file composes into a valid config that picks the algorithm it names (no Ray)."""

from __future__ import annotations

import pytest

from rlhf.config import names_where, validate
from rlhf.errors import ConfigError


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from rlhf.cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return OmegaConf.to_object(hydra_compose(config_name="config", overrides=list(overrides)))
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("stage", names_where(lambda stage: stage.family == "rl"))
def test_stage_composes_and_validates(stage):
    cfg = compose(f"stage={stage}")
    assert cfg.stage == stage
    validate(cfg)


def test_dapo_stage_is_dapo():
    algo = compose("stage=dapo").algorithm
    assert (algo.clip_low, algo.clip_high) == (0.2, 0.28)  # DAPO §3.1 clip-higher
    assert algo.loss_agg == "token_mean" and algo.dynamic_sampling and algo.kl_coef == 0.0
    assert algo.max_sampling_rounds >= 1


def test_gspo_stage_is_gspo():
    algo = compose("stage=gspo").algorithm
    assert algo.policy_loss == "gspo" and algo.loss_agg == "seq_mean_token_mean"
    assert (algo.clip_low, algo.clip_high) == (3e-4, 4e-4)  # GSPO §5.1


def test_reinforce_pp_baseline_stage():
    algo = compose("stage=reinforce_pp_baseline").algorithm
    assert algo.advantage == "reinforce_pp_baseline" and not algo.use_kl_loss


def test_dynamic_sampling_needs_groups():
    cfg = compose("stage=dapo", "rollout.n_samples_per_prompt=1", "algorithm.advantage=reinforce_pp")
    with pytest.raises(ConfigError, match="dynamic_sampling .*rollout.n_samples_per_prompt >= 2 \\(got 1\\)"):
        validate(cfg)


def test_max_sampling_rounds_must_be_positive():
    cfg = compose("stage=dapo", "algorithm.max_sampling_rounds=0")
    with pytest.raises(ConfigError, match="algorithm.max_sampling_rounds must be >= 1 \\(got 0\\)"):
        validate(cfg)


def test_token_budgets_must_hold_the_longest_sequence():
    validate(compose("stage=ppo", "policy.max_tokens_per_micro_batch=80", "critic.max_tokens_per_micro_batch=0"))
    cfg = compose(
        "stage=grpo",
        "data.max_prompt_length=64",
        "rollout.sampling.max_new_tokens=16",
        "reference.max_tokens_per_micro_batch=79",
    )
    with pytest.raises(
        ConfigError, match=r"reference.max_tokens_per_micro_batch=79 cannot hold .* = 80 tokens; set it"
    ):
        validate(cfg)


def test_token_budgets_are_for_the_rl_stages():
    cfg = compose("stage=sft", "data.train=tiny:sft:train", "policy.max_tokens_per_micro_batch=512")
    with pytest.raises(
        ConfigError, match=r"policy.max_tokens_per_micro_batch: token-budget .*not stage=sft.*data.packing"
    ):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"^reference.max_tokens_per_micro_batch: token-budget .*stage=online_dpo"):
        validate(compose("stage=online_dpo", "reference.max_tokens_per_micro_batch=512"))


def test_the_reward_budget_serves_every_stage_that_scores_samples():
    """online_dpo (and generate/eval) score samples with the reward pipeline, whose reward model packs too;
    its budget also holds an evaluation sample (rollout.eval_sampling), which the reward may score."""
    validate(compose("stage=online_dpo", "reward.max_tokens_per_micro_batch=512"))
    cfg = compose(
        "stage=online_dpo",
        "data.max_prompt_length=64",
        "rollout.sampling.max_new_tokens=16",
        "rollout.eval_sampling.max_new_tokens=32",
        "reward.max_tokens_per_micro_batch=80",
    )
    with pytest.raises(ConfigError, match=r"eval_sampling.max_new_tokens 32 = 96 tokens; set it to at least 96"):
        validate(cfg)


def test_sharded_reference_and_reward_model_validate():
    cfg = compose("stage=ppo", "reference.num_workers=2", "reference.zero_stage=3", "reward.zero_stage=3")
    validate(cfg)
    assert (cfg.reference.num_workers, cfg.reference.zero_stage, cfg.reward.zero_stage) == (2, 3, 3)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["reference.zero_stage=2"], r"reference.zero_stage=2 is not one of 0, 3"),
        (["reward.zero_stage=1"], r"reward.zero_stage=1 is not one of 0, 3"),
        (["reference.num_workers=0"], r"reference.num_workers must be >= 1 \(got 0\)"),
        (["reference.num_workers=3"], r"= 16 rows per step cannot be split into reference.num_workers 3 equal shards"),
        (
            ["reward.model_path=tiny", "reward.num_workers=3"],
            r"= 16 rows per step cannot be split into reward.num_workers 3 equal shards",
        ),
        (["stage=dpo", "reference.zero_stage=3"], r"stage=dpo runs one whole reference actor"),
    ],
)
def test_bad_reference_or_reward_group_is_refused(overrides, message):
    # 4 prompts × 4 samples = 16 rows per step, one optimizer step of 16
    sizes = ["run.rollout_batch_size=4", "rollout.n_samples_per_prompt=4"]
    sizes += ["policy.train_batch_size=16", "critic.train_batch_size=16"]
    cfg = compose("stage=ppo", *sizes, *overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("algorithm.mismatch_action=fix", r"algorithm.mismatch_action='fix' is not one of warn, stop, correct"),
        ("algorithm.rollout_is=clip", r"algorithm.rollout_is='clip' is not one of auto, truncate, mask, off"),
        ("algorithm.rollout_is_cap=0", r"algorithm.rollout_is_cap"),
        ("algorithm.mismatch_kl_threshold=0", r"algorithm.mismatch_kl_threshold"),
    ],
)
def test_bad_rollout_contract_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose("stage=grpo", override))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["run.rollout_mode=async_please"], r"run.rollout_mode='async_please' is not one of sync, one_step_off, async"),
        (["run.rollout_mode=one_step_off", "run.max_staleness=0"], r"run.max_staleness must be >= 1 \(got 0\)"),
        (["run.rollout_mode=async", "run.max_staleness=0"], r"run.max_staleness must be >= 1 \(got 0\)"),
        (["run.max_staleness=-1"], r"run.max_staleness"),
        (["run.rollout_mode=async", "run.async_requests_per_step=0"], r"run.async_requests_per_step"),
        (
            ["run.rollout_mode=async", "run.rollout_batch_size=4", "run.async_requests_per_step=5"],
            r"run.async_requests_per_step=5 cuts each step's 4 prompts .* at most run.rollout_batch_size",
        ),
        (["run.rollout_mode=one_step_off", "cluster=single_gpu"], r"rollout.enable_sleep=true .*colocated"),
        (["run.rollout_mode=async", "cluster=single_gpu"], r"run.rollout_mode=async .*rollout.enable_sleep=true"),
        (
            ["run.rollout_mode=async", "cluster=single_gpu", "rollout.enable_sleep=false"],
            r"cluster.policy.num_gpus=0.2, cluster.rollout.num_gpus=0.3 shares a GPU",
        ),
        (
            ["run.rollout_mode=one_step_off", "cluster=single_gpu", "rollout.enable_sleep=false"],
            r"cluster.policy.num_gpus=0.2, cluster.rollout.num_gpus=0.3 shares a GPU \(a colocated layout",
        ),
    ],
)
def test_off_policy_modes_refuse_colocated_layouts_and_bad_bounds(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose("stage=grpo", *overrides))


def test_off_policy_modes_validate_on_disaggregated_layouts():
    from rlhf.config import rollout_is_mode

    for cluster in ("cpu_debug", "multi_node"):
        for mode in ("one_step_off", "async"):
            cfg = compose("stage=grpo", f"cluster={cluster}", f"run.rollout_mode={mode}", "run.max_staleness=2")
            validate(cfg)
            assert rollout_is_mode(cfg) == "truncate"  # off-policy correction on by default
    assert rollout_is_mode(compose("stage=grpo")) == "off"
    assert rollout_is_mode(compose("stage=grpo", "run.rollout_mode=one_step_off", "algorithm.rollout_is=off")) == "off"


@pytest.mark.parametrize("stage", ["online_dpo", "sft", "distill"])
@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_the_rollout_mode_is_for_the_rl_stages(stage, mode):
    with pytest.raises(ConfigError, match=rf"run.rollout_mode={mode} .*stage={stage} runs its own loop"):
        validate(compose(f"stage={stage}", f"run.rollout_mode={mode}"))
