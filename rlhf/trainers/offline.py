"""The offline controller: PT, SFT, reward modelling, the DPO family and KTO on one runtime.

One step: next minibatch of examples → reference logprobs (if the objective needs them) →
`train_step` on the trained group (one optimizer step, rows split over the DeepSpeed ranks with
a pair's two rows always on one rank). The objective (rlhf.workers.objectives.OBJECTIVES, picked
by `offline.objective`, which each conf/stage/<stage>.yaml sets) decides the collate, whether a
reference model runs, and whether the trained model is a causal LM or a reward model. Every such
choice is made once in __init__.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from rlhf.config import RLHFConfig, validate
from rlhf.data.batch import RolloutBatch
from rlhf.data.collate import collate_kto, collate_packed, collate_pairs, collate_sequences
from rlhf.data.loader import OfflineLoader
from rlhf.errors import DataError
from rlhf.trainers.controller import Controller
from rlhf.trainers.roles import (
    GroupStarter,
    check_shared_output_dir,
    start_group,
    start_policy_group,
    write_placement,
)
from rlhf.utils.metrics import PhaseTimer
from rlhf.utils.redact import config_container
from rlhf.workers.group import WorkerGroup
from rlhf.workers.objectives import OBJECTIVES, Objective, loss_mask
from rlhf.workers.offline_policy import OfflinePolicyWorker
from rlhf.workers.reference import ReferenceWorker
from rlhf.workers.reward_trainer import RewardModelWorker

logger = logging.getLogger(__name__)

DATA_FORMATS = {"sequence": ("instruction", "text", "messages"), "pair": ("preference",), "kto": ("kto",)}
"""Row formats (rlhf.data.examples.FORMATS) that each objective's example kind accepts."""
STAGE_FORMATS = {"pt": "text", "sft": "instruction", "rm": "preference", "kto": "kto"}
"""The row format that data.format=auto means for a tiny-world source ("tiny", "tiny:eval"); the
DPO family reads preference rows like rm, a file's own fields decide otherwise."""
REFERENCE_CHUNK = 64
"""Examples per reference call while precomputing."""


@dataclass
class OfflineRun:
    """Everything checked and loaded before Ray starts."""

    cfg: RLHFConfig
    model_path: str
    tokenizer: Any
    objective: type[Objective]
    loader: OfflineLoader
    eval: list[Any]
    collate: Callable[[list[Any]], RolloutBatch]
    """Collate of evaluation (and reference-precompute) examples: never packed."""
    output_dir: Path


def run_offline(cfg: RLHFConfig) -> dict[str, float]:
    """Validate and load data, start Ray and the roles, train, save the final model; last metrics."""
    from rlhf.trainers.runner import fit_on_cluster

    run = prepare_offline(cfg)
    return fit_on_cluster(cfg, run.output_dir, lambda: OfflineTrainer(run))


def prepare_offline(cfg: RLHFConfig) -> OfflineRun:
    """Config, tokenizer, tokenized examples and the loader; every user error raises here, before any actor."""
    from rlhf.data.packing import pack_sequences
    from rlhf.models.loading import load_tokenizer, resolve_model_path

    validate(cfg)
    objective = OBJECTIVES.get(cfg.offline.objective)
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train, evaluation = load_examples(cfg, tokenizer, objective.example_kind)
    pad_id = tokenizer.pad_token_id
    collate = make_collate(objective.example_kind, pad_id, cfg.data.max_length)
    if cfg.data.packing:
        train = pack_sequences(train, max_length=cfg.data.max_length, pad_id=pad_id)
        loader = OfflineLoader(train, cfg.policy.train_batch_size, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
                               collate=lambda rows: collate_packed(rows, pad_id))  # fmt: skip
    else:
        loader = OfflineLoader(
            train, cfg.policy.train_batch_size, seed=cfg.run.seed, shuffle=cfg.data.shuffle, collate=collate
        )
    dp = cfg.policy.num_workers
    evaluation = evaluation[: cfg.run.eval_size or None]
    evaluation = evaluation[: len(evaluation) - len(evaluation) % dp]  # every rank gets the same count
    logger.info(
        "prepared %s: model %s, %d train / %d eval examples", cfg.stage, model_path, len(train), len(evaluation)
    )
    return OfflineRun(cfg, model_path, tokenizer, objective, loader, evaluation, collate, Path(cfg.run.output_dir))


def load_examples(cfg: RLHFConfig, tokenizer: Any, example_kind: str) -> tuple[list[Any], list[Any]]:
    """(train, eval) examples of the stage's kind from data.train / data.mixture and data.eval."""
    from rlhf.data.datasets import load_offline_records
    from rlhf.data.examples import encode_dataset

    data = cfg.data
    row_format = data.format if data.format != "auto" else STAGE_FORMATS.get(cfg.stage, DATA_FORMATS[example_kind][0])
    records = load_offline_records(data, row_format, seed=cfg.run.seed)
    parts = {"train": records.train, "eval": records.eval or []}
    encoded = {}
    for name, rows in parts.items():
        if not rows:
            encoded[name] = []
            continue
        dataset = encode_dataset(rows, tokenizer, data, data.format, name=name)
        if dataset.kind not in DATA_FORMATS[example_kind]:
            raise DataError(
                f"stage {cfg.stage} trains on {'/'.join(DATA_FORMATS[example_kind])} rows, but the {name} data has "
                f"{dataset.kind} rows ({rows[0].where}); point data.{name} at such data or set data.format"
            )
        encoded[name] = list(dataset.examples)
    return encoded["train"], encoded["eval"]


def make_collate(example_kind: str, pad_id: int, max_length: int) -> Callable[[list[Any]], RolloutBatch]:
    """The stage's collate of unpacked examples: sequences, interleaved pairs, or interleaved KTO rows."""
    if example_kind == "pair":
        return lambda examples: collate_pairs(examples, pad_id)
    if example_kind == "kto":
        return lambda examples: collate_kto(examples, pad_id, max_length=max_length)
    return lambda examples: collate_sequences(examples, pad_id)


# ---------------------------------------------------------------------------------------------- reference


class ReferenceLogprobs:
    """Summed reference log-probabilities [B] of each row's loss tokens, cached by row content.

    `precompute` scores the given examples once (TRL's precompute_ref_log_probs); afterwards a
    row found in the cache costs nothing, and any other row (KTO's mismatched rows, which are
    re-paired in every batch) is scored on the spot. With offline.reference=online nothing is
    cached. `temperature`: the softmax temperature of the scores, the policy objective's (1 on a
    data set; online DPO's sampling temperature).
    """

    def __init__(self, group: WorkerGroup, *, cache: bool, temperature: float = 1.0):
        self.group = group
        self.cache: Optional[dict[tuple, float]] = {} if cache else None
        self.temperature = temperature

    def precompute(self, examples: list[Any], collate: Callable[[list[Any]], RolloutBatch]) -> None:
        for start in range(0, len(examples), REFERENCE_CHUNK):
            batch = collate(examples[start : start + REFERENCE_CHUNK])
            own = torch.arange(len(batch)) if batch.labels is None else (batch.labels >= 0).nonzero().flatten()
            self(batch.select(own))

    def __call__(self, batch: RolloutBatch) -> Tensor:
        keys = row_keys(batch)
        cached = self.cache or {}
        missing = [i for i, key in enumerate(keys) if key not in cached]
        values = torch.tensor([cached.get(key, math.nan) for key in keys], dtype=torch.float32)
        if missing:
            part = batch.select(missing)
            token_logprobs = self.group.call(ReferenceWorker.compute_logprobs, part, self.temperature)
            sums = torch.where(loss_mask(part), token_logprobs, torch.zeros(())).sum(-1)
            values[missing] = sums
            if self.cache is not None:
                self.cache.update({keys[i]: float(v) for i, v in zip(missing, sums)})
        return values


def row_keys(batch: RolloutBatch) -> list[tuple]:
    """Hashable content of each row: real prompt tokens, real response tokens, loss tokens."""
    prompts, responses = batch.prompt_ids.tolist(), batch.response_ids.tolist()
    prompt_mask, response_mask = batch.prompt_mask.bool().tolist(), batch.response_mask.bool().tolist()
    losses = loss_mask(batch).tolist()
    keys = []
    for p, pm, r, rm, lm in zip(prompts, prompt_mask, responses, response_mask, losses):
        keys.append(
            (
                tuple(t for t, m in zip(p, pm) if m),
                tuple(t for t, m in zip(r, rm) if m),
                tuple(i for i, m in enumerate(lm) if m),
            )
        )
    return keys


def start_offline_reference(cfg: RLHFConfig, objective: type[Objective], start: Optional[GroupStarter] = None):
    """The frozen reference of an offline objective: one rank whose micro-batches hold policy.micro_batch_size
    whole examples; load offline.reference_path (or the policy's model) into it with init_model. `start`
    defaults to start_group on cfg.cluster."""
    start = start or partial(start_group, cfg.cluster)
    return start(
        ReferenceWorker,
        "reference",
        1,
        cfg.cluster.reference,
        model_cfg=cfg.model,
        cluster_cfg=cfg.cluster,
        micro_batch_size=cfg.policy.micro_batch_size * objective.rows_per_example,
    )


# ---------------------------------------------------------------------------------------------- controller


class OfflineTrainer(Controller):
    def __init__(self, run: OfflineRun):
        cfg = run.cfg
        self.cfg, self.run = cfg, run
        self.objective = run.objective
        self.batch_size = cfg.policy.train_batch_size
        self.loader = run.loader
        self.total_steps = cfg.offline.max_steps or cfg.offline.epochs * self.loader.batches_per_epoch
        self.eval_batches = [
            run.collate(run.eval[i : i + self.batch_size]) for i in range(0, len(run.eval), self.batch_size)
        ]
        self._start_bookkeeping(run.output_dir)
        self.worker_cls = RewardModelWorker if self.objective.model_kind == "reward" else OfflinePolicyWorker
        self.reference: Optional[ReferenceLogprobs] = None
        self.reference_group: Optional[WorkerGroup] = None
        self._start_roles()

    def _start_roles(self) -> None:
        cfg, run = self.cfg, self.run
        worker_cls = self.worker_cls
        role = "reward_model" if worker_cls is RewardModelWorker else "policy"
        self.policy = start_policy_group(cfg, worker_cls, role=role, offline_cfg=cfg.offline)
        if self.objective.needs_reference:  # its actors start while the policy's do
            self.reference_group = start_offline_reference(cfg, self.objective)
        pending = self.policy.run(worker_cls.init_model, run.model_path, self.total_steps)
        if self.reference_group is not None:
            self.reference_group.call(ReferenceWorker.init_model, cfg.offline.reference_path or run.model_path)
            self.reference = ReferenceLogprobs(self.reference_group, cache=cfg.offline.reference == "precompute")
        self.policy.wait(pending)
        check_shared_output_dir(run.output_dir, {self.policy.role: self.policy})
        write_placement(run.output_dir, {self.policy.role: self.policy, "reference": self.reference_group})
        if self.reference is not None and self.reference.cache is not None:
            self._precompute_reference()

    def _precompute_reference(self) -> None:
        assert self.reference is not None and self.reference_group is not None
        timer = PhaseTimer()
        with timer("reference_precompute"):
            self.reference.precompute(list(self.loader.examples) + self.run.eval, self.run.collate)
        logger.info("reference logprobs of %d rows precomputed", len(self.reference.cache or {}))
        self.metrics.log(0, timer.metrics())
        if self.objective.example_kind != "kto":  # every row is cached: free the reference model
            self.reference_group.shutdown()
            self.reference_group = None

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        timer = PhaseTimer()
        with timer("step"):
            batch = self.loader.next_batch()
            with timer("reference"):
                aux = self.reference(batch) if self.reference is not None else None
            with timer("update"):
                stats = self.policy.call(self.worker_cls.train_step, batch, aux)
        tokens = float(batch.attention_mask.sum())
        epoch = self.loader.epoch + self.loader.batch / self.loader.batches_per_epoch
        perf = {"perf/tokens_per_s": tokens / timer.seconds["step"], "train/epoch": epoch}
        return {**stats, **timer.metrics(), **perf}

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics `eval/<stat>`, weighted over eval batches by their count (tokens, pairs, examples)."""
        if not self.eval_batches:
            return {}
        totals: dict[str, float] = {}
        weight = 0.0
        for batch in self.eval_batches:
            aux = self.reference(batch) if self.reference is not None else None
            stats = self.policy.call(self.worker_cls.evaluate, batch, aux)
            count = stats.pop("count")
            weight += count
            for key, value in stats.items():
                name = "eval/" + key.split("/", 1)[-1]
                totals[name] = totals.get(name, 0.0) + value * count
        metrics = {k: v / max(weight, 1.0) for k, v in totals.items()}
        if self.objective.example_kind == "sequence" and "eval/loss" in metrics:
            metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
        return metrics

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        run_cfg = self.cfg.run
        self.resume()
        last: dict[str, float] = {}
        if self.cfg.offline.eval_at_start and self.step_done == 0:
            last = self.metrics.log(0, self.evaluate())
        progress = make_progress(range(self.step_done, self.total_steps), self.total_steps, run_cfg, self.step_done)
        headline = f"{self.objective.prefix}/{self.objective.headline}"
        for _ in progress:
            metrics = self.step()
            self.step_done += 1
            last = self._end_step(metrics)
            if hasattr(progress, "set_postfix") and headline in last:
                progress.set_postfix({headline: f"{last[headline]:.4g}"})
        if self.eval_batches:
            self._evaluate_at_end(last)
        self.save_final()
        return last

    def save_checkpoint(self) -> Path:
        state = {"data_stream": self.loader.state(), "config": config_container(self.cfg)}
        return self.checkpoints.save(self.step_done, state, {"policy": self.policy})

    def resume(self) -> None:
        state = self.checkpoints.restore(self.cfg.run.resume, {"policy": self.policy})
        if state is None:
            return
        self.step_done = int(state["step"])
        self.loader.load_state(state["data_stream"])

    def save_final(self) -> Path:
        final = self.run.output_dir / "final"
        self.policy.call(self.worker_cls.save_hf, str(final))
        self.run.tokenizer.save_pretrained(final)
        logger.info("final model saved to %s", final)
        return final

    def close(self) -> None:
        self.metrics.close()
        for group in (self.policy, self.reference_group):
            if group is not None:
                group.shutdown()


def make_progress(steps, total: int, run_cfg, initial: int):
    if not run_cfg.progress_bar:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, total=total, initial=initial, desc="offline", unit="step", dynamic_ncols=True)
