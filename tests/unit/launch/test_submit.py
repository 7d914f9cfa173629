"""launch/submit.py builds the right `ray job submit` command line (checked with --dry-run)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SUBMIT = REPO / "launch" / "submit.py"


def dry_run(*args: str, env: dict[str, str] | None = None, script: Path = SUBMIT) -> list[str]:
    cmd = [sys.executable, str(script)] if script.suffix == ".py" else [str(script)]
    proc = subprocess.run(
        [*cmd, "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAY": "ray", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def split(cmd: list[str]) -> tuple[list[str], dict, list[str]]:
    """(ray job submit options, runtime env, entrypoint)."""
    cut = cmd.index("--")
    options, entrypoint = cmd[:cut], cmd[cut + 1 :]
    runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
    return options, runtime_env, entrypoint


def test_default_command_is_a_cpu_job_of_this_repo():
    options, runtime_env, entrypoint = split(dry_run("run.total_steps=2", "--address", "http://head:8265"))
    assert options[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    assert "--no-wait" not in options
    assert entrypoint == ["python", "-m", "rlhf", "run.total_steps=2"]
    assert runtime_env["working_dir"] == str(REPO)
    for heavy in (".git", ".venv", "outputs"):
        assert heavy in runtime_env["excludes"]
    assert runtime_env["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert runtime_env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "pip" not in runtime_env


def test_overrides_pass_through_verbatim_after_double_dash():
    weird = [
        "-m",
        "algorithm.kl_coef=0.0,0.01",
        "run.output_dir=/shared/runs/kl ${algorithm.kl_coef}",
        "+extra.note='a b'",
    ]
    options, _, entrypoint = split(dry_run("--no-wait", "--submission-id", "job1", "--", *weird))
    assert entrypoint == ["python", "-m", "rlhf", *weird]
    assert "--no-wait" in options
    assert options[options.index("--submission-id") + 1] == "job1"


@pytest.mark.parametrize(
    "overrides,device",
    [
        ([], "cpu"),
        (["cluster=cpu_debug"], "cpu"),
        (["cluster=single_gpu"], "cuda"),
        (["cluster=multi_node"], "cuda"),
        (["cluster=multi_node", "cluster.device=cpu"], "cpu"),
    ],
)
def test_device_env_follows_the_cluster_preset(overrides, device):
    _, runtime_env, _ = split(dry_run("--", *overrides))
    assert ("DS_ACCELERATOR" in runtime_env["env_vars"]) == (device == "cpu")


def test_options_reach_the_runtime_env_and_ray(monkeypatch):
    options, runtime_env, entrypoint = split(
        dry_run(
            "--device", "cuda", "--env", "WANDB_MODE=offline", "--env", "MY_TOKEN", "--pip", "wandb==0.18.0",
            "--exclude", "data/", "--python", "/opt/venv/bin/python -X faulthandler",
            "--entrypoint-num-gpus", "1", "--working-dir", str(REPO / "launch"),
            env={"MY_TOKEN": "t0k"},
        )
    )  # fmt: skip
    assert runtime_env["env_vars"]["WANDB_MODE"] == "offline" and runtime_env["env_vars"]["MY_TOKEN"] == "t0k"
    assert "DS_ACCELERATOR" not in runtime_env["env_vars"]
    assert runtime_env["pip"] == ["wandb==0.18.0"] and "data/" in runtime_env["excludes"]
    assert runtime_env["working_dir"] == str(REPO / "launch")
    assert options[options.index("--entrypoint-num-gpus") + 1] == "1.0"
    assert entrypoint == ["/opt/venv/bin/python", "-X", "faulthandler", "-m", "rlhf"]


def test_env_without_value_must_be_set_here():
    proc = subprocess.run(
        [sys.executable, str(SUBMIT), "--dry-run", "--env", "SURELY_NOT_SET_ANYWHERE"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "SURELY_NOT_SET_ANYWHERE" in proc.stderr


def test_address_defaults_to_ray_address():
    options, _, _ = split(dry_run(env={"RAY_ADDRESS": "http://head.example:8265"}))
    assert options[options.index("--address") + 1] == "http://head.example:8265"


def test_shell_wrapper_gives_the_same_command():
    args = ("--no-wait", "--", "cluster=multi_node", "run.total_steps=3")
    assert dry_run(*args, script=REPO / "launch" / "submit.sh") == dry_run(*args)


def test_help_documents_the_options():
    proc = subprocess.run([sys.executable, str(SUBMIT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for option in ("--address", "--no-wait", "--dry-run", "--env", "--pip", "--working-dir"):
        assert option in proc.stdout
