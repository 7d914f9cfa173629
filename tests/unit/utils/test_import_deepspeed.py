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
autotuner = import_deepspeed("autotuning.autotuner")
print(autotuner.has_mlflow)
import mlflow
print(mlflow.__name__)
"""


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="the tracking extra (mlflow) is not installed")
def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["deepspeed", "False", "True", "False", "mlflow"]
