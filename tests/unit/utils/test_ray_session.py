"""What the machine must have is checked when a run starts its own Ray, not in validate()."""

import pytest
import torch

from rlhf.config import ClusterConfig
from rlhf.errors import ConfigError
from rlhf.utils.ray_session import check_local_devices


def test_a_cuda_preset_on_a_machine_without_a_gpu_stops_before_ray_starts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, whatever it has
    with pytest.raises(ConfigError, match=r"cluster.device=cuda \(cluster=single_gpu\), but torch sees no CUDA GPU"):
        check_local_devices(ClusterConfig(name="single_gpu", device="cuda"))
    check_local_devices(ClusterConfig(device="cpu"))  # nothing to ask of the machine
