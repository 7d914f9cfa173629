"""Every benchmark script runs in --quick mode and writes valid JSON (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    "weight_sync", "memory", "rl_step", "packing", "rollout_backends", "learning", "recipes", "trl_compare", "soak", "gpu_check",
    "async_rl", "agentic", "compute_ceiling",
]  # fmt: skip
EXTRA_ARGS = {"gpu_check": ["--device", "cpu"]}  # the GPU check's own path on the CPU debug cluster


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick_writes_json(tmp_path, name):
    """`python -m benchmarks.<name> --quick --out <tmp>` exits 0 and writes <name>.json with its machine and results."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(tmp_path), *EXTRA_ARGS.get(name, [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["benchmark"] == name
    assert data["quick"] is True
    assert data["machine"]["cpu_count"] >= 1
    assert data["results"] if "results" in data else data["runs"]
    if name == "learning":
        assert (tmp_path / "learning_reward.png").stat().st_size > 0


def test_readme_section_is_replaced_in_place(tmp_path):
    """update_readme rewrites only the text between a benchmark's markers and appends a new section once."""
    from benchmarks.common import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n")
    update_readme("a", "first", readme)
    update_readme("b", "other", readme)
    update_readme("a", "second", readme)
    text = readme.read_text()
    assert text.count("<!-- bench:a -->") == 1 and "second" in text and "first" not in text
    assert text.index("<!-- bench:a -->") < text.index("<!-- bench:b -->")
    assert text.startswith("# Benchmarks\n\nintro\n")
