"""Hugging Face rollout backend: a plain `transformers` model and a KV-cached sampling loop.

The fallback when vLLM is not available (and the reference the vLLM backend is checked
against). Sampling follows vLLM's recipe so both backends mean the same by a SamplingConfig:
temperature, then top-k, then top-p on the scaled logits; a sample is the argmax of
probs / Exponential(1) noise, the noise drawn from one seeded `torch.Generator` per sequence
(sample j of prompt i uses `seed + i * n + j`). Temperature 0 is greedy. Logprobs are those of
the distribution sampled from (log_softmax of the scaled, top-k/top-p-masked logits; untempered
for greedy), as vLLM's processed_logprobs (rlhf.engines.rollout.base). Prompts are left-padded and batched with
position ids that skip the padding, exactly as `rlhf.models.logprobs.response_logprobs` scores
them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from rlhf.config import ClusterConfig, ModelConfig, RolloutConfig, SamplingConfig
from rlhf.data.batch import pad_sequences
from rlhf.engines.checksum import Checksums, checksums
from rlhf.engines.rollout.base import GREEDY_BELOW, ROLLOUT_BACKENDS, Generation
from rlhf.errors import ConfigError, WeightSyncError

logger = logging.getLogger(__name__)


@ROLLOUT_BACKENDS.register("hf")
class HFBackend:
    """`RolloutBackend` on a `transformers` causal LM in this process."""

    reads_back_weights = True

    def __init__(
        self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, cluster_cfg: ClusterConfig, seed: int
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if rollout_cfg.hf_batch_size <= 0:
            raise ConfigError(f"rollout.hf_batch_size must be positive, got {rollout_cfg.hf_batch_size}")
        self.device = torch.device("cuda" if cluster_cfg.device == "cuda" else "cpu")
        self.batch_size = rollout_cfg.hf_batch_size
        self.sleep_enabled = self.device.type == "cuda" and rollout_cfg.enable_sleep
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = torch.tensor(
            sorted({eos} if isinstance(eos, int) else set(eos or [])), dtype=torch.long, device=self.device
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else int(self.eos_ids[0]) if len(self.eos_ids) else 0
        torch.manual_seed(seed)  # used only when generate() gets seed=None

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: int | None
    ) -> list[list[Generation]]:
        rows = [(i, j) for i in range(len(prompt_token_ids)) for j in range(n)]
        results: list[list[Generation]] = [[] for _ in prompt_token_ids]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            seeds = None if seed is None else [seed + i * n + j for i, j in chunk]
            generations = self._generate_rows([prompt_token_ids[i] for i, _ in chunk], sampling, seeds)
            for (i, _), generation in zip(chunk, generations):
                results[i].append(generation)
        return results

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], share: bool = False) -> None:
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers(remove_duplicate=False))
        unknown = []
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = targets.get(name)
                if target is None:
                    unknown.append(name)
                elif target.shape != tensor.shape:
                    raise WeightSyncError(
                        f"weight {name!r} has shape {tuple(tensor.shape)}, the rollout model expects {tuple(target.shape)}"
                    )
                elif share and tensor.dtype == target.dtype and tensor.device == target.device:
                    target.data = tensor  # adopt the shared-memory view: the sender's write was the load
                else:
                    target.copy_(tensor)
        if unknown:
            raise WeightSyncError(
                f"{len(unknown)} received weights are not in the rollout model, e.g. {unknown[:3]}; "
                f"the trainer must send Hugging Face checkpoint names (LoRA merged, no wrapper prefixes)"
            )

    def sleep(self) -> None:
        if self.sleep_enabled:  # no KV cache outlives a generate call: only the weights hold memory
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        if self.sleep_enabled and (tags is None or "weights" in tags):
            self.model.to(self.device)

    def reset_prefix_cache(self) -> None:
        """Nothing to reset: every generate call starts from an empty KV cache."""

    def loaded_checksums(self, names: Sequence[str]) -> Checksums:
        """The live parameters and buffers by their checkpoint names (one absent from the model is not listed)."""
        tensors = dict(self.model.named_parameters(remove_duplicate=False))
        tensors.update(self.model.named_buffers(remove_duplicate=False))
        return checksums((name, tensors[name]) for name in names if name in tensors)

    @torch.inference_mode()
    def _generate_rows(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int] | None
    ) -> list[Generation]:
        ids, mask = pad_sequences(prompts, pad_id=self.pad_id, left=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        generators = None if seeds is None else [torch.Generator(self.device).manual_seed(s) for s in seeds]
        batch, max_new = len(prompts), sampling.max_new_tokens
        tokens = torch.full((batch, max_new), self.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stopped = [False] * batch
        inputs, past = ids, None
        for step in range(max_new):
            out = self.model(
                input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            sampled, sampled_logprobs = sample_next(out.logits[:, -1, :].float(), sampling, generators)
            active = ~done
            tokens[active, step] = sampled[active]
            logprobs[active, step] = sampled_logprobs[active]
            lengths += active.long()
            hit_eos = active & torch.isin(sampled, self.eos_ids)
            done |= hit_eos
            for r in hit_eos.nonzero().flatten().tolist():
                stopped[r] = True
            if sampling.stop:
                for r in (active & ~hit_eos).nonzero().flatten().tolist():
                    if any(s in self._decode(tokens[r, : lengths[r]]) for s in sampling.stop):
                        done[r], stopped[r] = True, True
            if bool(done.all()):
                break
            inputs = sampled[:, None]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        generations = []
        for r in range(batch):
            n_tokens = int(lengths[r])
            text = self._decode(tokens[r, :n_tokens])
            for s in sampling.stop:
                text = text.split(s, 1)[0]
            generations.append(
                Generation(
                    token_ids=tokens[r, :n_tokens].tolist(),
                    logprobs=logprobs[r, :n_tokens].tolist(),
                    finish_reason="stop" if stopped[r] else "length",
                    text=text,
                )
            )
        return generations

    def _decode(self, token_ids: Tensor) -> str:
        return self.tokenizer.decode(token_ids.tolist(), skip_special_tokens=True)


def sample_next(
    logits: Tensor, sampling: SamplingConfig, generators: list[torch.Generator] | None
) -> tuple[Tensor, Tensor]:
    """Next tokens [B] from raw logits [B, V], and their logprobs [B] under the distribution they were
    drawn from (`sampling_logits`: the behaviour policy's, as vLLM's processed_logprobs)."""
    logits = sampling_logits(logits, sampling)
    tokens = _sample(logits, sampling, generators)
    return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)


def sampling_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """The logits [B, V] of the distribution samples are drawn from: the raw logits for greedy decoding,
    else divided by the temperature, then top-k and top-p (vLLM's order; dropped tokens get -inf)."""
    if sampling.temperature < GREEDY_BELOW:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - sampling.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _sample(logits: Tensor, sampling: SamplingConfig, generators: list[torch.Generator] | None) -> Tensor:
    """Next tokens [B] from `sampling_logits` [B, V]: the argmax for greedy, else an exponential race."""
    if sampling.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    if generators is None:
        noise.exponential_()
    else:
        for row, generator in zip(noise, generators):
            row.exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
