"""Validation loads no heavy library: a config error reaches the user in about a second, not after torch's
friends have spent five loading (transformers, DeepSpeed, Ray, vLLM, peft, datasets)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from hydra import compose, initialize_config_dir
from rlhf.cli import CONF_DIR, to_config
from rlhf.config import stage_names, validate

HEAVY = ("transformers", "deepspeed", "ray", "vllm", "peft", "datasets")
loaded = {}
for stage in stage_names():
    with initialize_config_dir(CONF_DIR, version_base=None):
        validate(to_config(compose("config", overrides=[f"stage={stage}"])))
    loaded[stage] = [name for name in HEAVY if name in sys.modules]
print(json.dumps(loaded))
"""


def test_every_stage_validates_without_loading_model_or_cluster_libraries():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(loaded) >= 20  # every registered stage, each validated on its shipped defaults
    assert {stage: libs for stage, libs in loaded.items() if libs} == {}
