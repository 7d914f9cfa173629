"""ZeRO-3 over one rank: the export reads each partition in place (it is the whole tensor), without a gather.

Runs a real one-rank DeepSpeed ZeRO-3 engine (gloo) in a child process: the test process keeps no
torch.distributed or DeepSpeed state behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rlhf.engines.weight_sync import free_port

_SCRIPT = r"""
import json, os, sys
import torch
from rlhf.config import TrainConfig
from rlhf.engines.train_engine import TrainEngine, init_distributed
from rlhf.models.tiny import build_tiny_model
from rlhf.utils.distributed import import_deepspeed

init_distributed("gloo", 120)
engine = TrainEngine(
    build_tiny_model("qwen2", vocab_size=64, seed=0),
    TrainConfig(zero_stage=3, train_batch_size=2, micro_batch_size=2),
    dp=1, rank=0, bf16=False, device="cpu",
)
ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
loss = engine(input_ids=ids, labels=ids).loss
engine.backward(loss, ends_step=True)
engine.step()  # the partitions now differ from the initial weights

params = dict(engine.module.named_parameters())
gathered_before = [n for n, p in params.items() if p.data.numel()]  # DeepSpeed's live window
in_place, values = [], {}
for group in engine.iter_full_parameter_groups(bucket_bytes=1 << 16):
    for name, tensor in group:
        partition = params[name].ds_tensor
        start = partition.data_ptr()
        in_place.append(start <= tensor.data_ptr() < start + partition.numel() * partition.element_size())
        values[name] = tensor.clone()
gathered_after = [n for n, p in params.items() if p.data.numel()]
# the reference: DeepSpeed's own gather of every parameter
mismatched = []
with import_deepspeed().zero.GatheredParameters(list(params.values())):
    for name, param in params.items():
        if not torch.equal(values[name], param.data):
            mismatched.append(name)
print(json.dumps({"in_place": in_place, "gathered": [gathered_before, gathered_after], "mismatched": mismatched,
                  "exported": len(values), "parameters": len(params)}))
"""


def test_one_rank_zero3_export_reads_the_updated_partitions_in_place():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0"}
    env.update(WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exported"] == result["parameters"] > 0
    assert all(result["in_place"])  # views of the partitions: the consumer's copy is the only one
    before, after = result["gathered"]
    assert before == after  # the export gathered nothing (DeepSpeed may keep its window gathered)
    assert result["mismatched"] == []  # equal to DeepSpeed's gather after the update
