"""generate.expand: the model writes new instructions from a few seed prompts (Self-Instruct style).

    rlhf stage=generate model.path=<ckpt> data.train=<seeds> generate.expand.enabled=true \
        generate.expand.num_new=500 [generate.expand.then_generate=true]

Output, next to stage=generate's sets (each subdirectory a dataset our loaders and `datasets` read):

  expanded/           one row per kept instruction: expansion_index, prompt (a string, or a one-turn
                      chat prompt when the seeds are chat messages), prompt_tokens, attempt,
                      seed_indices (the rows of data.train shown in its few-shot prompt: the
                      provenance), similarity / closest (its highest ROUGE-L F1 against the pool and
                      that entry). Exact and near duplicates of seeds and of each other are dropped.
  expanded_rejected/  one row per dropped attempt: attempt, reason (empty, unparseable, too_long,
                      exact_duplicate, near_duplicate), response, finish_reason, instruction,
                      seed_indices, similarity, closest.
  expansion.json      settings fingerprint and, once complete, the counts: attempts = accepted +
                      the sum of the rejection reasons.

Resume: attempts are cut into rounds of generate.shard_size; round r's rejected rows then its kept
rows are written atomically (kept last: that file marks the round done), and a rerun replays the
finished rounds into the dedup pool before going on. Attempt a's shots and sampling seed depend on
(run.seed, a) only, so a resumed expansion writes the same rows as an uninterrupted one, none twice.
The pure pieces (prompts, parsing, similarity) are rlhf.data.expansion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import RLHFConfig, require
from rlhf.data.expansion import (
    ACCEPTED,
    REJECT_REASONS,
    TOO_LONG,
    DedupPool,
    check_template,
    choose_shots,
    fewshot_prompt,
    instruction_text,
    parse_instruction,
)
from rlhf.errors import ConfigError
from rlhf.trainers.generate import PromptSet, SampleEngines, ShardStore, sampling_seed, write_json

logger = logging.getLogger(__name__)

EXPANDED = "expanded"
REJECTED = "expanded_rejected"
SUMMARY = "expansion.json"
ATTEMPT_SEED_OFFSET = 2**31
"""Attempt a samples with seed run.seed × 2^32 + 2^31 + a: away from the response samples' seeds."""


def validate_expand(cfg: RLHFConfig) -> None:
    """generate.expand.* (when enabled); ConfigError saying what to change."""
    e = cfg.generate.expand
    if not e.enabled:
        return
    require(e.num_new >= 1, f"generate.expand.num_new must be >= 1 (got {e.num_new})")
    require(e.shots >= 1, f"generate.expand.shots must be >= 1 (got {e.shots})")
    require(
        0 < e.similarity_threshold <= 1,
        f"generate.expand.similarity_threshold is a ROUGE-L F1 in (0, 1] (got {e.similarity_threshold}; "
        "Self-Instruct uses 0.7, 1.0 drops exact duplicates only)",
    )
    require(
        e.max_attempts >= e.num_new,
        f"generate.expand.max_attempts {e.max_attempts} < num_new {e.num_new}: every kept instruction takes "
        "at least one attempt; raise max_attempts",
    )
    s = e.sampling
    require(s.max_new_tokens >= 1, "generate.expand.sampling.max_new_tokens must be >= 1")
    require(0 < s.top_p <= 1, f"generate.expand.sampling.top_p must be in (0, 1] (got {s.top_p})")
    require(s.temperature >= 0, "generate.expand.sampling.temperature must be >= 0 (0: greedy)")
    check_template(e.template)
    require(
        not (e.then_generate and (cfg.reward.fn or cfg.reward.components)),
        "generate.expand.then_generate=true samples the expanded prompts too, which have no reference answer "
        "for reward.fn / reward.components: use a reward model or judge, no reward, or then_generate=false",
    )


# ---------------------------------------------------------------------------------------- the job


@dataclass
class ExpansionJob:
    """Everything checked and loaded before Ray starts."""

    cfg: RLHFConfig
    tokenizer: Any
    seeds: PromptSet
    instructions: list[str]
    """Each seed's instruction text (a chat prompt's last user turn), as shown in few-shot prompts."""
    store: ShardStore
    summary: dict[str, Any]


def prepare_expansion(cfg: RLHFConfig, model_path: str, tokenizer: Any, seeds: PromptSet, root: Path) -> ExpansionJob:
    """Check the seeds against the settings and a previous expansion in `root`."""
    e, g = cfg.generate.expand, cfg.generate
    if e.shots > len(seeds):
        raise ConfigError(
            f"generate.expand.shots={e.shots} but data.train has {len(seeds)} seed prompts "
            f"(generate.max_prompts={g.max_prompts}); lower shots or add seeds"
        )
    num_rounds = -(-e.max_attempts // g.shard_size)
    summary = {
        "fingerprint": expansion_fingerprint(cfg, model_path, len(seeds)),
        "num_seeds": len(seeds),
        "num_rounds": num_rounds,
        "attempts_per_round": g.shard_size,
        "complete": False,
    }
    path = root / SUMMARY
    if path.exists() and json.loads(path.read_text()).get("fingerprint") != summary["fingerprint"]:
        raise ConfigError(
            f"{root} holds an expansion made with other settings (model, seeds, generate.expand, sampling or "
            "seed differ); set generate.output to a new directory, or delete that one to start over"
        )
    instructions = [instruction_text(p) for p in seeds.prompts]
    store = ShardStore(root, g.format, num_rounds, marker=EXPANDED)
    return ExpansionJob(cfg, tokenizer, seeds, instructions, store, summary)


def expansion_fingerprint(cfg: RLHFConfig, model_path: str, num_seeds: int) -> str:
    """Hash of every setting that changes which rows an expansion writes."""
    e = {k: v for k, v in dataclasses.asdict(cfg.generate.expand).items() if k != "then_generate"}
    settings = {
        "model": model_path,
        "dtype": cfg.model.dtype,
        "backend": cfg.rollout.backend,
        "data": [cfg.data.train, cfg.data.prompt_key, cfg.data.use_chat_template, cfg.data.max_prompt_length],
        "num_seeds": num_seeds,
        "attempts_per_round": cfg.generate.shard_size,
        "expand": e,
        "seed": cfg.run.seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- running


@dataclass
class ExpansionState:
    """The dedup pool (seeds, then kept instructions in order) and the next round to run."""

    pool: DedupPool
    kept: list[dict[str, Any]]
    next_round: int


def replay(job: ExpansionJob) -> ExpansionState:
    """Rebuild the pool from the seeds and the finished rounds (a prefix: rounds are written in order)."""
    pool = DedupPool(job.cfg.generate.expand.similarity_threshold)
    for text in job.instructions:
        pool.add(text)
    kept, r = [], 0
    while r < job.store.num_shards and job.store.done(r):
        for row in job.store.read_shard(EXPANDED, r):
            pool.add(instruction_text(row["prompt"]))
            kept.append(row)
        r += 1
    return ExpansionState(pool, kept, r)


def is_done(job: ExpansionJob, state: ExpansionState) -> bool:
    return len(state.kept) >= job.cfg.generate.expand.num_new or state.next_round >= job.store.num_shards


def run_expansion(job: ExpansionJob, engines: Callable[[], SampleEngines]) -> list[dict[str, Any]]:
    """Run the rounds still missing (starting the engines only if there are any); the kept rows."""
    state = replay(job)
    job.store.root.mkdir(parents=True, exist_ok=True)
    job.store.remove_temporaries()
    write_json(job.store.root / SUMMARY, job.summary)
    logger.info(
        "expand: %d seeds, %d of %d instructions kept in %d finished rounds",
        len(job.seeds), len(state.kept), job.cfg.generate.expand.num_new, state.next_round,
    )  # fmt: skip
    while not is_done(job, state):
        expand_round(job, state, engines())
        state.next_round += 1
    write_json(job.store.root / SUMMARY, {**job.summary, **summarize(job), "complete": True})
    return state.kept


def expand_round(job: ExpansionJob, state: ExpansionState, engines: SampleEngines) -> None:
    """Sample round r's attempts, judge them in attempt order until num_new are kept, write the round."""
    cfg, e = job.cfg, job.cfg.generate.expand
    size = cfg.generate.shard_size
    attempts = range(state.next_round * size, min((state.next_round + 1) * size, e.max_attempts))
    shots = [choose_shots(len(job.seeds), e.shots, cfg.run.seed, a) for a in attempts]
    texts = [fewshot_prompt(e.template, [job.instructions[i] for i in s]) for s in shots]
    seed = sampling_seed(cfg.run.seed) + ATTEMPT_SEED_OFFSET + attempts[0]  # attempt a: this + (a - attempts[0])
    outputs = engines.rollout.generate(encode(job, texts), e.sampling, 1, seed)
    kept, rejected = [], []
    for a, seed_indices, (gen,) in zip(attempts, shots, outputs):
        if len(state.kept) >= e.num_new:
            break
        row = judge(job, state.pool, gen.text, gen.finish_reason)
        if row["reason"] == ACCEPTED:
            state.pool.add(row["instruction"])
            kept.append(kept_row(job, len(state.kept), a, seed_indices, row))
            state.kept.append(kept[-1])
        else:
            rejected.append({"attempt": a, **row, "seed_indices": seed_indices})
    job.store.write(state.next_round, {REJECTED: rejected, EXPANDED: kept})
    logger.info(
        "expand: round %d: %d kept, %d dropped (%d of %d kept so far)",
        state.next_round, len(kept), len(rejected), len(state.kept), e.num_new,
    )  # fmt: skip


def judge(job: ExpansionJob, pool: DedupPool, response: str, finish_reason: str) -> dict[str, Any]:
    """Parse, length-check and dedup one continuation: {reason, response, finish_reason, instruction, ...}."""
    instruction, reason = parse_instruction(response, finish_reason)
    row: dict[str, Any] = {"reason": reason, "response": response, "finish_reason": finish_reason}
    row.update(instruction=instruction, prompt_tokens=None, similarity=None, closest=None)
    if instruction is None:
        return row
    row["prompt_tokens"] = len(encode(job, [instruction])[0])
    if row["prompt_tokens"] > job.cfg.data.max_prompt_length:
        return {**row, "reason": TOO_LONG}
    verdict = pool.check(instruction)
    closest = None if verdict.closest is None else pool.texts[verdict.closest]
    return {**row, "reason": verdict.reason, "similarity": verdict.similarity, "closest": closest}


def kept_row(job: ExpansionJob, index: int, attempt: int, seed_indices: list[int], judged: dict) -> dict[str, Any]:
    """A kept instruction as a prompt row, shaped like the seeds' prompts (text, or one chat user turn)."""
    text = judged["instruction"]
    prompt = text if isinstance(job.seeds.prompts[0], str) else [{"role": "user", "content": text}]
    return {
        "expansion_index": index,
        "prompt": prompt,
        "prompt_tokens": judged["prompt_tokens"],
        "attempt": attempt,
        "seed_indices": seed_indices,
        "similarity": judged["similarity"],
        "closest": judged["closest"],
    }


def encode(job: ExpansionJob, texts: list[str]) -> list[list[int]]:
    """Token ids of plain-text prompts, rendered the way data.train's prompts are (no length limit)."""
    from rlhf.data.prompts import PromptExample, encode_prompts

    rows = [PromptExample(t) for t in texts]
    return encode_prompts(
        rows, job.tokenizer, max_prompt_length=sys.maxsize, use_chat_template=job.cfg.data.use_chat_template
    )


def summarize(job: ExpansionJob) -> dict[str, Any]:
    """Counts of what is on disk: attempts = accepted + every rejection reason."""
    kept = job.store.read(EXPANDED)
    rejected = job.store.read(REJECTED)
    counts = {"accepted": len(kept), **{r: sum(row["reason"] == r for row in rejected) for r in REJECT_REASONS}}
    return {"attempts": len(kept) + len(rejected), "counts": counts}


def expansion_metrics(job: ExpansionJob) -> dict[str, float]:
    """The summary's counts as expand/* metrics, logged."""
    summary = json.loads((job.store.root / SUMMARY).read_text())
    metrics = {"expand/attempts": float(summary["attempts"])}
    metrics.update({f"expand/{k}": float(v) for k, v in summary["counts"].items()})
    logger.info("expand: complete, %s", ", ".join(f"{k}={v:g}" for k, v in metrics.items()))
    return metrics


# ---------------------------------------------------------------------------------------- seeds + new


def with_expanded(seeds: PromptSet, kept: list[dict[str, Any]], tokenizer: Any, cfg: RLHFConfig) -> PromptSet:
    """The seeds followed by the kept instructions; every row gets `origin` (seed / expanded) and the same keys."""
    from rlhf.data.prompts import PromptExample, encode_prompts

    keys = {k: None for meta in seeds.metadata for k in meta}
    new_rows = [PromptExample(row["prompt"]) for row in kept]
    token_ids = encode_prompts(
        new_rows, tokenizer, max_prompt_length=cfg.data.max_prompt_length, use_chat_template=cfg.data.use_chat_template
    )
    return PromptSet(
        seeds.prompts + [row["prompt"] for row in kept],
        seeds.token_ids + token_ids,
        seeds.texts + [tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids],
        [{**keys, **meta, "origin": "seed"} for meta in seeds.metadata]
        + [{**keys, "origin": "expanded"} for _ in kept],
    )
