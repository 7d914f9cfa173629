"""The Registry class and the registries of rlhf.algorithms: lookup errors, duplicates, checks."""

import pytest

from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    DISTILLATION_LOSSES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
)
from rlhf.algorithms.registry import Registry
from rlhf.errors import ConfigError

ALL_REGISTRIES = {
    "advantage": (ADVANTAGE_ESTIMATORS, {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}),
    "policy": (POLICY_LOSSES, {"ppo", "gspo"}),
    "kl": (KL_ESTIMATORS, {"k1", "k2", "k3"}),
    "preference": (PREFERENCE_LOSSES, {"sigmoid", "ipo", "hinge"}),
    "distillation": (DISTILLATION_LOSSES, {"forward_kl", "reverse_kl", "jsd"}),
    "aggregation": (
        LOSS_AGGREGATIONS,
        {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"},
    ),
}


@pytest.mark.parametrize("key", ALL_REGISTRIES)
def test_registry_holds_exactly_the_documented_names(key):
    registry, names = ALL_REGISTRIES[key]
    assert set(registry.names()) == names
    assert all(name in registry for name in names) and len(registry) == len(names)


@pytest.mark.parametrize("key", ALL_REGISTRIES)
def test_unknown_name_raises_config_error_listing_every_known_name(key):
    registry, names = ALL_REGISTRIES[key]
    with pytest.raises(ConfigError) as err:
        registry.get("no_such_thing")
    message = str(err.value)
    assert "no_such_thing" in message and registry.kind in message
    assert all(name in message for name in names)


def test_close_matches_come_first():
    with pytest.raises(ConfigError) as err:
        ADVANTAGE_ESTIMATORS.get("grop")
    assert err.value.args[0].split("known: ")[1].startswith("grpo")


def test_check_names_the_config_field():
    POLICY_LOSSES.check("ppo", "algorithm.policy_loss")  # known: no error
    with pytest.raises(ConfigError, match=r"^algorithm\.policy_loss: unknown policy loss 'ppo_clip'"):
        POLICY_LOSSES.check("ppo_clip", "algorithm.policy_loss")


def test_duplicate_registration_raises():
    registry = Registry("widget")

    @registry.register("a")
    def first():
        return 1

    with pytest.raises(ValueError, match="already registered"):

        @registry.register("a")
        def second():
            return 2

    assert registry.get("a") is first
