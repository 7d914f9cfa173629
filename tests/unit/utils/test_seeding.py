"""Deterministic mode (run.deterministic): the variables every process gets, and the driver restored after a run."""

from __future__ import annotations

import os

import torch

from rlhf.config import ClusterConfig
from rlhf.utils.ray_session import runtime_env_vars
from rlhf.utils.seeding import DETERMINISTIC_ENV, deterministic_env, deterministic_mode


def test_cuda_fixes_the_cublas_workspace():
    assert deterministic_env("cpu") == {DETERMINISTIC_ENV: "1"}
    assert deterministic_env("cuda") == {DETERMINISTIC_ENV: "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def test_a_deterministic_run_reaches_the_actor_environment_and_is_undone_after(monkeypatch):
    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cluster = ClusterConfig(device="cuda")
    assert DETERMINISTIC_ENV not in runtime_env_vars(cluster)
    with deterministic_mode(True, "cuda") as env:
        assert env == deterministic_env("cuda")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        # what start_group and RolloutGroup hand every actor they start
        actor_env = runtime_env_vars(cluster)
        assert actor_env[DETERMINISTIC_ENV] == "1" and actor_env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    assert DETERMINISTIC_ENV not in os.environ and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_mode(False, "cuda") as env:
        assert env == {} and not torch.are_deterministic_algorithms_enabled()
