"""The HF backend in this process (no Ray): parity, batching, stopping, weight loads; CPU and CUDA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlhf.config import ClusterConfig, ModelConfig, RolloutConfig, SamplingConfig
from rlhf.engines.rollout import ROLLOUT_BACKENDS
from rlhf.errors import WeightSyncError

from .conftest import sampled_distribution_logprobs

PARITY_TOL = 1e-4  # see test_rollout_group.py; measured ~1e-6 for this backend
PROMPTS = [[24, 266, 25], [30, 31, 32, 33, 34], [40]]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=10)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _backend(path: str, device: str, **rollout):
    cluster = ClusterConfig(device=device)
    return ROLLOUT_BACKENDS.get("hf")(path, ModelConfig(), RolloutConfig(backend="hf", **rollout), cluster, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_logprobs_are_the_sampling_distributions(tiny_checkpoint, device):
    """Logprobs at temperature 0.7 after top-k 20 (the behaviour policy's), as one full forward gives them."""
    backend = _backend(tiny_checkpoint, device)
    sampling = SamplingConfig(temperature=0.7, top_k=20, max_new_tokens=12)
    outputs = backend.generate(PROMPTS, sampling, n=3, seed=1)
    engine, expected, compared = sampled_distribution_logprobs(
        backend.model, PROMPTS, outputs, backend.pad_id, sampling
    )
    assert compared.sum() >= 0.9 * sum(len(g.token_ids) for gens in outputs for g in gens)
    assert float(((expected - engine).abs() * compared).max()) < PARITY_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_samples_do_not_depend_on_batching(tiny_checkpoint, device):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    one_by_one = _backend(tiny_checkpoint, device, hf_batch_size=1).generate(PROMPTS, sampling, n=2, seed=4)
    together = _backend(tiny_checkpoint, device).generate(PROMPTS, sampling, n=2, seed=4)
    assert [[g.token_ids for g in gens] for gens in one_by_one] == [[g.token_ids for g in gens] for gens in together]


def test_eos_stops_and_is_kept(tiny_checkpoint, tmp_path):
    first = _backend(tiny_checkpoint, "cpu").generate(PROMPTS[:1], GREEDY, n=1, seed=None)[0][0]
    # A copy of the checkpoint whose EOS is the token greedy decoding emits first.
    path = shutil.copytree(tiny_checkpoint, tmp_path / "eos")
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "eos_token_id": first.token_ids[0]}))
    stopped = _backend(str(path), "cpu").generate(PROMPTS[:1], GREEDY, n=1, seed=None)[0][0]
    assert first.finish_reason == "length" and len(first.token_ids) == GREEDY.max_new_tokens
    assert (stopped.token_ids, stopped.finish_reason) == ([first.token_ids[0]], "stop")


def test_stop_string_ends_the_response_and_is_cut_from_the_text(tiny_checkpoint):
    backend = _backend(tiny_checkpoint, "cpu")
    full = backend.generate(PROMPTS[:1], GREEDY, n=1, seed=None)[0][0]
    stop = backend.tokenizer.decode(full.token_ids[3:5])  # text of the 4th and 5th tokens
    assert stop.strip() and stop in full.text
    cut = backend.generate(
        PROMPTS[:1], SamplingConfig(temperature=0.0, max_new_tokens=10, stop=[stop]), n=1, seed=None
    )[0][0]
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) <= 5
    assert stop not in cut.text and full.text.startswith(cut.text)


@pytest.mark.parametrize("device", DEVICES)
def test_load_weights_in_place_and_unknown_names(tiny_checkpoint, device):
    backend = _backend(tiny_checkpoint, device)
    before = backend.generate(PROMPTS, GREEDY, n=1, seed=None)
    weights = {name: torch.zeros_like(p) for name, p in backend.model.named_parameters()}
    ids = {name: id(p) for name, p in backend.model.named_parameters()}
    backend.load_weights((name, t.to(device)) for name, t in weights.items())
    assert {name: id(p) for name, p in backend.model.named_parameters()} == ids  # same tensors, new values
    assert all(float(p.abs().max()) == 0.0 for p in backend.model.parameters())
    assert backend.generate(PROMPTS, GREEDY, n=1, seed=None) != before
    with pytest.raises(WeightSyncError, match="not in the rollout model"):
        backend.load_weights([("model.not_a_layer.weight", torch.zeros(2))])
    with pytest.raises(WeightSyncError, match="has shape"):
        backend.load_weights([("lm_head.weight", torch.zeros(2, 2))])


@pytest.mark.gpu
def test_sleep_frees_gpu_memory_and_wake_up_restores(tiny_checkpoint):
    backend = _backend(tiny_checkpoint, "cuda", enable_sleep=True)
    before = backend.generate(PROMPTS, GREEDY, n=1, seed=None)
    weight_bytes = sum(p.numel() * p.element_size() for p in backend.model.parameters())
    awake = torch.cuda.memory_allocated()
    backend.sleep()
    asleep = torch.cuda.memory_allocated()
    assert awake - asleep >= weight_bytes
    backend.wake_up(["weights"])  # before a weight sync: the weights come back (this backend keeps no KV cache)
    assert torch.cuda.memory_allocated() - asleep >= weight_bytes
    backend.wake_up(["kv_cache"])  # before the next generate
    assert backend.generate(PROMPTS, GREEDY, n=1, seed=None) == before
    backend.sleep()
    backend.wake_up()  # None: everything at once
    assert backend.generate(PROMPTS, GREEDY, n=1, seed=None) == before
