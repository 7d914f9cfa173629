"""The distillation controller (stage=distill): sample or read → teacher scores → student update → sync.

One step, with S the student (the policy, model.path) and T the teacher (distill.teacher_path):

    batch   = student samples of dataset prompts (on-policy, probability distill.lmbda per step)
              or the dataset's own responses (offline)
    support = T's top-k + tail (or full) distribution at every response position   (TeacherWorker)
    update  = DISTILLATION_LOSSES[distill.loss](S, T) over the batch, one optimizer step per
              policy.train_batch_size rows                                       (DistillPolicyWorker)
    sync    = the student's new weights into the rollout engines (on-policy runs only)

GKD (Agarwal et al. 2023, arXiv:2306.13649, Algorithm 1) is mode=on_policy with lmbda < 1 and
loss=jsd; classic word-level KD (Hinton et al. 2015) is mode=offline with loss=forward_kl.
rollout.sampling.temperature only decides which responses the student samples; the loss compares
whole distributions at distill.temperature, and no logprob of the engines is used.
Evaluation (step 0, every run.eval_every steps, and at the end) measures per-token forward and
reverse KL on the held-out rows' responses and, on-policy, on the student's own samples.

Checkpoints (every run.save_every steps, run.keep_last kept, run.resume=auto picks the newest
complete one) hold the student's DeepSpeed state with its ranks' RNG, the row stream's position
and the step. The driver draws nothing at random: the on-policy coin and the sampling seeds are
functions of (run.seed, step), so a resumed run replays the same choices.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.config import RLHFConfig, distill_sequences_per_step, validate
from rlhf.data.batch import RolloutBatch
from rlhf.errors import CheckpointError, ConfigError
from rlhf.trainers.controller import Controller
from rlhf.trainers.distill_data import DistillRows, load_distill_rows
from rlhf.trainers.rl import build_rollout_batch, make_progress, sample_seed
from rlhf.trainers.roles import (
    RolloutSupervisor,
    check_shared_output_dir,
    connect_weight_sync,
    start_group,
    start_policy_group,
    start_rollout_group,
    write_placement,
)
from rlhf.utils.metrics import PhaseTimer
from rlhf.utils.redact import config_container
from rlhf.workers.distill_policy import DistillPolicyWorker
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.rollout import RolloutGroup
from rlhf.workers.teacher import TeacherSupport, TeacherWorker

logger = logging.getLogger(__name__)

EVAL_SEED_STEP = -1
"""Sampling-seed step of evaluation rollouts: the same seed at every evaluation."""


@dataclass
class DistillRun:
    """Everything checked and loaded before Ray starts."""

    cfg: RLHFConfig
    student_path: str
    teacher_path: str
    tokenizer: Any
    train: DistillRows
    eval: DistillRows | None
    output_dir: Path


def run_distill(cfg: RLHFConfig) -> dict[str, float]:
    """Validate and load everything, then start Ray and distill; the last step's metrics."""
    from rlhf.trainers.runner import fit_on_cluster

    run = prepare_distill(cfg)
    return fit_on_cluster(cfg, run.output_dir, lambda: DistillTrainer(run))


def prepare_distill(cfg: RLHFConfig) -> DistillRun:
    """Config, model paths, equal teacher/student vocabularies, data: every user error before Ray."""
    from rlhf.models.loading import load_tokenizer, resolve_model_path

    validate(cfg)
    student = resolve_model_path(cfg.model.path)
    teacher = resolve_model_path(cfg.distill.teacher_path)
    tokenizer = load_tokenizer(student, trust_remote_code=cfg.model.trust_remote_code)
    check_vocabularies(student, teacher, trust_remote_code=cfg.model.trust_remote_code)
    # every evaluation row is split over the student ranks and the teachers: a multiple of both
    unit = cfg.policy.num_workers * cfg.distill.num_workers
    if cfg.run.eval_size < unit:
        raise ConfigError(f"run.eval_size {cfg.run.eval_size} is below policy.num_workers × distill.num_workers {unit}")
    train, evaluation = load_distill_rows(cfg, tokenizer, eval_limit=cfg.run.eval_size)
    if evaluation is not None:
        evaluation = evaluation.head(len(evaluation) // unit * unit) or None
    return DistillRun(cfg, student, teacher, tokenizer, train, evaluation, Path(cfg.run.output_dir))


def check_vocabularies(student: str, teacher: str, *, trust_remote_code: bool) -> None:
    """ConfigError unless teacher and student score the same token ids (same vocab size and tokenizer).

    Checked from the configs and tokenizers when both can be read here (local dirs, tiny names,
    cached Hub models); otherwise the workers' vocab sizes are compared after loading.
    """
    from transformers import AutoConfig

    from rlhf.models.loading import load_tokenizer

    try:
        sizes = [
            AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code).vocab_size for p in (student, teacher)
        ]
    except (OSError, ValueError) as e:
        logger.info("vocabulary check deferred to the workers: %s", e)
        return
    require_equal_vocab(sizes[0], sizes[1], student, teacher)
    try:
        vocabs = [load_tokenizer(p, trust_remote_code=trust_remote_code).get_vocab() for p in (student, teacher)]
    except ConfigError:
        return  # a weights-only teacher directory: the sizes agree, nothing more to compare
    if vocabs[0] != vocabs[1]:
        differ = sorted(set(vocabs[0].items()) ^ set(vocabs[1].items()))[:3]
        raise ConfigError(
            f"teacher {teacher} and student {student} have different tokenizers (e.g. {differ}); distillation "
            f"compares distributions token id by token id, so both need the same tokenizer"
        )


def require_equal_vocab(student_size: int, teacher_size: int, student: str, teacher: str) -> None:
    if student_size != teacher_size:
        raise ConfigError(
            f"vocabulary sizes differ: student {student} has {student_size} tokens, teacher {teacher} has "
            f"{teacher_size}; distillation needs a teacher and student with the same tokenizer and vocabulary "
            f"(set distill.teacher_path or model.path)"
        )


class DistillTrainer(Controller):
    def __init__(self, run: DistillRun):
        cfg = run.cfg
        self.cfg, self.run = cfg, run
        self.rows_per_step = distill_sequences_per_step(cfg)
        self.on_policy = cfg.distill.mode == "on_policy" and cfg.distill.lmbda > 0
        prompts_per_draw = cfg.run.rollout_batch_size if cfg.distill.mode == "on_policy" else self.rows_per_step
        self.stream = run.train.stream(prompts_per_draw, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        self._start_bookkeeping(run.output_dir)
        self.rollout: RolloutGroup | None = None
        self.engines: RolloutSupervisor | None = None
        """On-policy: every generate and sync (restarts dead engines; sleeps them between rollouts)."""
        self._start_roles()

    def _start_roles(self) -> None:
        cfg, cluster = self.cfg, self.cfg.cluster
        self.policy = start_policy_group(cfg, DistillPolicyWorker, algo_cfg=cfg.algorithm, distill_cfg=cfg.distill)
        self.teacher = start_group(
            cluster,
            TeacherWorker,
            "teacher",
            cfg.distill.num_workers,
            cluster.teacher,
            model_cfg=dataclasses.replace(cfg.model, path=cfg.distill.teacher_path),
            cluster_cfg=cluster,
            micro_batch_size=cfg.policy.micro_batch_size,
        )
        if self.on_policy:
            self.rollout = start_rollout_group(cfg, self.run.student_path, [self.policy, self.teacher])
        optimizer_steps = cfg.run.total_steps * (self.rows_per_step // cfg.policy.train_batch_size)
        student = self.policy.run(PolicyWorker.init_model, self.run.student_path, optimizer_steps)
        teacher = self.teacher.run(TeacherWorker.init_model, self.run.teacher_path)
        self.policy.wait(student)
        teacher_info = self.teacher.wait(teacher)
        student_vocab = self.policy.call(DistillPolicyWorker.vocab_size)
        require_equal_vocab(student_vocab, teacher_info["vocab_size"], self.run.student_path, self.run.teacher_path)
        weight_sync = None
        if self.rollout is not None:
            weight_sync = connect_weight_sync(self.policy, self.rollout, cluster)
            self.engines = RolloutSupervisor(
                self.rollout,
                self.policy,
                cluster,
                bucket_mb=cfg.rollout.weight_sync_bucket_mb,
                max_restarts=cfg.rollout.max_restarts,
            )
        check_shared_output_dir(self.run.output_dir, {"policy": self.policy})
        groups = {"policy": self.policy, "teacher": self.teacher, "rollout": self.rollout and self.rollout.group}
        write_placement(self.run.output_dir, groups, weight_sync)

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, Any]:
        timer = PhaseTimer()
        with timer("step"):
            if self.draws_on_policy(step):
                with timer("generate"):
                    batch, stats = self.sample(self.stream.next_batch().metadata, step)
            else:
                batch, stats = self.dataset_batch(), {"distill/on_policy": 0.0}
            with timer("teacher"):
                teacher = self.score(batch)
            with timer("update"):
                stats.update(self.update(batch, teacher))
            if self.engines is not None:
                with timer("sync"):
                    self.engines.sync()
        stats["perf/tokens_per_s"] = float(batch.response_mask.sum()) / timer.seconds["step"]
        return {**stats, **timer.metrics()}

    def draws_on_policy(self, step: int) -> bool:
        """GKD's per-step coin: on-policy with probability lmbda (seeded by step, so resumable)."""
        return self.on_policy and random.Random(sample_seed(self.cfg.run.seed, step)).random() < self.cfg.distill.lmbda

    def dataset_batch(self) -> RolloutBatch:
        """rows_per_step dataset rows with their own responses (teacher-forced)."""
        rows = []
        while len(rows) < self.rows_per_step:
            rows += [m["row"] for m in self.stream.next_batch().metadata]
        return self.run.train.batch(rows, pad_id=self.run.tokenizer.pad_token_id)

    def sample(self, rows: list[dict[str, Any]], step: int, *, data: DistillRows | None = None):
        """The student's samples (rollout.n_samples_per_prompt each) of the prompts of `rows`."""
        assert self.engines is not None
        prompts = (data or self.run.train).prompts([m["row"] for m in rows])
        n, seed = self.cfg.rollout.n_samples_per_prompt, sample_seed(self.cfg.run.seed, step)
        outputs = self.engines.generate(prompts.token_ids, self.cfg.rollout.sampling, n=n, seed=seed)
        batch = build_rollout_batch(prompts, outputs, pad_id=self.run.tokenizer.pad_token_id)
        lengths = batch.response_mask.sum(-1).float()
        return batch, {"distill/on_policy": 1.0, "rollout/response_length": float(lengths.mean())}

    def score(self, batch: RolloutBatch) -> TeacherSupport:
        d = self.cfg.distill
        return TeacherSupport.concat(self.teacher.call(TeacherWorker.compute_support, batch, d.top_k, d.temperature))

    def update(self, batch: RolloutBatch, teacher: TeacherSupport) -> dict[str, float]:
        return self.policy.call(DistillPolicyWorker.distill_update, batch, teacher.logprobs, teacher.token_ids)

    def divergences(self, batch: RolloutBatch, prefix: str) -> dict[str, float]:
        """Per-token forward KL(T||S) and reverse KL(S||T) of the current student on `batch`."""
        teacher = self.score(batch)
        parts = self.policy.call(DistillPolicyWorker.divergence_sums, batch, teacher.logprobs, teacher.token_ids)
        fkl, rkl, tokens = torch.stack(parts).sum(0).tolist()
        return {f"{prefix}/forward_kl": fkl / max(tokens, 1.0), f"{prefix}/reverse_kl": rkl / max(tokens, 1.0)}

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        run_cfg = self.cfg.run
        self.resume()
        last: dict[str, float] = {}
        if self.step_done == 0:
            last = self.metrics.log(0, self.evaluate())
        for step in make_progress(range(self.step_done, run_cfg.total_steps), run_cfg, initial=self.step_done):
            metrics = self.step(step)
            self.step_done = step + 1
            last = self._end_step(metrics)
        self._evaluate_at_end(last)
        self.save_final()
        return last

    def evaluate(self) -> dict[str, float]:
        """KL to the teacher on the held-out responses and, on-policy, on the student's samples of their prompts."""
        ev = self.run.eval
        if ev is None:
            return {}
        rows = list(range(len(ev)))
        metrics = self.divergences(ev.batch(rows, pad_id=self.run.tokenizer.pad_token_id), "eval")
        if self.rollout is not None:
            samples, stats = self.sample([{"row": i} for i in rows], EVAL_SEED_STEP, data=ev)
            metrics.update(self.divergences(samples, "eval/samples"))
            metrics["eval/samples/response_length"] = stats["rollout/response_length"]
        return metrics

    def save_checkpoint(self) -> Path:
        state = {"row_stream": {**self.stream.state(), **self.stream_identity()}, "config": config_container(self.cfg)}
        return self.checkpoints.save(self.step_done, state, {"policy": self.policy})

    def resume(self) -> None:
        """Restore the newest (or named) checkpoint; on-policy, push the restored weights into the engines."""
        state = self.checkpoints.restore(self.cfg.run.resume, {"policy": self.policy}, check=self.check_same_stream)
        if state is None:
            return
        self.step_done = int(state["step"])
        self.stream.load_state(state["row_stream"])
        if self.engines is not None:
            self.engines.sync()

    def check_same_stream(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """CheckpointError unless `checkpoint` was written by a run drawing the same rows in the same order."""
        saved = state["row_stream"]
        identity = self.stream_identity()
        if {k: saved.get(k) for k in identity} != identity:
            raise CheckpointError(
                f"{checkpoint} was written by a run that drew {saved.get('batch_size')} of {saved.get('rows')} rows "
                f"per draw with seed {saved.get('seed')} (shuffle {saved.get('shuffle')}); this run has "
                f"{identity['batch_size']} of {identity['rows']}, seed {identity['seed']} (shuffle "
                f"{identity['shuffle']}); resume with the same data and batch settings or use a new run.output_dir"
            )

    def stream_identity(self) -> dict[str, Any]:
        """What the stream's position means: a saved position only resumes a stream with the same values."""
        s = self.stream
        return {"rows": len(s.token_ids), "batch_size": s.batch_size, "seed": s.seed, "shuffle": s.shuffle}

    def save_final(self) -> Path:
        final = self.run.output_dir / "final"
        self.policy.call(PolicyWorker.save_hf, str(final))
        self.run.tokenizer.save_pretrained(final)
        logger.info("final student saved to %s", final)
        return final

    def close(self) -> None:
        self.metrics.close()
        if self.rollout is not None:
            self.rollout.shutdown()
        self.policy.shutdown()
        self.teacher.shutdown()
