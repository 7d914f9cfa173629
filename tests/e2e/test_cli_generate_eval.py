"""`rlhf stage=generate` killed mid-run and restarted writes the rows of an uninterrupted run; `rlhf stage=eval`
re-scores them into pass@k equal to a hand count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.algorithms.pass_at_k import pass_at_k
from rlhf.data.tiny_world import check_answer
from rlhf.trainers.generate import read_rows, run_generate

pytestmark = [pytest.mark.ray]

RLHF = str(Path(sys.executable).with_name("rlhf"))
GENERATE = [
    "stage=generate",
    "model.path=tiny",
    "data.train=tiny:eval",
    "generate.max_prompts=48",
    "generate.shard_size=4",
    "rollout.backend=hf",
    "rollout.n_samples_per_prompt=4",
    "rollout.sampling.max_new_tokens=8",
    "cluster.num_cpus=2",
    "run.progress_bar=false",
]


def cli(tmp_path: Path, *overrides: str) -> list[str]:
    return [RLHF, *overrides, f"run.output_dir={tmp_path / 'run'}"]


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*")) if p.is_file()}


@pytest.mark.slow  # generation resume: test_generate.py::test_interrupted_generation_resumes_to_identical_rows
def test_killed_generation_resumes_and_eval_counts(ray_cluster, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf.cli import CONF_DIR

    out = tmp_path / "gen"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = out / "samples" / "train-00000-of-00012.jsonl"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        cli(tmp_path, *GENERATE, f"generate.output={out}"), cwd=tmp_path, env=env, stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray processes it started
        proc.wait()
    assert first.exists(), (tmp_path / "killed.log").read_text()[-4000:]
    done = len(list((out / "samples").glob("train-*")))
    assert 1 <= done < 12, f"the kill came after {done} of 12 shards"

    resumed = subprocess.run(
        cli(tmp_path, *GENERATE, f"generate.output={out}"), cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=420,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert f"12 shards ({12 - done} to do)" in resumed.stdout + resumed.stderr

    with initialize_config_dir(CONF_DIR, version_base=None):
        raw = compose("config", overrides=[*GENERATE, f"generate.output={tmp_path / 'whole'}"])
    run_generate(OmegaConf.to_object(raw))  # type: ignore[arg-type]
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")

    evaluated = subprocess.run(
        cli(tmp_path, "stage=eval", f"eval.samples={out / 'samples'}", "eval.k=[1,2,4]", f"eval.output={tmp_path / 'eval'}"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-6000:]
    metrics = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["metrics"]
    rows = [r for p in sorted((out / "samples").glob("train-*")) for r in read_rows(p)]
    correct = [sum(check_answer(r["response"], r["answer"]) for r in rows if r["prompt_index"] == i) for i in range(48)]
    for k in (1, 2, 4):
        assert metrics[f"eval/pass@{k}"] == pytest.approx(sum(pass_at_k(4, c, k) for c in correct) / 48)
    assert (tmp_path / "eval" / "eval_results.md").exists()
