"""RolloutGroup on real Ray, the same tests for each backend (only `rollout.backend` differs).

Tolerance: sampled-token logprobs are compared with `response_logprobs` (an HF float32 forward
of prompt + response, at the sampling temperature as the trainer computes it) at 1e-4. Both sides are float32; vLLM's CPU kernels and the KV-cached HF
loop sum in a different order than one full forward, which STACK.md measured at about 1e-5 for
vLLM (~5e-7 for the HF backend). 1e-4 leaves headroom for that and is still 100x smaller than
what one weight-sync step changes (the perturbed model differs by > 1e-2).
"""

from __future__ import annotations

import logging
import sys
import time

import pytest
import ray
import torch

from rlhf.config import ClusterConfig, ModelConfig, ResourceConfig, RolloutConfig, SamplingConfig
from rlhf.engines.rollout import Generation
from rlhf.errors import ConfigError, WorkerError
from rlhf.models.logprobs import response_logprobs
from rlhf.workers.rollout import EngineMemory, RolloutGroup, SleepBetweenRollouts, engine_resources, even_slices

from .conftest import sample_batch, sampled_distribution_logprobs

logger = logging.getLogger(__name__)
# Ray workers cannot import test modules: ship the Trainer actor class (and its helpers) by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARITY_TOL = 1e-4
PROMPTS = [[24, 266, 25], [30, 31, 32, 33, 34], [40], [50, 51], [60, 61, 62, 63], [70, 71, 72]]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=12)
NUM_ENGINES = {"hf": 2, "vllm": 1}  # hf: two engines exercise the split; vllm: one engine keeps memory and time low


def _load_model(path: str, perturb_seed: int | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if perturb_seed is not None:
        perturb(model, perturb_seed)
    return model.eval()


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """What a training step would do to the trainer's weights, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


class Trainer:
    """Stands in for the policy's rank 0: a plain torch model that sends its weights."""

    def __init__(self, path: str):
        self.path = path
        self.model = _load_model(path)
        self.group = None

    def endpoint(self) -> tuple[str, int]:
        from rlhf.engines.weight_sync import free_port, node_ip

        return node_ip(), free_port()

    def join(self, host: str, port: int, world_size: int) -> None:
        from rlhf.engines.weight_sync import WeightSyncGroup

        self.group = WeightSyncGroup.create(host, port, 0, world_size, "gloo", timeout_s=120)

    def load(self, perturb_seed: int | None) -> None:
        self.model = _load_model(self.path, perturb_seed)

    def send(self) -> dict:
        stats = self.group.send(self.model.named_parameters(), bucket_bytes=256 * 1024)
        return {"num_tensors": stats.num_tensors, "num_bytes": stats.num_bytes, "seconds": stats.seconds}

    def close(self) -> None:
        self.group.close()


def _parity_error(
    model: torch.nn.Module,
    prompts: list[list[int]],
    outputs: list[list[Generation]],
    pad_id: int,
    temperature: float = 1.0,
) -> float:
    """max |engine logprob - HF float32 forward logprob at `temperature`| over every response token:
    the trainer's computation (rlhf.models.logprobs.response_logprobs) against the engine's."""
    batch, engine_logprobs = sample_batch(prompts, outputs, pad_id)
    response_mask = batch.response_mask
    with torch.no_grad():
        reference, _ = response_logprobs(model, batch, temperature=temperature)
    return float(((reference - engine_logprobs).abs() * response_mask).max())


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def engines(request, ray_cluster, tiny_checkpoint):
    backend = request.param
    rollout_cfg = RolloutConfig(backend=backend, num_engines=NUM_ENGINES[backend], kv_cache_gib=1)
    cluster_cfg = ClusterConfig(rollout=ResourceConfig(num_cpus=1))
    start = time.perf_counter()
    group = RolloutGroup(tiny_checkpoint, ModelConfig(), rollout_cfg, cluster_cfg, seed=0)
    logger.info("%s: %d engine(s) up in %.1fs", backend, group.num_engines, time.perf_counter() - start)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def pad_id(tiny_checkpoint) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint).pad_token_id


@pytest.mark.ray
def test_generate_n_samples_per_prompt_in_order(engines):
    start = time.perf_counter()
    outputs = engines.generate(PROMPTS, SAMPLING, n=3, seed=7)
    logger.info("first generate (warm-up): %.2fs", time.perf_counter() - start)
    assert len(outputs) == len(PROMPTS) and all(len(gens) == 3 for gens in outputs)
    for gens in outputs:
        for g in gens:
            assert 1 <= len(g.token_ids) == len(g.logprobs) <= SAMPLING.max_new_tokens
            assert g.finish_reason in ("stop", "length")
            assert g.finish_reason == "stop" or len(g.token_ids) == SAMPLING.max_new_tokens
            assert all(lp <= 0.0 for lp in g.logprobs)
        assert len({tuple(g.token_ids) for g in gens}) > 1  # n samples are not copies of one
    start = time.perf_counter()
    again = engines.generate(PROMPTS, SAMPLING, n=3, seed=7)
    logger.info("generate %d prompts x 3: %.2fs", len(PROMPTS), time.perf_counter() - start)
    assert [[g.token_ids for g in gens] for gens in again] == [[g.token_ids for g in gens] for gens in outputs]


@pytest.mark.ray
def test_seeds_do_not_depend_on_how_prompts_are_split(engines):
    """Prompt i's samples use seed + i*n + j whichever engine serves it, so a suffix call matches."""
    full = engines.generate(PROMPTS, SAMPLING, n=2, seed=11)
    suffix = engines.generate(PROMPTS[3:], SAMPLING, n=2, seed=11 + 3 * 2)
    assert [[g.token_ids for g in gens] for gens in suffix] == [[g.token_ids for g in gens] for gens in full[3:]]


@pytest.mark.ray
def test_fewer_prompts_than_engines_and_no_prompts(engines):
    assert engines.generate([], SAMPLING, n=2, seed=0) == []
    outputs = engines.generate(PROMPTS[:1], SAMPLING, n=2, seed=0)
    assert len(outputs) == 1 and len(outputs[0]) == 2


@pytest.mark.ray
def test_logprobs_match_the_trainers_at_the_sampling_temperature(engines, tiny_checkpoint, pad_id, record_property):
    """At temperature 0.7 the engine reports log_softmax(logits / 0.7), what the trainer computes."""
    outputs = engines.generate(PROMPTS, SamplingConfig(temperature=0.7, max_new_tokens=12), n=2, seed=3)
    model = _load_model(tiny_checkpoint)
    error = _parity_error(model, PROMPTS, outputs, pad_id, temperature=0.7)
    logger.info("logprob parity vs HF float32 forward at temperature 0.7: max abs error %.2e", error)
    record_property("parity_max_abs_error", error)
    assert error < PARITY_TOL
    assert _parity_error(model, PROMPTS, outputs, pad_id, temperature=1.0) > 100 * PARITY_TOL  # not the raw ones


@pytest.mark.ray
def test_logprobs_are_of_the_truncated_distribution(engines, tiny_checkpoint, pad_id):
    """With top-k and top-p the engine reports the logprobs of the distribution it sampled from."""
    sampling = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=12)
    outputs = engines.generate(PROMPTS, sampling, n=2, seed=3)
    engine, expected, compared = sampled_distribution_logprobs(
        _load_model(tiny_checkpoint), PROMPTS, outputs, pad_id, sampling
    )
    assert compared.sum() >= 0.9 * sum(len(g.token_ids) for gens in outputs for g in gens)
    assert float(((expected - engine).abs() * compared).max()) < PARITY_TOL


@pytest.mark.ray
def test_greedy_samples_are_identical_with_untempered_logprobs(engines, tiny_checkpoint, pad_id):
    outputs = engines.generate(PROMPTS[:2], SamplingConfig(temperature=0.0, max_new_tokens=8), n=2, seed=None)
    for gens in outputs:
        assert gens[0].token_ids == gens[1].token_ids
    assert _parity_error(_load_model(tiny_checkpoint), PROMPTS[:2], outputs, pad_id, temperature=1.0) < PARITY_TOL


@pytest.mark.ray
def test_weight_sync_from_a_trainer_actor(engines, tiny_checkpoint, pad_id, record_property, engine_calls):
    """The first round goes through rollout.enable_sleep's hand-off as the trainers drive it (generate,
    sleep, wake the weights, sync, wake the KV cache, generate, sleep): the real engines on CPU, where
    sleep and wake are no-ops, still sample the new weights, and the engine boundary sees the calls in
    that order. The fixture's engines (enable_sleep=false) keep everything resident: no calls at all."""
    trainer = ray.remote(num_cpus=1)(Trainer).remote(tiny_checkpoint)
    engine_calls.record(engines.group)
    try:
        host, port = ray.get(trainer.endpoint.remote())
        joining = trainer.join.remote(host, port, 1 + engines.num_ranks)
        engines.init_weight_sync(host, port, "gloo", timeout_s=120)
        ray.get(joining)

        assert type(engines.memory) is EngineMemory  # enable_sleep=false
        engines.memory.before_generate()
        engines.memory.after_generate()
        engines.memory.before_sync()
        memory = SleepBetweenRollouts(engines)  # what RolloutGroup picks for enable_sleep=true
        memory.before_generate()
        engines.generate(PROMPTS, SAMPLING, n=1, seed=5)
        memory.after_generate()

        old_model, new_model = _load_model(tiny_checkpoint), _load_model(tiny_checkpoint, perturb_seed=1)
        ray.get(trainer.load.remote(1))
        memory.before_sync()
        sending = trainer.send.remote()
        received = engines.wait(engines.receive_weights_async())
        sent = ray.get(sending)
        assert [r["num_tensors"] for r in received] == [sent["num_tensors"]] * engines.num_engines
        logger.info(
            "weight sync: %d tensors, %d bytes, sender %.3fs, engines %s",
            sent["num_tensors"],
            sent["num_bytes"],
            sent["seconds"],
            [round(r["total_s"], 3) for r in received],
        )
        record_property("weight_sync_seconds", sent["seconds"])

        memory.before_generate()
        outputs = engines.generate(PROMPTS, SAMPLING, n=2, seed=5)
        memory.after_generate()
        new_error = _parity_error(new_model, PROMPTS, outputs, pad_id)
        old_error = _parity_error(old_model, PROMPTS, outputs, pad_id)
        logger.info("after sync: error vs new weights %.2e, vs old weights %.2e", new_error, old_error)
        assert new_error < PARITY_TOL
        assert old_error > 1e-2
        handoff = ["generate", "sleep", "wake:weights", "load_weights", "wake:kv_cache", "generate", "sleep"]
        assert engine_calls.take(engines.group) == [handoff] * engines.num_engines

        # A second round on the same group restores the original weights for the module's other tests.
        ray.get(trainer.load.remote(None))
        sending = trainer.send.remote()
        engines.wait(engines.receive_weights_async())
        ray.get(sending)
        outputs = engines.generate(PROMPTS, SAMPLING, n=2, seed=5)
        assert _parity_error(old_model, PROMPTS, outputs, pad_id) < PARITY_TOL
    finally:
        engines.close_weight_sync()
        ray.get(trainer.close.remote())
        ray.kill(trainer)
        engine_calls.take(engines.group)  # the plain backend back for the module's other tests (if it failed early)


@pytest.mark.ray
def test_remote_errors_surface_as_worker_error(engines):
    with pytest.raises(WorkerError, match="receive_weights before init_weight_sync"):
        engines.wait(engines.receive_weights_async())


def test_even_slices_cover_in_order():
    assert even_slices(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert even_slices(1, 2) == [(0, 1), (1, 1)]
    assert even_slices(0, 2) == [(0, 0), (0, 0)]


def test_tensor_parallel_engines_get_whole_gpus():
    gpu = ClusterConfig(device="cuda", rollout=ResourceConfig(num_cpus=2, num_gpus=1))
    assert engine_resources(RolloutConfig(), gpu) is gpu.rollout
    assert engine_resources(RolloutConfig(tensor_parallel_size=4), gpu) == ResourceConfig(num_cpus=2, num_gpus=4)
    with pytest.raises(ConfigError, match="needs backend vllm on cluster.device cuda"):
        engine_resources(RolloutConfig(tensor_parallel_size=2), ClusterConfig())
    with pytest.raises(ConfigError, match="set cluster.rollout.num_gpus=1"):
        engine_resources(RolloutConfig(tensor_parallel_size=2), ClusterConfig(device="cuda"))
