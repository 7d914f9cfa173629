"""vLLM rollout backend: an in-process `vllm.LLM` with in-place weight reloads.

The engine runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), which starts in
seconds and gives direct access to the worker for in-place weight loads. vLLM is imported only
when the backend is built, after its environment is set; the importing process must not host a
DeepSpeed trainer (the CPU engine pins OpenMP threads).

Tensor parallelism (GPU only): with tensor_parallel_size > 1 the shards live in worker
processes that vLLM starts on the GPUs of the engine's actor (its bundle holds that many GPUs,
see `rlhf.config.engine_resources`). The actor still holds one weight-sync rank and
forwards what it received to its shards with `collective_rpc`, which copies every tensor
through vLLM's RPC. This path is not exercised by the tests (vLLM for CUDA cannot be installed
on the test machines).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence

from torch import Tensor

from rlhf.config import ClusterConfig, ModelConfig, RolloutConfig, SamplingConfig
from rlhf.engines.checksum import Checksums
from rlhf.engines.rollout.base import FINISH_REASONS, GREEDY_BELOW, ROLLOUT_BACKENDS, Generation
from rlhf.errors import WorkerError

logger = logging.getLogger(__name__)


def _set_vllm_env(rollout_cfg: RolloutConfig, on_gpu: bool) -> None:
    """Environment vLLM reads at import / engine start; must run before `import vllm`."""
    if "vllm" in sys.modules and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        logger.warning(
            "vllm was imported before VLLM_ENABLE_V1_MULTIPROCESSING=0 was set; the engine may start a subprocess"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not on_gpu:
        gib = max(1, math.ceil(rollout_cfg.kv_cache_gib))  # vLLM takes whole GiB here
        if gib != rollout_cfg.kv_cache_gib:
            logger.info(
                "rollout.kv_cache_gib %s rounded up to %d GiB (VLLM_CPU_KVCACHE_SPACE is an integer)",
                rollout_cfg.kv_cache_gib,
                gib,
            )
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)


@ROLLOUT_BACKENDS.register("vllm")
class VLLMBackend:
    """`RolloutBackend` on vLLM (CPU build or CUDA)."""

    reads_back_weights = False  # its loader repacks (fused qkv/gate-up, CPU layouts): the sync checksums arrivals

    def __init__(
        self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, cluster_cfg: ClusterConfig, seed: int
    ) -> None:
        self.on_gpu = cluster_cfg.device == "cuda"
        self.sleep_enabled = self.on_gpu and rollout_cfg.enable_sleep
        _set_vllm_env(rollout_cfg, self.on_gpu)
        from vllm import LLM

        engine_args: dict = dict(
            model=model_path,
            dtype=model_cfg.dtype,
            seed=seed,
            trust_remote_code=model_cfg.trust_remote_code,
            enforce_eager=rollout_cfg.enforce_eager or not self.on_gpu,  # CPU has no CUDA graphs
            # logprobs of the distribution sampled from (temperature, top-k, top-p), not the raw model's:
            # the behaviour policy's (rlhf.engines.rollout.base). On CUDA vLLM then samples with its torch
            # sampler instead of FlashInfer's, which cannot return them.
            logprobs_mode="processed_logprobs",
        )
        if self.on_gpu:
            engine_args.update(
                gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                enable_sleep_mode=rollout_cfg.enable_sleep,
            )
            if rollout_cfg.tensor_parallel_size > 1:
                engine_args["distributed_executor_backend"] = "mp"  # shards on this actor's GPUs
        self.llm = LLM(**engine_args)
        self.tensor_parallel_size = self.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: int | None
    ) -> list[list[Generation]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM rejects n > 1 with greedy sampling; greedy samples are identical, so copy one.
        per_request = 1 if sampling.temperature < GREEDY_BELOW else n
        params = [
            SamplingParams(
                n=per_request,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=max(sampling.top_k, 0),  # ours: -1 off; vLLM: 0 off
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None,
                logprobs=0,  # the sampled token's logprob only (processed: see logprobs_mode)
                seed=None if seed is None else seed + i * n,  # vLLM adds the sample index per child
            )
            for i in range(len(prompt_token_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        copies = n // per_request
        return [[_to_generation(c) for _ in range(copies) for c in out.outputs] for out in outputs]

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], share: bool = False) -> None:
        # `share` is not used: vLLM repacks the weights into its own layout, so it always copies
        worker = self._in_process_worker()
        if worker is not None:
            # `model.load_weights` fails on CPU (weights are repacked for oneDNN after loading);
            # the worker's reload path re-runs that post-processing.
            worker.reload_weights(weights_iterator=iter(named_tensors))
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})

    def loaded_checksums(self, names: Sequence[str]) -> Checksums:
        raise NotImplementedError("vLLM repacks what it loads (fused qkv/gate-up, its CPU layouts): nothing to read")

    def sleep(self) -> None:
        if self.sleep_enabled:
            self.llm.sleep(level=1)  # KV cache discarded, weights offloaded to CPU; the scheduler pauses

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        if self.sleep_enabled:  # the scheduler resumes once every tag is awake again
            self.llm.wake_up(tags=list(tags) if tags is not None else None)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def _in_process_worker(self):
        """The single worker of an in-process, TP=1 engine (None when vLLM runs workers elsewhere)."""
        if self.tensor_parallel_size > 1:
            return None
        executor = self.llm.llm_engine.engine_core.engine_core.model_executor
        driver = getattr(executor, "driver_worker", None)
        return getattr(driver, "worker", None)


def _to_generation(completion) -> Generation:
    token_ids = list(completion.token_ids)
    # logprobs=0 returns, per position, a dict holding the sampled token (plus nothing else).
    logprobs = [position[token].logprob for token, position in zip(token_ids, completion.logprobs)]
    if completion.finish_reason not in FINISH_REASONS:
        raise WorkerError("vllm engine", f"a request ended with finish_reason={completion.finish_reason!r} (aborted?)")
    return Generation(
        token_ids=token_ids, logprobs=logprobs, finish_reason=completion.finish_reason, text=completion.text
    )
