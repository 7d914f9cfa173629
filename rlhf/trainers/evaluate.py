"""stage=eval: accuracy, pass@k, reward means and win rate of a model (any checkpoint) on a prompt set.

    rlhf stage=eval model.path=<run>/final data.eval=tiny:eval eval.n_samples=8 eval.k=[1,4,8]
    rlhf stage=eval eval.samples=<generated>/samples          # re-score a generated dataset, no model

Per prompt, eval.n_samples responses are drawn with rollout.sampling (sample j of prompt i seeded
as in stage=generate, so an evaluation is reproducible) and one greedy response with
rollout.eval_sampling (eval.greedy). Metrics (all means over prompts):

  eval/accuracy            greedy responses that reward.fn scores >= eval.correct_threshold
  eval/sampled_accuracy    the same over all sampled responses (= pass@1)
  eval/pass@k              unbiased estimator 1 - C(n-c, k)/C(n, k) (rlhf.algorithms.pass_at_k)
  eval/reward_mean, eval/reward_<term>_mean, eval/reward_model_raw_mean
                           the RewardPipeline's weighted total and per-term means over the samples
                           (a reward model's raw score in the last one)
  eval/win_rate            eval.reference_model set: the judge (reward.judge, pairwise) compares the
                           greedy responses of the model and the reference in both orders; a win in
                           both counts 1, a split or unparseable verdict 0.5, a loss in both 0
  eval/response_length, eval/truncated_frac

With agent.env set, every response is a trajectory: the model acts in the environment over turns, exactly as
the RL stages train it (rlhf.trainers.agent; docs/agents.md), and the sampled ones also report
eval/agent_<metric> (turns_mean, tool_calls, tool_errors, ...).

Results go to <eval.output or run.output_dir/eval>/eval_results.json (metrics, per-task metrics
when rows carry a "task" field, settings) and eval_results.md (the same as tables).
`evaluate_model(cfg, path)` is the entry for trainers at the end of a run (it joins the running
Ray session or starts one; call it after the trainer's actors are shut down so the engines fit).
With run.final_eval=true, `rlhf.cli.train` runs it on <run.output_dir>/final after any training
stage (`check_final_eval` before training, `run_final_eval` after), into <run.output_dir>/final_eval.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from rlhf.algorithms.pass_at_k import mean_pass_at_k
from rlhf.config import RLHFConfig, require, validate
from rlhf.trainers.generate import (
    SAMPLE_COLUMNS,
    PromptSet,
    SampleEngines,
    group_by_prompt,
    has_reward,
    load_prompt_set,
)

logger = logging.getLogger(__name__)

CHUNK = 64
"""Prompts per generate call."""
RESULTS = "eval_results"


def validate_eval(cfg: RLHFConfig) -> None:
    e = cfg.eval
    require(e.n_samples >= 1, f"eval.n_samples must be >= 1 (got {e.n_samples})")
    require(e.max_prompts >= 0, f"eval.max_prompts must be >= 0, 0 meaning all (got {e.max_prompts})")
    require(bool(e.k) and all(k >= 1 for k in e.k), f"eval.k must be a non-empty list of k >= 1 (got {e.k})")
    require(
        bool(e.samples) or max(e.k) <= e.n_samples,
        f"eval.k={e.k} asks for pass@{max(e.k)} from eval.n_samples={e.n_samples} samples; raise n_samples or drop k",
    )
    require(
        bool(e.samples or e.data or cfg.data.eval), "nothing to evaluate: set eval.data (or data.eval) or eval.samples"
    )
    require(
        not e.samples or bool(cfg.reward.fn),
        "eval.samples re-scores responses with the rule reward: set reward.fn (e.g. tiny_world, math)",
    )
    require(
        not e.reference_model or bool(cfg.reward.judge.model_path),
        "eval.reference_model needs a judge for the win rate: set reward.judge.model_path",
    )
    require(not (e.samples and e.reference_model), "eval.reference_model needs generation; unset eval.samples")
    if cfg.agent.env is not None:
        from rlhf.trainers.agent import check_agent

        check_agent(cfg)
        require(
            not e.samples,
            f"agent.env={cfg.agent.env} evaluates the model as trajectories with the environment at hand; "
            "eval.samples re-scores saved responses: unset one of them",
        )


def run_eval(cfg: RLHFConfig) -> dict[str, float]:
    """stage=eval: evaluate model.path (or re-score eval.samples), write the results; returns the metrics."""
    validate(cfg)
    if cfg.eval.samples:
        results = evaluate_samples(cfg)
        write_results(results, output_dir(cfg))
        return results["metrics"]
    return evaluate_model(cfg, cfg.model.path)


def output_dir(cfg: RLHFConfig) -> Path:
    return Path(cfg.eval.output or Path(cfg.run.output_dir) / "eval")


# ---------------------------------------------------------------------------------------- metrics


def pass_metrics(counts: list[tuple[int, int]], ks: list[int]) -> dict[str, float]:
    """sampled accuracy and pass@k from per-prompt (samples, correct); a k above the fewest samples is skipped."""
    fewest = min(n for n, _ in counts)
    metrics = {"eval/sampled_accuracy": sum(c for _, c in counts) / sum(n for n, _ in counts)}
    for k in ks:
        if k > fewest:
            logger.warning("eval: pass@%d skipped, a prompt has only %d samples", k, fewest)
            continue
        metrics[f"eval/pass@{k}"] = mean_pass_at_k(counts, k)
    return metrics


def per_task(tasks: list[Optional[str]], counts: list[tuple[int, int]], greedy: Optional[list[bool]], ks: list[int]):
    """The pass metrics (and greedy accuracy) of each task, when prompts carry a "task" field."""
    if not any(tasks):
        return {}
    table: dict[str, dict[str, float]] = {}
    for task in sorted({t for t in tasks if t}):
        rows = [i for i, t in enumerate(tasks) if t == task]
        table[task] = {"prompts": float(len(rows)), **pass_metrics([counts[i] for i in rows], ks)}
        if greedy is not None:
            table[task]["eval/accuracy"] = sum(greedy[i] for i in rows) / len(rows)
    return table


class Tally:
    """Running sums over chunks: correct counts per prompt, reward stats weighted by rows."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int]] = []
        self.greedy: list[bool] = []
        self.rows = 0
        self.sums: dict[str, float] = {}

    def add(self, key: str, value: float, weight: int) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight

    def means(self) -> dict[str, float]:
        return {k: v / self.rows for k, v in self.sums.items()}


def reward_means(stats: dict[str, Any]) -> dict[str, float]:
    """reward/<x>_mean → eval/reward_<x>_mean, reward/mean → eval/reward_mean."""
    return {"eval/" + k.replace("/", "_", 1): float(v) for k, v in stats.items() if k.endswith("mean")}


# ---------------------------------------------------------------------------------------- model


def evaluate_model(cfg: RLHFConfig, model_path: str, output: Optional[Path] = None) -> dict[str, float]:
    """Evaluate one checkpoint on eval.data (or data.eval); writes eval_results.{json,md}, returns the metrics."""
    from rlhf.models.loading import load_tokenizer, resolve_model_path
    from rlhf.rewards import build_reward_pipeline
    from rlhf.trainers.generate import validate_generation
    from rlhf.utils.ray_session import ray_session

    validate_generation(dataclasses.replace(cfg, stage="eval"))
    path = resolve_model_path(model_path)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    source = cfg.eval.data or cfg.data.eval
    prompts = load_prompt_set(source, cfg, tokenizer, limit=cfg.eval.max_prompts)
    if cfg.agent.env is not None:
        from rlhf.trainers.agent import dry_reset

        dry_reset(cfg, tokenizer, prompts.metadata[0], prompts.texts[0], source)
    rewards = build_reward_pipeline(cfg, tokenizer) if has_reward(cfg) else None
    with ray_session(cfg.cluster, deterministic=cfg.run.deterministic):
        engines = SampleEngines(cfg, path, tokenizer, rewards)
        try:
            tally, greedy_responses = sample_and_score(cfg, engines, prompts)
            metrics = summarize(cfg, tally)
            if cfg.eval.reference_model:
                metrics.update(win_rate(cfg, engines, prompts, greedy_responses))
        finally:
            engines.close()
    tasks = [m.get("task") for m in prompts.metadata]
    results = {
        "model": str(path),
        "data": source,
        "prompts": len(prompts),
        "n_samples": cfg.eval.n_samples,
        "sampling": dataclasses.asdict(cfg.rollout.sampling),
        "metrics": metrics,
        "per_task": per_task(tasks, tally.counts, tally.greedy or None, cfg.eval.k) if tally.counts else {},
    }
    write_results(results, output or output_dir(cfg))
    return metrics


FINAL_EVAL_DIR = "final_eval"
"""Where run.final_eval writes eval_results.{json,md}, under run.output_dir (eval.output is stage=eval's)."""


def check_final_eval(cfg: RLHFConfig) -> None:
    """run.final_eval=true: ConfigError/DataError about the end-of-run evaluation, raised before training starts.

    It reads the eval.* settings of stage=eval (data, max_prompts, n_samples, k, greedy,
    correct_threshold, reference_model), its prompts from eval.data or else data.eval (read as
    prompts: data.prompt_key, data.answer_key), rollout.* to generate, reward.* to score, and
    model.* except the path.
    """
    from rlhf.data.prompts import load_prompt_dataset
    from rlhf.models.peft_methods import PROMPT_METHODS
    from rlhf.trainers.generate import validate_generation

    require(
        cfg.model.peft.method not in PROMPT_METHODS,
        f"run.final_eval: model.peft.method={cfg.model.peft.method} keeps its result in final/adapter, which the "
        "rollout engines cannot load; set run.final_eval=false and evaluate with the adapter yourself",
    )
    require(not cfg.eval.samples, "run.final_eval generates with the trained model; unset eval.samples")
    require(bool(cfg.eval.data or cfg.data.eval), "run.final_eval needs prompts: set eval.data (or data.eval)")
    validate_generation(dataclasses.replace(cfg, stage="eval"))
    answer_key = cfg.data.answer_key if cfg.reward.fn or cfg.reward.components else None
    load_prompt_dataset(cfg.eval.data or cfg.data.eval, prompt_key=cfg.data.prompt_key, answer_key=answer_key)


def run_final_eval(cfg: RLHFConfig) -> dict[str, float]:
    """evaluate_model on <run.output_dir>/final into <run.output_dir>/final_eval; its metrics."""
    out = Path(cfg.run.output_dir)
    return evaluate_model(cfg, str(out / "final"), out / FINAL_EVAL_DIR)


def sample_and_score(cfg: RLHFConfig, engines: SampleEngines, prompts: PromptSet) -> tuple[Tally, list[str]]:
    """Per chunk of prompts: n sampled and one greedy response (with agent.env: trajectory), scored; the greedy
    responses' texts."""
    e, tally, greedy_texts = cfg.eval, Tally(), []
    correct_fn = engines.rewards.primary_fn if engines.rewards is not None else None
    sample = agent_sampler(cfg, engines) if cfg.agent.env is not None else single_turn_sampler(cfg, engines)
    for start in range(0, len(prompts), CHUNK):
        end = min(start + CHUNK, len(prompts))
        batch, _, truncated, extra = sample(prompts, start, end, e.n_samples, False)
        _, stats = engines.rewards.score(batch) if engines.rewards is not None else (None, {})
        rows = len(batch)
        tally.rows += rows
        for key, value in {**reward_means(stats), **extra}.items():
            tally.add(key, value, rows)
        tally.add("eval/response_length", batch.response_mask.sum(-1).float().mean(), rows)
        tally.add("eval/truncated_frac", truncated, rows)
        if correct_fn is not None:
            correct = is_correct(engines, correct_fn, batch, e.correct_threshold)
            tally.counts += [(e.n_samples, sum(correct[i : i + e.n_samples])) for i in range(0, rows, e.n_samples)]
        if e.greedy:
            greedy_batch, texts, _, _ = sample(prompts, start, end, 1, True)
            greedy_texts += texts
            if correct_fn is not None:
                tally.greedy += is_correct(engines, correct_fn, greedy_batch, e.correct_threshold)
    return tally, greedy_texts


Sampler = Callable[[PromptSet, int, int, int, bool], tuple[Any, list[str], float, dict[str, float]]]
"""(prompts, start, end, n, greedy) -> (RolloutBatch of prompts [start, end) × n, its response texts, the share
cut by a length limit, extra metric means)."""


def single_turn_sampler(cfg: RLHFConfig, engines: SampleEngines) -> Sampler:
    def sample(prompts: PromptSet, start: int, end: int, n: int, greedy: bool):
        sampling = cfg.rollout.eval_sampling if greedy else cfg.rollout.sampling
        outputs = engines.wait(engines.sample_async(prompts, start, end, sampling, n))
        truncated = sum(g.finish_reason == "length" for gs in outputs for g in gs) / max(1, (end - start) * n)
        return engines.batch(prompts, start, outputs), [g.text for gs in outputs for g in gs], truncated, {}

    return sample


def agent_sampler(cfg: RLHFConfig, engines: SampleEngines) -> Sampler:
    """agent.env: trajectories with the environment at hand, as the RL stages train them (rlhf.trainers.agent); the
    sampled ones also report eval/agent_<metric> (turns, tool calls, errors)."""
    from rlhf.trainers.agent import AgentRollout

    rollout = AgentRollout(cfg, engines.tokenizer)

    def sample(prompts: PromptSet, start: int, end: int, n: int, greedy: bool):
        batch, stats = rollout.generate(
            prompts.batch(start, end),
            n,
            engines.rollout.generate,
            seed=engines.base_seed + start * n,
            version=0,
            eval_mode=greedy,
        )
        extra = {"eval/" + k.replace("/", "_", 1): float(v) for k, v in stats.items() if k.startswith("agent/")}
        texts = engines.tokenizer.batch_decode(
            [ids[: int(k)] for ids, k in zip(batch.response_ids.tolist(), batch.response_mask.sum(-1).tolist())],
            skip_special_tokens=True,
        )
        return batch, texts, float(stats["rollout/truncated_frac"]), extra

    return sample


def is_correct(engines: SampleEngines, fn: Any, batch: Any, threshold: float) -> list[bool]:
    """reward.fn's verdict per row of `batch` (decoded as the reward pipeline decodes it)."""
    from rlhf.rewards.registry import score

    inputs = engines.rewards.inputs(batch)
    return [s >= threshold for s in score(fn, inputs.prompts, inputs.responses, inputs.metadata, name="reward.fn")]


def summarize(cfg: RLHFConfig, tally: Tally) -> dict[str, float]:
    metrics = tally.means()
    if tally.counts:
        metrics.update(pass_metrics(tally.counts, cfg.eval.k))
    if tally.greedy:
        metrics["eval/accuracy"] = sum(tally.greedy) / len(tally.greedy)
    return dict(sorted(metrics.items()))


def win_rate(cfg: RLHFConfig, engines: SampleEngines, prompts: PromptSet, responses: list[str]) -> dict[str, float]:
    """Pairwise judge verdicts of the model's vs the reference model's greedy responses, in both orders."""
    from rlhf.models.loading import resolve_model_path
    from rlhf.rewards.pipeline import JudgeTerm

    judge = next(t.judge for t in engines.rewards.terms if isinstance(t, JudgeTerm))
    reference = SampleEngines(cfg, resolve_model_path(cfg.eval.reference_model), engines.tokenizer)
    try:
        outputs = reference.wait(reference.sample_async(prompts, 0, len(prompts), cfg.rollout.eval_sampling, 1))
    finally:
        reference.close()
    reference_texts = [gs[0].text for gs in outputs]
    questions = engines.rewards.inputs(engines.batch(prompts, 0, outputs)).plain_prompts
    first, _ = judge.compare(questions, responses, reference_texts, prompts.metadata)  # model is A
    second, _ = judge.compare(questions, reference_texts, responses, prompts.metadata)  # model is B
    wins = [pairwise_outcome(a, b) for a, b in zip(first, second)]
    return {
        "eval/win_rate": sum(wins) / len(wins),
        "eval/judge_consistent_frac": sum(a is not None and b is not None and a != b for a, b in zip(first, second))
        / len(wins),
    }


def pairwise_outcome(model_first: Optional[int], model_second: Optional[int]) -> float:
    """1 when the model wins as A (verdict 0) and as B (verdict 1), 0 when it loses both, else 0.5."""
    if model_first == 0 and model_second == 1:
        return 1.0
    if model_first == 1 and model_second == 0:
        return 0.0
    return 0.5


# ---------------------------------------------------------------------------------------- samples


def evaluate_samples(cfg: RLHFConfig) -> dict[str, Any]:
    """Re-score a stage=generate samples dataset (or any prompt_index/prompt/response rows) with reward.fn."""
    from rlhf.data.sources import read_records
    from rlhf.rewards.pipeline import function_term
    from rlhf.rewards.registry import score

    rows = [r.fields for r in read_records(cfg.eval.samples)]
    fn = function_term(cfg.reward.fn, cfg.reward.kwargs, 1.0, None, cfg.rollout.sampling.max_new_tokens, "reward.fn").fn  # type: ignore[arg-type]
    groups = group_by_prompt(rows)
    counts, tasks = [], []
    for group in groups:
        metadata = [{k: v for k, v in r.items() if k not in SAMPLE_COLUMNS} for r in group]
        prompts = [r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]) for r in group]
        scores = score(fn, prompts, [r["response"] for r in group], metadata, name="reward.fn")
        counts.append((len(group), sum(s >= cfg.eval.correct_threshold for s in scores)))
        tasks.append(group[0].get("task"))
    metrics = pass_metrics(counts, cfg.eval.k)
    if all("response_tokens" in r for r in rows):
        metrics["eval/response_length"] = sum(r["response_tokens"] for r in rows) / len(rows)
    if all("finish_reason" in r for r in rows):
        metrics["eval/truncated_frac"] = sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    return {
        "samples": str(cfg.eval.samples),
        "prompts": len(groups),
        "rows": len(rows),
        "metrics": dict(sorted(metrics.items())),
        "per_task": per_task(tasks, counts, None, cfg.eval.k),
    }


# ---------------------------------------------------------------------------------------- output


def write_results(results: dict[str, Any], directory: Path) -> None:
    """eval_results.json and eval_results.md in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{RESULTS}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (directory / f"{RESULTS}.md").write_text(markdown(results))
    logger.info("eval: %s (written to %s)", ", ".join(f"{k}={v:.4f}" for k, v in results["metrics"].items()), directory)


def markdown(results: dict[str, Any]) -> str:
    what = results.get("model") or results.get("samples")
    lines = [f"# Evaluation of {what}", "", f"{results['prompts']} prompts.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in results["metrics"].items()]
    tasks = results.get("per_task") or {}
    if tasks:
        columns = sorted({c for row in tasks.values() for c in row})
        lines += ["", "| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for task, row in tasks.items():
            lines.append(f"| {task} | " + " | ".join(f"{row.get(c, float('nan')):.4g}" for c in columns) + " |")
    return "\n".join(lines) + "\n"
