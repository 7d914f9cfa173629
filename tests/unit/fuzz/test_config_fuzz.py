"""Config fuzzing through the CLI's own path: Hydra compose → rlhf.cli.to_config → validate.

A malformed override may only end as Hydra's own short override error (the CLI prints it without a
traceback) or as our ConfigError naming the field; never as any other exception.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf.cli import CONF_DIR, check_group_overrides, to_config
from rlhf.config import RLHFConfig, check_fields, field_bound, names_where, validate
from rlhf.errors import ConfigError

STAGES = names_where(lambda stage: stage.family != "utility")
OVERRIDE_ERRORS = (HydraException, OmegaConfBaseException)
"""What Hydra raises for an override it cannot parse, apply or convert (shown by hydra.main as one message)."""


def leaf_fields(cls: type = RLHFConfig, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted path, type hint) of every non-dataclass field of the schema; free-form dicts left out."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = (
            [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) is typing.Union
            else [hint]
        )
        if dataclasses.is_dataclass(inner[0]):
            out += leaf_fields(inner[0], f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is not dict:
            out.append((f"{prefix}{f.name}", hint))
    return out


LEAVES = leaf_fields()
NUMERIC = [(path, hint) for path, hint in LEAVES if hint in (int, float, typing.Optional[int], typing.Optional[float])]


def render(value: typing.Any) -> str:
    """A Python value as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.sampled_from([0, -1, 1, 2, 3, 7]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.5, 0.5, 1.0, 1.5, float("nan"), float("inf")]),
        st.text(max_size=12),
        st.sampled_from(["grpo", "auto", "tiny", "none", "vllm", "hf", "cpu", "./nowhere", "x:y"]),
    ),
    lambda children: st.lists(children, max_size=3),
    max_leaves=4,
)
raw_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=16)
override = st.one_of(
    st.tuples(st.sampled_from([p for p, _ in LEAVES]), values).map(lambda kv: f"{kv[0]}={render(kv[1])}"),
    st.tuples(st.sampled_from([p for p, _ in LEAVES]), raw_text).map(lambda kv: f"{kv[0]}={kv[1]}"),
    raw_text,  # anything at all, e.g. "a.b" with no "=", unknown keys, broken quotes
)


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(CONF_DIR, version_base=None):
        validate(to_config(compose("config")))  # pay the imports validate needs once, outside the timed examples
        yield


@functools.cache
def base_config(stage: str):
    return compose("config", overrides=[f"stage={stage}"])


def check(stage: str, overrides: list[str], *, full_compose: bool) -> None:
    """Like the CLI: group pre-check, Hydra compose (Hydra override errors end here), to_config, validate.

    full_compose=False applies the overrides with Hydra's own code to a cached composition of the stage
    (the same parse and OmegaConf merge as compose, minus re-reading the YAML), so more examples fit.
    """
    try:
        check_group_overrides(overrides)
    except ConfigError:
        return
    try:
        if full_compose:
            raw = compose("config", overrides=[f"stage={stage}", *overrides])
        else:
            raw = base_config(stage).copy()
            OmegaConf.set_struct(raw, True)
            parsed = OverridesParser.create().parse_overrides(overrides)
            ConfigLoaderImpl._apply_overrides_to_config(parsed, raw)
    except OVERRIDE_ERRORS:
        return
    try:
        validate(to_config(raw))
    except ConfigError as e:
        assert str(e) and "Traceback" not in str(e)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from(STAGES), overrides=st.lists(override, min_size=1, max_size=3))
def test_random_overrides_raise_only_config_or_override_errors(hydra_conf, stage, overrides):
    check(stage, overrides, full_compose=False)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stage=st.sampled_from(STAGES),
    overrides=st.lists(
        st.one_of(override, st.sampled_from(["stage=null", "cluster=null", "stage=''", "cluster=gpu"])),
        min_size=1,
        max_size=3,
    ),
)
def test_random_overrides_through_full_compose(hydra_conf, stage, overrides):
    check(stage, overrides, full_compose=True)


@pytest.mark.parametrize("stage", ["grpo"])
def test_every_numeric_field_rejects_nan_inf_and_out_of_range(hydra_conf, stage):
    """Each number of the schema, set to NaN, +inf or below its range the way a Hydra override sets it
    (OmegaConf's typed conversion of the string), is a ConfigError naming it, whatever the stage."""
    raw = compose("config", overrides=[f"stage={stage}"])
    checked = 0
    for path, hint in NUMERIC:
        bad = ["-1000001"] if field_bound(path) != "any" else []
        if float in (hint, *typing.get_args(hint)):
            bad += ["nan", "inf"]
        original = OmegaConf.select(raw, path)
        for value in bad:
            try:
                OmegaConf.update(raw, path, value)
            except OmegaConfBaseException:  # "nan" into an int field: Hydra refuses it at compose already
                continue
            with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
                validate(to_config(raw))
            checked += 1
        OmegaConf.update(raw, path, original)
    validate(to_config(raw))  # every field restored: valid again
    assert checked > 100


def test_wrong_python_types_are_config_errors():
    """Configs built in Python (tests, pipelines, plugins) skip Hydra's conversion; check_fields catches them."""
    cfg = RLHFConfig()
    cfg.policy.micro_batch_size = "8"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"policy\.micro_batch_size must be an integer \(got str '8'\)"):
        check_fields(cfg)
    cfg = RLHFConfig()
    cfg.rollout.sampling.stop = "###"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.stop must be a list"):
        check_fields(cfg)
    cfg = RLHFConfig()
    cfg.eval.k = [1, 0]
    with pytest.raises(ConfigError, match=r"eval\.k\[1\] must be >= 1 \(got 0\)"):
        check_fields(cfg)


def test_unknown_names_list_the_known_ones(hydra_conf):
    messages = {}
    for override in [
        "algorithm.advantage=grp",
        "algorithm.policy_loss=ppoo",
        "rollout.backend=sglang",
        "model.peft.method=adapterz",
        "policy.optim.scheduler=linear",
        "run.tracking.wandb_mode=cloud",
    ]:
        with pytest.raises(ConfigError) as info:
            validate(to_config(compose("config", overrides=["stage=grpo", override])))
        messages[override] = str(info.value)
    assert "known: grpo" in messages["algorithm.advantage=grp"]
    assert "known: ppo" in messages["algorithm.policy_loss=ppoo"]
    assert "not one of vllm, hf" in messages["rollout.backend=sglang"]
    assert "not one of none, lora" in messages["model.peft.method=adapterz"]
    assert "not one of constant, cosine" in messages["policy.optim.scheduler=linear"]
    assert "not one of offline, online, disabled" in messages["run.tracking.wandb_mode=cloud"]
    from rlhf.rewards.registry import load_reward_fn

    with pytest.raises(ConfigError, match="unknown reward function 'tiny_wrld'; known: tiny_world"):
        load_reward_fn(to_config(compose("config", overrides=["reward.fn=tiny_wrld"])).reward.fn)


def test_batch_arithmetic_is_shown(hydra_conf):
    cfg = to_config(compose("config", overrides=["stage=grpo", "policy.train_batch_size=48"]))
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value) == (
        "run.rollout_batch_size 16 × rollout.n_samples_per_prompt 8 = 128 sequences per step is not divisible by "
        "policy.train_batch_size 48 (128 / 48 = 2.66667 optimizer steps); pick policy.train_batch_size from "
        "16, 32, 64, 128"
    )
    cfg = to_config(compose("config", overrides=["stage=grpo", "policy.micro_batch_size=3"]))
    with pytest.raises(
        ConfigError, match=r"policy.micro_batch_size 3 × policy.num_workers 2 = 6; pick a multiple of 6"
    ):
        validate(cfg)


@pytest.mark.parametrize("value", ["null", "''", "[null]", "[]", "[grpo,nope]"])
def test_a_group_override_naming_no_config_is_a_config_error(value):
    """Hydra crashes on some of these (`stage=[null]`: a TypeError deep in its defaults list, found by the fuzz above)."""
    with pytest.raises(ConfigError, match=rf"stage={re.escape(repr(value))} is not one of dapo, distill, "):
        check_group_overrides([f"stage={value}"])
    check_group_overrides(["stage=[grpo,ppo]", "stage=grpo", "+experiment=tiny_grpo"])  # known names pass
