"""import_deepspeed: deepspeed without its autotuner's mlflow import, and mlflow still importable after."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

PROBE = """
import sys
from rlhf.utils.distributed import import_deepspeed
ds = import_deepspeed()
print(ds.__name__, "mlflow" in sys.modules, import_deepspeed() is ds)
import deepspeed.autotuning.autotuner as autotuner
print(autotuner.has_mlflow)
import mlflow
print(mlflow.__name__)
"""


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="the tracking extra (mlflow) is not installed")
def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["deepspeed", "False", "True", "False", "mlflow"]


def test_every_deepspeed_import_in_the_library_goes_through_import_deepspeed():
    """A bare `import deepspeed`, or a `from deepspeed... import` not preceded by import_deepspeed() in its
    function, would bring the mlflow import back into the first process that reaches it."""
    import ast
    from pathlib import Path

    import rlhf

    root = Path(rlhf.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "utils" / "distributed.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]:
            guarded_from = min(
                (
                    n.lineno
                    for n in ast.walk(func)
                    if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "import_deepspeed"
                ),
                default=None,
            )
            for node in ast.iter_child_nodes(func) if isinstance(func, ast.Module) else ast.walk(func):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if not any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                    continue
                if isinstance(node, ast.Import) or guarded_from is None or guarded_from > node.lineno:
                    offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert not offenders, f"import deepspeed through rlhf.utils.distributed.import_deepspeed(): {offenders}"
