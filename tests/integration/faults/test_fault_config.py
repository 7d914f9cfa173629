"""The fault-handling config fields are checked before any Ray work, naming the field and the fix."""

from __future__ import annotations

import pytest

from rlhf.config import validate
from rlhf.errors import ConfigError

from .conftest import compose_config


@pytest.mark.parametrize(
    "override,message",
    [
        ("rollout.max_restarts=-1", r"rollout.max_restarts must be >= 0 \(got -1\)"),
        (
            "cluster.call_timeout_s=300",
            r"cluster.call_timeout_s \(300\) must exceed cluster.collective_timeout_s \(600\)",
        ),
    ],
)
def test_fault_fields_are_validated(tmp_path, override, message):
    cfg = compose_config(tmp_path, override, "cluster.collective_timeout_s=600")
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_defaults_and_zero_timeout_are_valid(tmp_path):
    cfg = compose_config(tmp_path, "cluster.call_timeout_s=0")
    validate(cfg)
    assert compose_config(tmp_path).rollout.max_restarts == 3
