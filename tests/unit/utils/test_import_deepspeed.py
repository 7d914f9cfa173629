"""import_deepspeed: deepspeed without its autotuner's mlflow import (mlflow still importable after) and without compiling Muon."""

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


@pytest.mark.parametrize("first", ["", "import deepspeed"], ids=["import_deepspeed-first", "deepspeed-first"])
def test_deepspeed_muon_module_imports_without_compiling(first):
    """Building a ZeRO optimizer imports DeepSpeed's Muon module; under import_deepspeed its torch.compile
    decorators are left off, so TorchDynamo and Inductor stay unimported, and torch.compile is restored,
    also when something else imported deepspeed before."""
    probe = f"""
import sys, torch
compile_ = torch.compile
{first}
from rlhf.utils.distributed import import_deepspeed
import_deepspeed()
from deepspeed.runtime.zero.muon.original_muon import muon_update
print(type(muon_update).__name__, "torch._inductor.compile_fx" in sys.modules, torch.compile is compile_)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["function", "False", "True"]
