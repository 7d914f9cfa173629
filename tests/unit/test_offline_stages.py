"""Every offline stage file composes into a valid config that picks its objective; bad values raise
ConfigError with what to change, before any data is read or Ray starts (no Ray here)."""

from __future__ import annotations

import pytest

from rlhf.config import get_stage, validate
from rlhf.errors import ConfigError, DataError
from rlhf.workers.objectives import OBJECTIVES


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


EXPECTED = {
    "pt": ("sft", None),
    "sft": ("sft", None),
    "rm": ("reward", None),
    "dpo": ("dpo", "sigmoid"),
    "ipo": ("dpo", "ipo"),
    "simpo": ("simpo", None),
    "orpo": ("orpo", None),
    "kto": ("kto", None),
}


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_stage_composes_and_validates(stage):
    assert get_stage(stage).family == "offline"
    cfg = compose(f"stage={stage}")
    objective, loss = EXPECTED[stage]
    assert cfg.stage == stage and cfg.offline.objective == objective
    if loss:
        assert cfg.offline.preference_loss == loss
    validate(cfg)
    # reference-free stages start no reference model
    assert OBJECTIVES.get(objective).needs_reference == (objective in ("dpo", "kto"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        # 8 examples per pass (micro 4 × 2 ranks) do not divide 12
        (
            ["stage=dpo", "policy.train_batch_size=12", "policy.micro_batch_size=4"],
            "policy.train_batch_size 12 examples is not divisible by policy.micro_batch_size 4 × "
            "policy.num_workers 2 = 8",
        ),
        (["stage=dpo", "offline.preference_loss=sigmod"], "offline.preference_loss: unknown preference loss 'sigmod'"),
        (["stage=ipo", "offline.label_smoothing=0.1"], "only applies to offline.preference_loss=sigmoid"),
        (["stage=sft", "offline.objective=sftt"], "offline.objective: unknown offline objective 'sftt'; known: sft"),
        (["stage=kto", "offline.beta=0"], "offline.beta must be > 0"),
        (
            ["stage=dpo", "offline.reference=sometimes"],
            "offline.reference='sometimes' is not one of precompute, online",
        ),
        (["stage=dpo", "data.packing=true"], "data.packing=true packs PT/SFT sequences"),
        (
            ["stage=rm", "model.peft.method=prefix_tuning"],
            "model.peft.method=prefix_tuning cannot train the reward model (offline.objective=reward): allowed there "
            "are none, lora, ia3, loha, lokr, bitfit, freeze",
        ),
        (["stage=sft", "offline.epochs=0"], "offline.epochs must be >= 1"),
        (["stage=dpo", "offline.nll_weight=-1"], "offline.nll_weight must be >= 0"),
        (["stage=simpo", "offline.nll_weight=1"], "adds an NLL term to the dpo objective only"),
        (["stage=online_dpo", "offline.nll_weight=1"], "reads its NLL weight from online_dpo.nll_weight"),
    ],
)
def test_bad_values_raise_config_error(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose(*overrides))
    assert message in str(error.value)


@pytest.mark.parametrize("peft", [["model.peft.method=lora", "model.lora.rank=4"], ["model.peft.method=bitfit"]])
def test_reward_model_takes_the_scalar_head_peft_methods(peft):
    validate(compose("stage=rm", *peft))


def test_too_little_data_for_one_step_raises_before_ray(monkeypatch):
    from rlhf.trainers import offline

    monkeypatch.setattr(offline, "OfflineTrainer", None)  # would fail loudly if reached
    cfg = compose("stage=sft", "data.mixture=[{path:'tiny:sft:train',max_rows:4}]", "policy.train_batch_size=16")
    with pytest.raises(DataError, match="fewer than one batch of 16"):
        offline.prepare_offline(cfg)


def test_final_eval_of_a_reward_model_is_refused_before_training(monkeypatch):
    """run.final_eval samples a causal LM: stage=rm trains a reward model, so the CLI stops before the stage runs."""
    from rlhf.cli import train
    from rlhf.trainers import offline

    monkeypatch.setattr(offline, "run_offline", None)  # would fail loudly if reached
    cfg = compose("stage=rm", "run.final_eval=true")
    validate(cfg)
    with pytest.raises(ConfigError, match="stage=rm trains a reward model; set run.final_eval=false"):
        train(cfg)
