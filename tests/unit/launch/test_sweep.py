"""The sweep summary (rlhf/utils/sweep.py) on fabricated runs, and as a callback of a real Hydra multirun."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf.utils.sweep import (
    SUMMARY_JSON,
    SUMMARY_MD,
    final_metrics,
    parse_overrides,
    summarize,
    swept_keys,
    to_markdown,
    write_summary,
)


def write_job(sweep: Path, job: str, overrides: list[str], rows: list[dict] | None) -> Path:
    """A job directory as Hydra's basic launcher leaves it: .hydra/overrides.yaml (+ metrics.jsonl)."""
    job_dir = sweep / job
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if rows is not None:
        (job_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return job_dir


def test_parse_overrides_keeps_order_and_drops_prefixes():
    assert parse_overrides(["algorithm.kl_coef=0.01", "+extra.x=a=b", "~run.seed=1", "oops"]) == {
        "algorithm.kl_coef": "0.01",
        "extra.x": "a=b",
        "run.seed": "1",
    }
    # As Hydra records a sweep job's overrides.
    assert parse_overrides([r"run.output_dir=$\{hydra\:runtime.output_dir\}"]) == {
        "run.output_dir": "${hydra:runtime.output_dir}"
    }


def test_final_metrics_takes_last_logged_value_per_column():
    rows = [
        {"step": 1, "reward/mean": 0.1, "policy/kl": 0.5},
        {"step": 1, "eval/accuracy": 0.25},  # eval rows come separately
        {"step": 2, "reward/mean": 0.3, "policy/kl": 0.7},
        {"step": 3, "reward/mean": float("nan")},
    ]
    steps, values = final_metrics(rows)
    # reward/mean: the last value logged is NaN → None (JSON has no NaN); kl falls back to policy/kl.
    assert steps == 3
    assert values == {"reward/mean": None, "eval/accuracy": 0.25, "kl": 0.7}


def test_final_metrics_prefers_kl_in_reward_over_kl_loss():
    _, values = final_metrics([{"step": 1, "reward/kl_to_ref": 0.02, "policy/kl": 0.9}])
    assert values["kl"] == 0.02
    assert final_metrics([]) == (None, {"reward/mean": None, "eval/accuracy": None, "kl": None})


def test_summary_of_a_fabricated_sweep(tmp_path):
    common = ["model.path=tiny", "run.total_steps=2"]
    write_job(
        tmp_path,
        "0",
        ["algorithm.kl_coef=0.0", *common],
        [
            {"step": 1, "reward/mean": 0.25},
            {"step": 2, "reward/mean": 0.5, "eval/accuracy": 0.375},
        ],
    )
    write_job(
        tmp_path,
        "1",
        ["algorithm.kl_coef=0.01", *common],
        [
            {"step": 1, "reward/mean": 0.125, "policy/kl": 0.001},
            {"step": 2, "reward/mean": 0.75, "policy/kl": 0.003, "eval/accuracy": 0.5},
        ],
    )
    write_job(tmp_path, "10", ["algorithm.kl_coef=0.1", *common], None)  # crashed before logging
    job2 = write_job(tmp_path, "2", ["algorithm.kl_coef=0.05", *common], [{"step": 1, "reward/mean": 0.5}])
    with (job2 / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "reward/me')  # killed mid-write: the complete rows still count

    runs = summarize(tmp_path)
    assert [r.job for r in runs] == ["0", "1", "2", "10"]  # job order, not string order
    assert swept_keys(runs) == ["algorithm.kl_coef"]  # only what differs becomes a column
    assert runs[1].steps == 2 and runs[1].metrics == {"reward/mean": 0.75, "eval/accuracy": 0.5, "kl": 0.003}
    assert runs[2].steps == 1 and runs[2].metrics["reward/mean"] == 0.5
    assert runs[3].output_dir is None and runs[3].steps is None

    write_summary(tmp_path)
    table = (tmp_path / SUMMARY_MD).read_text().splitlines()
    assert table[0] == "| run | algorithm.kl_coef | status | steps | reward/mean | eval/accuracy | kl |"
    assert table[2] == "| 0 | 0.0 | UNKNOWN | 2 | 0.5 | 0.375 | n/a |"
    assert table[3] == "| 1 | 0.01 | UNKNOWN | 2 | 0.75 | 0.5 | 0.003 |"
    assert table[5] == "| 10 | 0.1 | UNKNOWN | n/a | n/a | n/a | n/a |"
    payload = json.loads((tmp_path / SUMMARY_JSON).read_text())
    assert payload["swept"] == ["algorithm.kl_coef"]
    assert [r["overrides"]["algorithm.kl_coef"] for r in payload["runs"]] == ["0.0", "0.01", "0.05", "0.1"]
    assert payload["runs"][0]["metrics"]["kl"] is None


def test_metrics_found_through_literal_output_dir(tmp_path):
    """Old sweeps that wrote to an explicit run.output_dir: the saved config points at the metrics."""
    elsewhere = tmp_path / "data" / "run0"
    elsewhere.mkdir(parents=True)
    (elsewhere / "metrics.jsonl").write_text(json.dumps({"step": 4, "reward/mean": 1.0}) + "\n")
    job = write_job(tmp_path / "sweep", "0", ["algorithm.kl_coef=0.0"], None)
    (job / ".hydra" / "config.yaml").write_text(f"run:\n  output_dir: {elsewhere}\n")
    (run,) = summarize(tmp_path / "sweep")
    assert run.output_dir == str(elsewhere) and run.steps == 4
    # An interpolation in the saved config is not resolved (it may need Hydra's runtime): no metrics, no error.
    other = write_job(tmp_path / "sweep", "1", ["algorithm.kl_coef=0.1"], None)
    (other / ".hydra" / "config.yaml").write_text("run:\n  output_dir: ${hydra:runtime.output_dir}\n")
    assert summarize(tmp_path / "sweep")[1].output_dir is None
    # One run: nothing differs, so every (non-hydra) override is shown.
    assert to_markdown([run]).splitlines()[2] == "| 0 | 0.0 | UNKNOWN | 4 | 1 | n/a | n/a |"


TOY_APP = """
import json
from pathlib import Path

import hydra

from rlhf.utils.sweep import job_output_dir


@hydra.main(config_path=".", config_name="config", version_base=None)
def main(cfg):
    out = Path(job_output_dir(cfg.run.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    if cfg.algorithm.kl_coef > 0.05:
        raise RuntimeError("this job fails on purpose")
    with (out / "metrics.jsonl").open("w") as f:
        for step in (1, 2):
            row = {"step": step, "reward/mean": step / 4, "policy/kl": cfg.algorithm.kl_coef * step}
            f.write(json.dumps(row) + "\\n")
    return step / 4


if __name__ == "__main__":
    main()
"""

# Mirrors conf/config.yaml: hydra.run.dir follows run.output_dir; the callback is registered.
TOY_CONFIG = """
run:
  output_dir: outputs/run
algorithm:
  kl_coef: 0.0
hydra:
  run:
    dir: ${run.output_dir}
  sweep:
    dir: multirun
    subdir: ${hydra.job.num}
  job:
    chdir: false
  callbacks:
    sweep_summary:
      _target_: rlhf.utils.sweep.SweepSummary
"""


def run_toy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(textwrap.dedent(TOY_APP))
    (tmp_path / "config.yaml").write_text(TOY_CONFIG)
    return subprocess.run([sys.executable, "app.py", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_callback_in_a_real_hydra_multirun(tmp_path):
    proc = run_toy(tmp_path, "-m", "algorithm.kl_coef=0.0,0.01,0.1")
    # The failing job makes Hydra's basic sweeper raise after all jobs ran, before on_multirun_end:
    # the table written after each job still has every row.
    assert proc.returncode == 1 and "this job fails on purpose" in proc.stderr
    sweep = tmp_path / "multirun"
    # job_output_dir put each job's metrics in its own sweep subdirectory, not in outputs/run.
    assert not (tmp_path / "outputs").exists()
    assert (sweep / "0" / "metrics.jsonl").exists() and (sweep / "1" / "metrics.jsonl").exists()
    record = json.loads((sweep / "1" / "sweep_job.json").read_text())
    assert record["status"] == "COMPLETED" and record["return_value"] == 0.5
    assert record["output_dir"] == str(sweep / "1")
    payload = json.loads((sweep / SUMMARY_JSON).read_text())
    assert [r["status"] for r in payload["runs"]] == ["COMPLETED", "COMPLETED", "FAILED"]
    assert [r["metrics"]["kl"] for r in payload["runs"]][:2] == [0.0, pytest.approx(0.02)]
    table = (sweep / SUMMARY_MD).read_text()
    assert "| 1 | 0.01 | COMPLETED | 2 | 0.5 | n/a | 0.02 |" in table
    assert "| 2 | 0.1 | FAILED | n/a | n/a | n/a | n/a |" in table


def test_single_run_keeps_run_output_dir_and_writes_no_summary(tmp_path):
    proc = run_toy(tmp_path, "run.output_dir=single")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "single" / "metrics.jsonl").exists()
    assert not (tmp_path / "single" / "sweep_job.json").exists()


def test_explicit_output_dir_in_a_sweep_is_respected(tmp_path):
    proc = run_toy(
        tmp_path,
        "-m",
        "algorithm.kl_coef=0.0,0.01",
        "run.output_dir=runs/kl${algorithm.kl_coef}",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "kl0.01" / "metrics.jsonl").exists()
    runs = json.loads((tmp_path / "multirun" / SUMMARY_JSON).read_text())["runs"]
    assert [r["output_dir"] for r in runs] == [str(tmp_path / "runs" / "kl0.0"), str(tmp_path / "runs" / "kl0.01")]
    assert not math.isnan(runs[1]["metrics"]["reward/mean"])


def test_standalone_entry_point(tmp_path):
    write_job(tmp_path, "0", ["algorithm.kl_coef=0.0"], [{"step": 1, "reward/mean": 0.5}])
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.utils.sweep", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "| 0 | 0.0 | UNKNOWN | 1 | 0.5 | n/a | n/a |" in proc.stdout
    assert (tmp_path / SUMMARY_MD).exists()
