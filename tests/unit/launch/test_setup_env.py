"""scripts/setup_env.sh: a clone's venv is layered on the dependency venv cached outside the repo.

The cache is not installed here (minutes): a stand-in venv at the cache's place holds this test's own packages
(a .pth line), one console script that runs the cache's Python and one binary, as an install leaves them. The
layering, the editable install of this package and the check that a second call does nothing run for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SETUP = REPO / "scripts" / "setup_env.sh"


def setup_env(env: dict, *args: str) -> str:
    proc = subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def python(venv: Path, code: str) -> list[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()


def seed_cache(cached: Path) -> None:
    """A finished cached venv: this environment's packages, a `ray` script on its Python, a `ninja` binary."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(cached)], check=True)
    site = python(cached, "import sysconfig; print(sysconfig.get_path('purelib'))")[0]
    ours = {sysconfig.get_path("purelib"), *(p for p in sys.path if p.endswith("site-packages"))}
    (Path(site) / "packages_of_the_test.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in ours)
    )
    (cached / "bin" / "ray").write_text(f"#!{cached}/bin/python\nimport sys\nprint(sys.prefix)\n")
    (cached / "bin" / "ninja").write_bytes(b"\x7fELF not a script")
    for name in ("ray", "ninja"):
        (cached / "bin" / name).chmod(0o755)
    (cached / ".complete").touch()


def test_clone_venv_is_layered_on_the_cached_dependencies(tmp_path):
    venv = tmp_path / "clone" / ".venv"
    env = {**os.environ, "RLHF_VENV_CACHE": str(tmp_path / "cache"), "VENV": str(venv)}
    cached = Path(setup_env(env, "--cache-dir").strip())
    assert cached.parent == tmp_path / "cache"
    seed_cache(cached)

    assert f"creating {venv} on {cached}" in setup_env(env)
    prefix, package, torch_init = python(
        venv, "import sys, rlhf, torch; print(sys.prefix, rlhf.__file__, torch.__file__)"
    )
    assert prefix == str(venv) and package == str(REPO / "rlhf" / "__init__.py")  # its own Python; this repo, editable
    assert not torch_init.startswith(str(venv))  # the dependencies are imported from the cache, not copied
    # the cache's console script runs the clone's Python (so Ray's workers can import this package); binaries are
    # the cache's own; the cache itself is left as it was
    ray = subprocess.run([str(venv / "bin" / "ray")], capture_output=True, text=True, check=True).stdout.strip()
    assert ray == str(venv)
    assert (venv / "bin" / "ninja").resolve() == cached / "bin" / "ninja"
    assert (cached / "bin" / "ray").read_text().startswith(f"#!{cached}/bin/python\n")

    assert setup_env(env) == ""  # set up already: a second call does nothing
