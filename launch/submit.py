#!/usr/bin/env python3
"""Submit an rlhf run to a running Ray cluster as a Ray Job.

    launch/submit.py [options] [--] <hydra overrides...>

wraps

    ray job submit --address <dashboard> --runtime-env-json '<env>' [--no-wait] -- python -m rlhf <overrides>

The runtime env uploads this repository as the job's working_dir (without .git, .venv, outputs,
caches) and sets the environment variables of CPU or GPU mode. Hydra overrides pass through
unchanged, so anything `rlhf ...` accepts works here, sweeps (`-m`) included.

Examples:

    launch/submit.py --address http://head:8265 -- cluster=multi_node model.path=/ckpt/sft \\
        data.train=/data/prompts.jsonl run.output_dir=/shared/runs/grpo1
    launch/submit.py --no-wait run.total_steps=2          # print the submission id and return
    launch/submit.py --dry-run cluster=single_gpu         # print the command, submit nothing

Only the standard library is used here; the `ray` CLI must be installed where this runs.
Run `launch/submit.py --help` for every option.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Never uploaded: the job installs nothing from them and they can be gigabytes.
EXCLUDES = [
    ".git",
    ".venv",
    ".whl",
    "outputs",
    "multirun",
    "runs",
    "benchmarks/results",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
]

COMMON_ENV = {
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # rlhf's driver calls ray.init(runtime_env={"env_vars": ...}) with some of the same keys; without
    # this Ray refuses to merge the two (driver values win, the job's working_dir is kept).
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}
DEVICE_ENV = {
    # Same as scripts/env.sh: DeepSpeed on CPU over gloo, in-process vLLM, a bounded KV cache.
    "cpu": {"DS_ACCELERATOR": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"},
    # CUDA: DeepSpeed and vLLM find the GPUs themselves; the engine still runs inside its actor.
    "cuda": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
}
CPU_CLUSTERS = ("cpu_debug",)


def infer_device(overrides: Sequence[str]) -> str:
    """cpu or cuda, from `cluster.device=` or the `cluster=` preset among the overrides (default cpu_debug)."""
    device, preset = None, "cpu_debug"
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key == "cluster.device":
            device = value
        elif key == "cluster":
            preset = value
    if device is not None:
        return device
    return "cpu" if preset in CPU_CLUSTERS else "cuda"


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """["A=1", "HF_TOKEN"] → {"A": "1", "HF_TOKEN": <value in this shell>}."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise SystemExit(f"--env {name}: not set in this shell; write --env {name}=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


def runtime_env(args: argparse.Namespace, device: str) -> dict:
    env: dict = {
        "working_dir": str(args.working_dir),
        "excludes": EXCLUDES + args.exclude,
        "env_vars": {**COMMON_ENV, **DEVICE_ENV[device], **parse_env(args.env)},
    }
    if args.pip:
        env["pip"] = args.pip
    return env


def ray_cli(explicit: str | None) -> str:
    """The ray CLI: --ray-cli, else $RAY, else the one beside this Python (a venv), else the one on PATH."""
    if explicit or os.environ.get("RAY"):
        return explicit or os.environ["RAY"]
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    return shutil.which("ray") or "ray"


def build_command(args: argparse.Namespace) -> list[str]:
    """The full `ray job submit ...` command line."""
    device = args.device or infer_device(args.overrides)
    cmd = [ray_cli(args.ray_cli), "job", "submit", "--address", args.address]
    cmd += ["--runtime-env-json", json.dumps(runtime_env(args, device), sort_keys=True)]
    if args.submission_id:
        cmd += ["--submission-id", args.submission_id]
    if args.entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", str(args.entrypoint_num_cpus)]
    if args.entrypoint_num_gpus is not None:
        cmd += ["--entrypoint-num-gpus", str(args.entrypoint_num_gpus)]
    if args.no_wait:
        cmd.append("--no-wait")
    cmd += ["--", *shlex.split(args.python), "-m", "rlhf", *args.overrides]
    return cmd


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/submit.py",
        description="Submit `python -m rlhf <overrides>` to a Ray cluster with `ray job submit`.",
        epilog="Everything after `--` (or every argument that is not an option) is a Hydra override.",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help=f"the head's dashboard / job server (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )
    p.add_argument("--working-dir", type=Path, default=REPO, help="code uploaded to the job (default: this repo)")
    p.add_argument(
        "--device", choices=sorted(DEVICE_ENV), help="env vars of cpu or cuda mode (default: from cluster=...)"
    )
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="extra env var (repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ", help="extra pip package for the job")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="extra upload exclude")
    p.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    p.add_argument("--submission-id", help="job id (default: chosen by Ray)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of tailing the logs")
    p.add_argument("--ray-cli", help="path of the `ray` executable (default: $RAY, the venv's, or PATH's)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides passed to `python -m rlhf`")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    args.overrides += passthrough
    args.working_dir = args.working_dir.resolve()
    return args


def warn_about_output_dir(overrides: Sequence[str]) -> None:
    """A relative run.output_dir lands inside the job's temporary copy of the working_dir."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "run.output_dir" and Path(value).is_absolute():
            return
    sys.stderr.write(
        "submit: no absolute run.output_dir=...; outputs will go to the job's temporary working_dir "
        "on the node that runs the driver (pass run.output_dir=/shared/path to keep them)\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cmd = build_command(args)
    if args.dry_run:
        sys.stdout.write(shlex.join(cmd) + "\n")
        return 0
    warn_about_output_dir(args.overrides)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
