"""stage=generate: sample a model over a prompt set into a dataset; rejection sampling (best-of-n) on top.

    rlhf stage=generate model.path=<ckpt> data.train=<prompts> rollout.n_samples_per_prompt=8 \
        generate.keep=best generate.pairs=true generate.output=<dir>

Output (generate.output, default <run.output_dir>/generated), each subdirectory a dataset that
`datasets.load_dataset(<subdir>)` and our own loaders (data.train=<subdir>) read:

  samples/     one row per sample: prompt_index, sample_index, prompt (as in the source: text or
               messages), response, prompt_tokens, response_tokens, finish_reason, score (when a
               reward is configured; the RewardPipeline's weighted total), then the prompt row's
               other fields (e.g. answer, task; a field named like one of ours is dropped).
               prompt + response make it an SFT "instruction" dataset as it stands.
  sft/         generate.keep=best|above_threshold: the kept samples (prompt, response, score, ...),
               the SFT stage's instruction format (rlhf.data.examples).
  preference/  generate.pairs=true: per prompt, chosen = the best-scored sample, rejected = the
               worst (ties: the lower sample index), margin = their score difference; prompts whose
               samples all score the same are skipped. The RM/DPO stages' preference format.
  generation.json  the settings fingerprint, shard plan and, once complete, the row counts.

Resume: prompts are cut into shards of generate.shard_size; shard k's files are written under a
temporary name and renamed, samples/ last, so a shard exists exactly when its samples file does.
A rerun with the same settings skips finished shards (a different fingerprint is refused). Sample
j of prompt i is drawn with seed run.seed × 2^32 + i × n + j (rlhf.engines.rollout.base), and a
shard is always generated as one call over the same prompts, so an interrupted and resumed run
writes byte-identical rows to an uninterrupted one.

Seed-prompt expansion (generate.expand.enabled=true, rlhf.trainers.expand) first has the model write
new instructions from a few seed prompts of data.train into expanded/; generate.expand.then_generate
then samples the seeds plus those instead of the seeds alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rlhf.config import (
    DTYPES,
    ROLLOUT_BACKENDS,
    RLHFConfig,
    SamplingConfig,
    check_reward,
    require,
    require_choice,
    validate,
)
from rlhf.errors import ConfigError

if TYPE_CHECKING:
    from rlhf.trainers.expand import ExpansionJob

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet")
KEEP_MODES = ("all", "best", "above_threshold")
MANIFEST = "generation.json"
SEED_STRIDE = 2**32
"""Sampling seeds of run.seed s start at s × 2^32: runs with different seeds never share a sample's seed."""
SAMPLE_COLUMNS = (
    "prompt_index",
    "sample_index",
    "prompt",
    "response",
    "prompt_tokens",
    "response_tokens",
    "finish_reason",
    "score",
)


# ---------------------------------------------------------------------------------------- config


def has_reward(cfg: RLHFConfig) -> bool:
    """Whether any reward term is configured (then samples are scored)."""
    r = cfg.reward
    return bool(r.fn or r.components or r.model_path or r.remote.url or r.judge.model_path)


def validate_generation(cfg: RLHFConfig) -> None:
    """stage=generate / stage=eval fields; ConfigError saying what to change."""
    _check_sampling(cfg)
    if cfg.stage == "generate":
        g = cfg.generate
        require_choice(g.format, FORMATS, "generate.format")
        require_choice(g.keep, KEEP_MODES, "generate.keep")
        require(g.shard_size >= 1, f"generate.shard_size must be >= 1 (got {g.shard_size})")
        require(g.max_prompts >= 0, f"generate.max_prompts must be >= 0, 0 meaning all (got {g.max_prompts})")
        require(g.max_shards_per_run >= 0, f"generate.max_shards_per_run must be >= 0 (got {g.max_shards_per_run})")
        require(
            (g.keep == "all" and not g.pairs) or has_reward(cfg),
            f"generate.keep={g.keep} / generate.pairs={g.pairs} rank samples by their reward: configure one "
            "(reward.fn, reward.model_path, ...) or use generate.keep=all generate.pairs=false",
        )
        require(
            not g.pairs or cfg.rollout.n_samples_per_prompt >= 2,
            "generate.pairs=true pairs the best and worst sample of a prompt: set rollout.n_samples_per_prompt >= 2",
        )
        from rlhf.trainers.expand import validate_expand

        validate_expand(cfg)
    else:
        from rlhf.trainers.evaluate import validate_eval

        validate_eval(cfg)
    if has_reward(cfg):
        check_reward(cfg.reward)


def _check_sampling(cfg: RLHFConfig) -> None:
    rollout = cfg.rollout
    require_choice(rollout.backend, ROLLOUT_BACKENDS, "rollout.backend")
    require(rollout.num_engines >= 1, f"rollout.num_engines must be >= 1 (got {rollout.num_engines})")
    require(rollout.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt must be >= 1")
    for name, sampling in (("sampling", rollout.sampling), ("eval_sampling", rollout.eval_sampling)):
        require(sampling.max_new_tokens >= 1, f"rollout.{name}.max_new_tokens must be >= 1")
        require(0 < sampling.top_p <= 1, f"rollout.{name}.top_p must be in (0, 1] (got {sampling.top_p})")
        require(sampling.temperature >= 0, f"rollout.{name}.temperature must be >= 0 (0: greedy)")
    require(cfg.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
    require_choice(cfg.model.dtype, DTYPES, "model.dtype")


def sampling_seed(run_seed: int) -> int:
    """Base seed: sample j of prompt i (global index) is drawn with this + i × n + j."""
    return run_seed * SEED_STRIDE


# ---------------------------------------------------------------------------------------- prompts


@dataclass
class PromptSet:
    """Prompts as the source wrote them (for the dataset), tokenised (for the engines), and their rows."""

    prompts: list[Any]
    token_ids: list[list[int]]
    texts: list[str]
    """Rendered prompt (special tokens kept): what reward functions receive as the prompt."""
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.token_ids)

    def batch(self, start: int, end: int):
        from rlhf.data.stream import PromptBatch

        return PromptBatch(self.token_ids[start:end], self.texts[start:end], self.metadata[start:end])


def load_prompt_set(source: str, cfg: RLHFConfig, tokenizer: Any, *, limit: int = 0) -> PromptSet:
    """The first `limit` (0: all) prompts of `source`, checked and tokenised like RL prompts."""
    from rlhf.data.prompts import encode_prompts, load_prompt_dataset, prompt_metadata

    answer_key = cfg.data.answer_key if cfg.reward.fn or cfg.reward.components else None
    rows = load_prompt_dataset(source, prompt_key=cfg.data.prompt_key, answer_key=answer_key)
    rows = rows[:limit] if limit else rows
    token_ids = encode_prompts(
        rows, tokenizer, max_prompt_length=cfg.data.max_prompt_length, use_chat_template=cfg.data.use_chat_template
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids]
    return PromptSet([r.prompt for r in rows], token_ids, texts, [prompt_metadata(r) for r in rows])


# ---------------------------------------------------------------------------------------- engines


class SampleEngines:
    """One model's rollout engines plus the run's reward terms: sample a prompt range, score it.

    Sample j of prompt i (index into the PromptSet) always gets seed `base_seed + i × n + j`,
    whichever range it is generated in.
    """

    def __init__(self, cfg: RLHFConfig, model_path: str, tokenizer: Any, rewards: Any = None):
        from rlhf.trainers.roles import start_group
        from rlhf.workers.rollout import RolloutGroup

        self.cfg, self.tokenizer, self.rewards = cfg, tokenizer, rewards
        self.base_seed = sampling_seed(cfg.run.seed)
        self.rollout = RolloutGroup(model_path, cfg.model, cfg.rollout, cfg.cluster, seed=cfg.run.seed)
        if rewards is not None:
            rewards.start(partial(start_group, cfg.cluster))

    def sample_async(self, prompts: PromptSet, start: int, end: int, sampling: SamplingConfig, n: int):
        """Start generating prompts [start, end); pass the result to `wait`."""
        seed = self.base_seed + start * n
        return self.rollout.generate_async(prompts.token_ids[start:end], sampling, n, seed)

    def wait(self, pending) -> list:
        return self.rollout.wait(pending)

    def batch(self, prompts: PromptSet, start: int, outputs: list) -> Any:
        """The RolloutBatch of the outputs of prompts start, start+1, ... (prompt-major rows)."""
        from rlhf.trainers.rl import build_rollout_batch

        return build_rollout_batch(
            prompts.batch(start, start + len(outputs)), outputs, pad_id=self.tokenizer.pad_token_id
        )

    def score(self, prompts: PromptSet, start: int, outputs: list) -> tuple[Any, Any, dict[str, Any]]:
        """(RolloutBatch, total scores [B] or None, reward stats) of the outputs of prompts start, start+1, ..."""
        batch = self.batch(prompts, start, outputs)
        if self.rewards is None:
            return batch, None, {}
        scores, stats = self.rewards.score(batch)
        return batch, scores, stats

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        self.rollout.shutdown()


# ---------------------------------------------------------------------------------------- rows


def sample_rows(prompts: PromptSet, start: int, outputs: list, scores: Optional[list[float]]) -> list[dict[str, Any]]:
    """Dataset rows of prompts start, start+1, ... (prompt-major, as the engines return them)."""
    from rlhf.data.prompts import RAW_PROMPT  # the "prompt" column already holds it

    rows = []
    for offset, generations in enumerate(outputs):
        i = start + offset
        extra = {k: v for k, v in prompts.metadata[i].items() if k not in SAMPLE_COLUMNS and k != RAW_PROMPT}
        for j, gen in enumerate(generations):
            row: dict[str, Any] = {
                "prompt_index": i,
                "sample_index": j,
                "prompt": prompts.prompts[i],
                "response": gen.text,
                "prompt_tokens": len(prompts.token_ids[i]),
                "response_tokens": len(gen.token_ids),
                "finish_reason": gen.finish_reason,
            }
            if scores is not None:
                row["score"] = float(scores[offset * len(generations) + j])
            rows.append({**row, **extra})
    return rows


def group_by_prompt(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by prompt_index, in order of first appearance."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(int(row["prompt_index"]), []).append(row)
    return list(groups.values())


def select_sft(rows: list[dict[str, Any]], keep: str, threshold: float) -> list[dict[str, Any]]:
    """Rejection sampling: per prompt the best sample (ties: lowest sample_index) if it scores >= threshold
    (keep=best), or every sample that does (keep=above_threshold); rows in the SFT instruction format."""
    kept = []
    for group in group_by_prompt(rows):
        if keep == "best":
            best = max(group, key=lambda r: (r["score"], -r["sample_index"]))
            candidates = [best]
        else:
            candidates = group
        kept += [_sft_row(r) for r in candidates if r["score"] >= threshold]
    return kept


def _sft_row(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("prompt_index", "sample_index", "prompt", "response", "score")
    return {k: row[k] for k in keys}


def preference_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per prompt: chosen = best-scored sample, rejected = worst (ties: lowest sample_index); groups
    whose samples all score the same carry no preference and are skipped."""
    pairs = []
    for group in group_by_prompt(rows):
        best = max(group, key=lambda r: (r["score"], -r["sample_index"]))
        worst = min(group, key=lambda r: (r["score"], r["sample_index"]))
        if best["score"] == worst["score"]:
            continue
        pairs.append(
            {
                "prompt_index": best["prompt_index"],
                "prompt": best["prompt"],
                "chosen": best["response"],
                "rejected": worst["response"],
                "chosen_score": best["score"],
                "rejected_score": worst["score"],
                "margin": best["score"] - worst["score"],
            }
        )
    return pairs


# ---------------------------------------------------------------------------------------- storage


class ShardStore:
    """Shard k of each set lives at <root>/<set>/train-<k>-of-<total>.<format>; written atomically.

    The `marker` set's file is written last, even when empty: shard k is done exactly when it exists.
    """

    def __init__(self, root: Path, fmt: str, num_shards: int, marker: str = "samples"):
        self.root, self.fmt, self.num_shards, self.marker = root, fmt, num_shards, marker

    def path(self, subset: str, k: int) -> Path:
        return self.root / subset / f"train-{k:05d}-of-{self.num_shards:05d}.{self.fmt}"

    def done(self, k: int) -> bool:
        return self.path(self.marker, k).exists()

    def write(self, k: int, subsets: dict[str, list[dict[str, Any]]]) -> None:
        """Write every non-empty subset of shard k, the marker set last (its rename marks the shard done)."""
        for subset in sorted(subsets, key=lambda s: s == self.marker):
            rows = subsets[subset]
            if rows or subset == self.marker:
                write_rows(self.path(subset, k), rows, self.fmt)

    def read_shard(self, subset: str, k: int) -> list[dict[str, Any]]:
        return read_rows(self.path(subset, k))

    def read(self, subset: str) -> list[dict[str, Any]]:
        return [row for k in range(self.num_shards) for row in read_rows(self.path(subset, k))]

    def remove_temporaries(self) -> None:
        for tmp in self.root.glob("*/.*.tmp"):
            tmp.unlink()


def write_rows(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    """Write rows to a hidden temporary file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one shard file; [] when it does not exist (an empty filtered shard is not written)."""
    if not path.exists():
        return []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------- the stage


@dataclass
class GenerationJob:
    """Everything checked and loaded before Ray starts."""

    cfg: RLHFConfig
    model_path: str
    tokenizer: Any
    prompts: PromptSet
    rewards: Any
    store: ShardStore
    manifest: dict[str, Any]
    expansion: Optional[ExpansionJob] = None
    """Seed-prompt expansion to run first (generate.expand.enabled), else None."""


def prepare_generation(cfg: RLHFConfig) -> GenerationJob:
    """Validate, load and tokenise the prompts, load the reward terms, check the output directory."""
    from rlhf.models.loading import load_tokenizer, resolve_model_path
    from rlhf.rewards import build_reward_pipeline
    from rlhf.trainers.expand import prepare_expansion

    validate(cfg)
    g = cfg.generate
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    prompts = load_prompt_set(cfg.data.train, cfg, tokenizer, limit=g.max_prompts)
    samples_wanted = not g.expand.enabled or g.expand.then_generate
    rewards = build_reward_pipeline(cfg, tokenizer) if has_reward(cfg) and samples_wanted else None
    root = Path(g.output or Path(cfg.run.output_dir) / "generated")
    manifest = {"fingerprint": fingerprint(cfg, model_path, len(prompts))}
    check_manifest(root / MANIFEST, manifest)
    expansion = prepare_expansion(cfg, model_path, tokenizer, prompts, root) if g.expand.enabled else None
    job = GenerationJob(
        cfg, model_path, tokenizer, prompts, rewards, ShardStore(root, g.format, 0), manifest, expansion
    )
    return plan_shards(job, prompts)


def plan_shards(job: GenerationJob, prompts: PromptSet) -> GenerationJob:
    """The job sampling `prompts`: its shard store and manifest (the fingerprint is kept)."""
    g = job.cfg.generate
    num_shards = -(-len(prompts) // g.shard_size)
    manifest = {
        "fingerprint": job.manifest["fingerprint"],
        "num_prompts": len(prompts),
        "num_shards": num_shards,
        "shard_size": g.shard_size,
        "n_samples_per_prompt": job.cfg.rollout.n_samples_per_prompt,
        "format": g.format,
        "complete": False,
    }
    store = ShardStore(job.store.root, g.format, num_shards)
    return dataclasses.replace(job, prompts=prompts, store=store, manifest=manifest)


def fingerprint(cfg: RLHFConfig, model_path: str, num_prompts: int) -> str:
    """Hash of every setting that changes which rows a generation writes."""
    settings = {
        "model": model_path,
        "dtype": cfg.model.dtype,
        "data": [cfg.data.train, cfg.data.prompt_key, cfg.data.answer_key, cfg.data.use_chat_template, num_prompts],
        "rollout": [cfg.rollout.backend, cfg.rollout.n_samples_per_prompt, dataclasses.asdict(cfg.rollout.sampling)],
        "seed": cfg.run.seed,
        "generate": {k: v for k, v in dataclasses.asdict(cfg.generate).items() if k != "max_shards_per_run"},
        "reward": dataclasses.asdict(cfg.reward) if has_reward(cfg) else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """A generation already in `path`'s directory must have been made with the same settings."""
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    if previous.get("fingerprint") != manifest["fingerprint"]:
        raise ConfigError(
            f"{path.parent} holds a generation made with other settings (model, prompts, sampling, seed, "
            f"shards or reward differ: fingerprint {previous.get('fingerprint')} != {manifest['fingerprint']}); "
            "set generate.output to a new directory, or delete that one to start over"
        )


def run_generate(cfg: RLHFConfig) -> dict[str, float]:
    """stage=generate: expand the seed prompts (generate.expand) and/or write (or finish) the samples; counts."""
    job = prepare_generation(cfg)
    with LazyEngines(job) as engines:
        result: dict[str, float] = {}
        if job.expansion is not None:
            from rlhf.trainers.expand import expansion_metrics, run_expansion, with_expanded

            kept = run_expansion(job.expansion, engines)
            result = expansion_metrics(job.expansion)
            if not cfg.generate.expand.then_generate:
                return result
            job = plan_shards(job, with_expanded(job.prompts, kept, job.tokenizer, cfg))
        return {**result, **sample(job, engines)}


class LazyEngines:
    """The run's SampleEngines, started with Ray on the first call: a finished run rerun starts nothing."""

    def __init__(self, job: GenerationJob):
        self.job, self.stack, self.engines = job, ExitStack(), None

    def __call__(self) -> SampleEngines:
        if self.engines is None:
            from rlhf.utils.ray_session import ray_session

            job = self.job
            self.stack.enter_context(ray_session(job.cfg.cluster, deterministic=job.cfg.run.deterministic))
            self.engines = SampleEngines(job.cfg, job.model_path, job.tokenizer, job.rewards)
            self.stack.callback(self.engines.close)
        return self.engines

    def __enter__(self) -> LazyEngines:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stack.close()


def sample(job: GenerationJob, engines: LazyEngines) -> dict[str, float]:
    """Write the sample shards still missing (up to generate.max_shards_per_run), then count."""
    cfg = job.cfg
    job.store.root.mkdir(parents=True, exist_ok=True)
    job.store.remove_temporaries()
    write_json(job.store.root / MANIFEST, job.manifest)
    todo = [k for k in range(job.store.num_shards) if not job.store.done(k)]
    logger.info(
        "generate: %d prompts × %d samples, %d shards (%d to do) into %s",
        len(job.prompts), cfg.rollout.n_samples_per_prompt, job.store.num_shards, len(todo), job.store.root,
    )  # fmt: skip
    if cfg.generate.max_shards_per_run:
        todo = todo[: cfg.generate.max_shards_per_run]
    if todo:
        generate_shards(job, engines(), todo)
    return finish(job)


def generate_shards(job: GenerationJob, engines: SampleEngines, todo: list[int]) -> None:
    """Generate, score and write each shard of `todo`; the next shard's generation overlaps this one's writing."""
    cfg, g, n = job.cfg, job.cfg.generate, job.cfg.rollout.n_samples_per_prompt

    def submit(k: int):
        start, end = k * g.shard_size, min((k + 1) * g.shard_size, len(job.prompts))
        return engines.sample_async(job.prompts, start, end, cfg.rollout.sampling, n)

    pending = submit(todo[0])
    for position, k in enumerate(todo):
        outputs = engines.wait(pending)
        if position + 1 < len(todo):
            pending = submit(todo[position + 1])
        start = k * g.shard_size
        _, scores, _ = engines.score(job.prompts, start, outputs)
        rows = sample_rows(job.prompts, start, outputs, None if scores is None else scores.tolist())
        subsets = {"samples": rows}
        if g.keep != "all":
            subsets["sft"] = select_sft(rows, g.keep, g.threshold)
        if g.pairs:
            subsets["preference"] = preference_pairs(rows)
        job.store.write(k, subsets)
        logger.info("generate: shard %d/%d written (%d rows)", k + 1, job.store.num_shards, len(rows))


def finish(job: GenerationJob) -> dict[str, float]:
    """Counts of what is on disk; when every shard is there, mark the manifest complete."""
    store = job.store
    done = sum(store.done(k) for k in range(store.num_shards))
    result = {"generate/shards_done": float(done), "generate/shards_total": float(store.num_shards)}
    if done < store.num_shards:
        logger.info("generate: %d of %d shards done; rerun with the same settings to continue", done, store.num_shards)
        return {**result, "generate/complete": 0.0}
    samples = store.read("samples")
    counts = {
        "rows": len(samples),
        "sft_rows": len(store.read("sft")),
        "preference_rows": len(store.read("preference")),
    }
    result.update({f"generate/{k}": float(v) for k, v in counts.items()})
    result["generate/truncated_frac"] = sum(r["finish_reason"] == "length" for r in samples) / len(samples)
    if samples and "score" in samples[0]:
        result["reward/mean"] = sum(r["score"] for r in samples) / len(samples)
    write_json(store.root / MANIFEST, {**job.manifest, **counts, "complete": True, "metrics": result})
    logger.info("generate: complete, %s", ", ".join(f"{k}={v:g}" for k, v in result.items()))
    return {**result, "generate/complete": 1.0}


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write a small JSON file atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
