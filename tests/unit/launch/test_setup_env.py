"""scripts/setup_env.sh: a clone's venv is made from the dependency venv cached outside the repo.

The cache is seeded from this test's own environment (hard links, as setup_env.sh's install would leave it:
scripts naming the cache's Python) instead of being installed, which takes minutes; the copy, the rewrite of
its scripts and the editable install of this package then run for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SETUP = REPO / "scripts" / "setup_env.sh"


def setup_env(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def shebang(script: Path) -> str:
    return script.read_text().splitlines()[0]


def seed_cache(cached: Path) -> None:
    """This environment's venv as if installed at `cached`: hard-linked files, scripts rewritten to name it."""
    cached.parent.mkdir(parents=True)
    subprocess.run(["cp", "-al", sys.prefix, str(cached)], check=True)
    (cached / ".rlhf-installed").unlink()  # a cached venv holds the dependencies only
    for script in (cached / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and sys.prefix in (text := script.read_text(errors="replace")):
            script.unlink()  # a new file: the linked one in this environment stays as it is
            script.write_text(text.replace(sys.prefix, str(cached)))
            script.chmod(0o755)
    (cached / ".complete").touch()


def test_clone_venv_is_a_hard_linked_copy_of_the_cache_with_its_own_scripts(tmp_path):
    venv = tmp_path / "clone" / ".venv"
    env = {**os.environ, "RLHF_VENV_CACHE": str(tmp_path / "cache"), "VENV": str(venv)}
    cached = Path(setup_env(env, "--cache-dir").stdout.strip())
    assert cached.parent == tmp_path / "cache"
    seed_cache(cached)

    assert f"creating {venv} from {cached}" in setup_env(env).stdout
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys, rlhf, torch; print(sys.prefix, rlhf.__file__, torch.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    prefix, package, torch_init = out
    assert prefix == str(venv) and package == str(REPO / "rlhf" / "__init__.py")
    # a dependency's console script and this package's run the clone's Python; the cache's still run its own
    assert shebang(venv / "bin" / "ray") == f"#!{venv}/bin/python"
    assert shebang(venv / "bin" / "rlhf") == f"#!{venv}/bin/python"
    assert shebang(cached / "bin" / "ray") == f"#!{cached}/bin/python"
    # the dependencies are the cache's files, not copies of them
    torch_init = Path(torch_init)
    assert torch_init.stat().st_ino == (cached / torch_init.relative_to(venv)).stat().st_ino
    assert not (cached / ".rlhf-installed").exists()

    assert setup_env(env).stdout == ""  # set up already: a second call does nothing
