"""Multi-stage recipes: run stages in sequence, each stage's final model feeding the next.

    rlhf-pipeline sft_dpo                      # conf/pipeline/sft_dpo.yaml
    rlhf-pipeline path/to/recipe.yaml run.seed=1 cluster=cpu_debug

A pipeline file names an output directory, overrides common to every stage, and the stages:

    output_dir: outputs/sft_dpo
    common: [cluster=cpu_debug]
    steps:
      - name: sft
        overrides: [stage=sft, model.path=tiny-init, data.train=tiny:sft:train]
      - name: dpo
        overrides: [stage=dpo, "model.path={sft}", data.train=tiny:preference:train]

`{name}` stands for the final model of an earlier step (`<output_dir>/<name>/final`). Each step is
composed from conf/ exactly as `rlhf <overrides>` would be, into `<output_dir>/<name>/`. Every step's
config is composed and validated before the first one starts, so a typo in the last stage fails
in seconds, not after hours of SFT (a path inside an earlier step's directory counts as existing). A step that finished (marker file written after its final
model) is skipped when the pipeline runs again, so an interrupted pipeline resumes where it stopped.
Extra command-line overrides apply to every step, after `common`; one written `<step>:<override>`
applies to that step only, after its own overrides (`rlhf-pipeline sft_rm_ppo ppo:run.total_steps=100`).

Each step ends with a summary line (logged, and written to <output_dir>/pipeline_summary.txt):
its held-out metrics at the first and last evaluation (eval/loss, eval/accuracy,
eval/reward_accuracy), an RL step's train reward over its first and last 10 steps (the reward
model's raw score when its scores are normalised, else the judge's or the total), and its
held-out accuracy after training when run.final_eval is on. The recipe ends with one line: the
held-out accuracy (run.final_eval) from step to step, e.g. "sft 0.650 -> dpo 0.906 (+0.256)".
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlhf.errors import ConfigError, RLHFError

logger = logging.getLogger("rlhf.pipeline")

PIPELINE_DIR = Path(__file__).resolve().parent / "conf" / "pipeline"
DONE_MARKER = "pipeline_step_done.json"
SUMMARY_TEXT = "pipeline_summary.txt"
HELD_OUT_KEYS = ("eval/loss", "eval/accuracy", "eval/reward_accuracy")
"""Held-out metrics a step logs while it trains; its summary shows the first and last evaluation."""
REWARD_KEYS = ("reward/model_raw_mean", "reward/judge_mean", "reward/mean")
"""An RL step's train reward for its summary: the first of these it logged."""
FINAL_ACCURACY = "final_eval/accuracy"
"""Greedy held-out accuracy after the step (run.final_eval), the recipe summary's score."""
_REFERENCE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STEP_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):[^=]*=")
"""A command-line override for one step: `<step>:<key>=<value>` (a ":" in the value does not count)."""


@dataclass(frozen=True)
class PipelineStep:
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    source: str
    output_dir: Path
    common: tuple[str, ...]
    steps: tuple[PipelineStep, ...]

    def step_dir(self, name: str) -> Path:
        return self.output_dir / name

    def final_model(self, name: str) -> Path:
        return self.step_dir(name) / "final"


def resolve_pipeline_file(name_or_path: str) -> Path:
    """A YAML path, or the name of a recipe shipped in conf/pipeline/."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = PIPELINE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml"))
    raise ConfigError(
        f"no pipeline {name_or_path!r}: not a file, and not one of the shipped recipes ({', '.join(known)})"
    )


def load_pipeline(name_or_path: str, extra_overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read and check a pipeline file: unique step names, references only to earlier steps."""
    path = resolve_pipeline_file(name_or_path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # yaml errors come in several types
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), list) or not raw["steps"]:
        raise ConfigError(f"{path}: needs a non-empty `steps:` list of {{name, overrides}}")
    unknown = set(raw) - {"output_dir", "common", "steps", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: description, output_dir, common, steps")
    steps: list[PipelineStep] = []
    for i, item in enumerate(raw["steps"]):
        where = f"{path}, steps[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: each step needs a `name` and an `overrides` list")
        name, overrides = item["name"], item.get("overrides", [])
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{where}: step name {name!r} must be an identifier (letters, digits, _)")
        if any(s.name == name for s in steps):
            raise ConfigError(f"{where}: step name {name!r} is used twice; names must be unique")
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{where}: `overrides` must be a list of strings like stage=sft")
        for ref in (m for o in overrides for m in _REFERENCE.findall(o)):
            if not any(s.name == ref for s in steps):
                raise ConfigError(
                    f"{where}: {{{ref}}} refers to no earlier step; earlier steps: {', '.join(s.name for s in steps) or 'none'}"
                )
        if not any(o.startswith("stage=") for o in overrides):
            raise ConfigError(f"{where}: step {name!r} sets no stage=...; say which stage it runs")
        steps.append(PipelineStep(name, tuple(overrides)))
    common = raw.get("common", [])
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise ConfigError(f"{path}: `common` must be a list of override strings")
    output_dir = Path(raw.get("output_dir") or f"outputs/{path.stem}")
    for override in extra_overrides:
        if override.startswith("output_dir="):
            output_dir = Path(override.partition("=")[2])
    rest = [o for o in extra_overrides if not o.startswith("output_dir=")]
    names = [s.name for s in steps]
    for override in rest:
        prefix = _STEP_PREFIX.match(override)
        if prefix and prefix.group(1) not in names:
            raise ConfigError(f"{override!r} names no step of {path} (steps: {', '.join(names)})")
    steps = [
        PipelineStep(s.name, s.overrides + tuple(o.split(":", 1)[1] for o in rest if o.startswith(f"{s.name}:")))
        for s in steps
    ]
    everywhere = tuple(o for o in rest if not _STEP_PREFIX.match(o))
    return Pipeline(str(path), output_dir, tuple(common) + everywhere, tuple(steps))


def step_overrides(pipeline: Pipeline, step: PipelineStep) -> list[str]:
    """The step's full override list, references replaced by earlier steps' final models."""

    def substitute(text: str) -> str:
        return _REFERENCE.sub(lambda m: str(pipeline.final_model(m.group(1)).resolve()), text)

    own = [substitute(o) for o in step.overrides]
    return [*pipeline.common, *own, f"run.output_dir={pipeline.step_dir(step.name).resolve()}"]


def compose_step(pipeline: Pipeline, step: PipelineStep) -> Any:
    """The validated RLHFConfig of one step, composed exactly as the `rlhf` command would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf.cli import CONF_DIR
    from rlhf.config import validate

    GlobalHydra.instance().clear()
    overrides = step_overrides(pipeline, step)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            raw = compose(config_name="config", overrides=overrides)
        cfg = OmegaConf.to_object(raw)
    except Exception as e:  # hydra/omegaconf raise their own types for bad overrides
        raise ConfigError(f"{pipeline.source}, step {step.name!r}: {e}") from e
    finally:
        GlobalHydra.instance().clear()
    earlier = pipeline.steps[: pipeline.steps.index(step)]
    try:  # an earlier step's outputs (its final model, generated data) do not exist before it runs
        validate(cfg, produced=[pipeline.step_dir(s.name).resolve() for s in earlier])
    except ConfigError as e:
        raise ConfigError(f"{pipeline.source}, step {step.name!r}: {e}") from e
    return cfg


def is_done(pipeline: Pipeline, step: PipelineStep) -> bool:
    return (pipeline.step_dir(step.name) / DONE_MARKER).is_file()


def run_pipeline(pipeline: Pipeline) -> dict[str, dict[str, float]]:
    """Validate every step, then run those not done yet; returns each step's final metrics."""
    from rlhf.cli import train
    from rlhf.utils.ray_session import held_ray_session

    configs = {step.name: compose_step(pipeline, step) for step in pipeline.steps}
    logger.info("pipeline %s: %s", pipeline.source, " -> ".join(s.name for s in pipeline.steps))
    results: dict[str, dict[str, float]] = {}
    lines: list[str] = []
    with held_ray_session():  # steps with the same cluster settings run on one local Ray cluster
        for step in pipeline.steps:
            marker = pipeline.step_dir(step.name) / DONE_MARKER
            if is_done(pipeline, step):
                logger.info("step %s finished in an earlier run; skipping (delete %s to redo it)", step.name, marker)
                results[step.name] = json.loads(marker.read_text())["metrics"]
            else:
                logger.info("step %s: rlhf %s", step.name, " ".join(step_overrides(pipeline, step)))
                results[step.name] = run_step(pipeline, step, configs[step.name], train)
            lines.append(step_summary(step.name, pipeline.step_dir(step.name), results[step.name]))
            logger.info("%s", lines[-1])
    lines.append(recipe_summary(Path(pipeline.source).stem, results))
    logger.info("%s", lines[-1])
    (pipeline.output_dir / "pipeline_summary.json").write_text(json.dumps(results, indent=1))
    (pipeline.output_dir / SUMMARY_TEXT).write_text("\n".join(lines) + "\n")
    return results


def run_step(pipeline: Pipeline, step: PipelineStep, cfg: Any, train: Any) -> dict[str, float]:
    """Train one step, check its final model, write its done marker; its final metrics."""
    metrics = {k: float(v) for k, v in (train(cfg) or {}).items() if _is_number(v)}
    final = pipeline.final_model(step.name)
    if not final.is_dir():
        raise RLHFError(f"step {step.name!r} finished without writing its final model to {final}")
    marker = pipeline.step_dir(step.name) / DONE_MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step.name, "metrics": metrics, "final": str(final)}, indent=1))
    tmp.replace(marker)
    return metrics


def step_summary(name: str, step_dir: Path, metrics: dict[str, float]) -> str:
    """One line: the step's held-out metrics first -> last, its RL reward trend, its final held-out accuracy."""
    from rlhf.utils.metrics import read_metrics, reward_trend

    path = step_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    parts = []
    for key in HELD_OUT_KEYS:
        values = [row[key] for row in rows if key in row]
        if len(values) > 1:
            parts.append(f"{key} {values[0]:.3f} -> {values[-1]:.3f}")
        elif values:
            parts.append(f"{key} {values[0]:.3f}")
    reward_key = next((k for k in REWARD_KEYS if any(k in row for row in rows)), None)
    trend = reward_trend([row[reward_key] for row in rows if reward_key in row]) if reward_key else None
    if trend is not None:
        parts.append(f"{reward_key} first 10 steps {trend[0]:.3f} -> last 10 steps {trend[1]:.3f}")
    if FINAL_ACCURACY in metrics:
        sampled = metrics.get("final_eval/sampled_accuracy", float("nan"))
        parts.append(f"held-out accuracy {metrics[FINAL_ACCURACY]:.3f} (sampled {sampled:.3f})")
    return f"step {name}: " + ("; ".join(parts) or "no held-out metrics logged")


def recipe_summary(recipe: str, results: dict[str, dict[str, float]]) -> str:
    """The recipe's line: held-out accuracy (run.final_eval, greedy) from step to step, start -> end."""
    chain = [(name, metrics[FINAL_ACCURACY]) for name, metrics in results.items() if FINAL_ACCURACY in metrics]
    if not chain:
        return f"recipe {recipe}: no step measured held-out accuracy (run.final_eval=false)"
    steps = " -> ".join(f"{name} {value:.3f}" for name, value in chain)
    change = f" ({chain[-1][1] - chain[0][1]:+.3f})" if len(chain) > 1 else ""
    return f"recipe {recipe}: held-out accuracy (greedy, run.final_eval) {steps}{change}"


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        known = ", ".join(sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml")))
        sys.stderr.write(f"usage: rlhf-pipeline <recipe name or yaml> [override ...]\nshipped recipes: {known}\n")
        return 0 if args else 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run_pipeline(load_pipeline(args[0], args[1:]))
    except RLHFError as error:
        logger.error("%s: %s", type(error).__name__, error)
        if os.environ.get("RLHF_FULL_ERROR"):
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
