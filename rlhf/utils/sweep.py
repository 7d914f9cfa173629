"""Summary table of a Hydra multirun: one row per run, its swept values and its final metrics.

`rlhf -m algorithm.kl_coef=0.0,0.01,0.1` runs one job per value, each in its own directory
`<hydra.sweep.dir>/<job num>/`. At the end, `SweepSummary` (a Hydra callback) writes
`<sweep dir>/summary.md` and `<sweep dir>/summary.json`:

    | run | algorithm.kl_coef | status    | steps | reward/mean | eval/accuracy | kl      |
    |-----|-------------------|-----------|-------|-------------|---------------|---------|
    | 0   | 0.0               | COMPLETED | 20    | 0.8125      | 0.75          | n/a     |
    | 1   | 0.01              | COMPLETED | 20    | 0.7969      | 0.7344        | 0.01234 |

Each value is the *last* one logged in the run's metrics.jsonl (rows `{"step": N, "ns/key": x}`).
KL is `reward/kl_to_ref` (KL folded into the reward, PPO) or `policy/kl` (KL as a loss, GRPO),
whichever the run logged; runs with `kl_coef=0` have no reference model and show n/a.

Register the callback in conf/config.yaml:

    hydra:
      callbacks:
        sweep_summary:
          _target_: rlhf.utils.sweep.SweepSummary

or summarise any finished sweep directory by hand: `python -m rlhf.utils.sweep <sweep dir>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
SWEEP_PLOT = "sweep_reward.png"
JOB_RECORD = "sweep_job.json"
"""Written into each job's directory by `SweepSummary.on_job_end`: its overrides, status, output_dir."""

COLUMNS: dict[str, tuple[str, ...]] = {
    "reward/mean": ("reward/mean",),
    "eval/accuracy": ("eval/accuracy",),
    "kl": ("reward/kl_to_ref", "policy/kl"),
}
"""Summary column → metric keys tried in order; the first one the run logged wins."""

_NOT_SWEPT = ("hydra.", "run.output_dir")
"""Override keys never shown as columns (they differ per run by construction)."""


@dataclass
class RunSummary:
    """One job of a sweep."""

    job: str
    """The job's directory relative to the sweep directory (Hydra's job number by default)."""
    overrides: dict[str, str]
    """Command-line overrides of this job, key → value as typed."""
    status: str
    """COMPLETED / FAILED (from Hydra), or UNKNOWN when the callback did not record it."""
    output_dir: str | None
    """Directory holding the run's metrics.jsonl (None: not found)."""
    steps: int | None = None
    """Largest step in metrics.jsonl."""
    metrics: dict[str, float | None] = field(default_factory=dict)
    """Column → last logged value (None: never logged or not finite)."""


# ----------------------------------------------------------------------------- reading runs
def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """["algorithm.kl_coef=0.01", "+x=1"] → {"algorithm.kl_coef": "0.01", "x": "1"} (order kept).

    Hydra escapes special characters in a sweep job's overrides (`a\\,b`); values come back unescaped.
    """
    parsed: dict[str, str] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if sep:
            parsed[key.lstrip("+~")] = re.sub(r"\\(.)", r"\1", value)
    return parsed


def final_metrics(rows: Sequence[dict[str, Any]]) -> tuple[int | None, dict[str, float | None]]:
    """The largest step and, per summary column, the last finite value logged for it."""
    steps = [int(row["step"]) for row in rows if "step" in row]
    values: dict[str, float | None] = {}
    for column, keys in COLUMNS.items():
        values[column] = None
        for key in keys:
            logged = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
            if logged:
                last = float(logged[-1])
                values[column] = last if math.isfinite(last) else None
                break
    return (max(steps) if steps else None), values


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; the rows before it still count.
            logger.warning("%s:%d is not valid JSON; skipped", path, number)
    return rows


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories under sweep_dir that hold a Hydra job (its .hydra/ or our job record)."""
    found = {p.parent for p in sweep_dir.glob(f"**/{JOB_RECORD}")}
    found |= {p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")}
    found.discard(sweep_dir)  # the multirun's own .hydra/ (hydra-ray-launcher and others keep one)
    return sorted(found, key=lambda p: _natural_key(str(p.relative_to(sweep_dir))))


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _literal_output_dir(job_dir: Path) -> Path | None:
    """run.output_dir from the job's saved config when it is a plain path (not an interpolation)."""
    config_path = job_dir / ".hydra" / "config.yaml"
    if not config_path.exists():
        return None
    saved = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)  # never resolve here
    value = saved.get("run", {}).get("output_dir") if isinstance(saved, dict) else None
    if not isinstance(value, str) or "${" in value:
        return None
    return Path(value)


def summarize_job(job_dir: Path, sweep_dir: Path) -> RunSummary:
    """Read one job's overrides, status and final metrics."""
    record_path = job_dir / JOB_RECORD
    record: dict[str, Any] = json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else {}
    if "overrides" in record:
        overrides = parse_overrides(record["overrides"])
    else:
        overrides_path = job_dir / ".hydra" / "overrides.yaml"
        overrides = parse_overrides(OmegaConf.to_container(OmegaConf.load(overrides_path)))  # type: ignore[arg-type]
    candidates = [job_dir]
    if record.get("output_dir"):
        candidates.insert(0, Path(record["output_dir"]))
    literal = _literal_output_dir(job_dir)
    if literal is not None:
        candidates.append(literal)
    metrics_dir = next((d for d in candidates if (d / "metrics.jsonl").exists()), None)
    summary = RunSummary(
        job=str(job_dir.relative_to(sweep_dir)),
        overrides=overrides,
        status=record.get("status", "UNKNOWN"),
        output_dir=str(metrics_dir) if metrics_dir else None,
        metrics={column: None for column in COLUMNS},
    )
    if metrics_dir is None:
        logger.warning("sweep job %s: no metrics.jsonl in %s", summary.job, ", ".join(map(str, candidates)))
        return summary
    summary.steps, summary.metrics = final_metrics(_read_jsonl(metrics_dir / "metrics.jsonl"))
    return summary


def summarize(sweep_dir: str | Path) -> list[RunSummary]:
    """One RunSummary per job found under sweep_dir, in job order."""
    sweep_dir = Path(sweep_dir)
    return [summarize_job(job_dir, sweep_dir) for job_dir in _job_dirs(sweep_dir)]


def swept_keys(runs: Sequence[RunSummary]) -> list[str]:
    """Override keys whose value differs between runs (all of them when nothing differs)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys and not k.startswith(_NOT_SWEPT)]
    varying = [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]
    return varying or keys


# ----------------------------------------------------------------------------- writing the table
def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(runs: Sequence[RunSummary], keys: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table, one row per run."""
    keys = list(swept_keys(runs) if keys is None else keys)
    header = ["run", *keys, "status", "steps", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for run in runs:
        cells = [run.job, *(run.overrides.get(k) for k in keys), run.status, run.steps, *run.metrics.values()]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path) -> list[RunSummary]:
    """Write <sweep_dir>/summary.md and summary.json and return the rows."""
    sweep_dir = Path(sweep_dir)
    runs = summarize(sweep_dir)
    keys = swept_keys(runs)
    payload = {"sweep_dir": str(sweep_dir), "swept": keys, "columns": COLUMNS, "runs": [asdict(r) for r in runs]}
    _write_atomic(sweep_dir / SUMMARY_MD, to_markdown(runs, keys))
    _write_atomic(sweep_dir / SUMMARY_JSON, json.dumps(payload, indent=2) + "\n")
    write_sweep_plot(sweep_dir, runs, keys)
    return runs


def write_sweep_plot(sweep_dir: Path, runs: Sequence[RunSummary], keys: Sequence[str]) -> Path | None:
    """<sweep_dir>/sweep_reward.png: reward/mean of every run, labelled by its swept values."""
    from rlhf.utils.plots import plot_sweep

    done = [r for r in runs if r.output_dir]
    labels = [", ".join(f"{k}={r.overrides.get(k)}" for k in keys) or r.job for r in done]
    try:
        return plot_sweep([r.output_dir for r in done], labels, sweep_dir / SWEEP_PLOT)
    except Exception:  # noqa: BLE001 - the summary table is written; a failed plot must not hide it
        logger.warning("could not draw the sweep comparison plot", exc_info=True)
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader (or a job of a parallel launcher) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- Hydra hooks
def job_output_dir(configured: str) -> str:
    """Where a job writes: its own sweep subdirectory in a multirun, else `run.output_dir` as configured.

    Without this, every job of `rlhf -m ...` would share the default run.output_dir (and the
    second job would even resume from the first one's checkpoint). An explicit
    `run.output_dir=...` on the command line is kept, so `run.output_dir=/data/x/\\${hydra.job.num}` works.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return configured
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return configured
    if "run.output_dir" in parse_overrides(hydra_cfg.overrides.task):
        return configured
    return str(hydra_cfg.runtime.output_dir)


class SweepSummary(Callback):
    """Hydra callback: records each job (on_job_end) and writes the sweep's table (on_multirun_end)."""

    def __init__(self) -> None:
        self.sweep_dir: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolve once: the default sweep dir contains ${now:...}.
        self.sweep_dir = str(config.hydra.sweep.dir)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        job_dir = Path(str(config.hydra.runtime.output_dir))
        configured = OmegaConf.select(job_return.cfg, "run.output_dir", default=None) if job_return.cfg else None
        output_dir = job_output_dir(str(configured)) if configured is not None else str(job_dir)
        value = job_return.return_value if job_return.status.name == "COMPLETED" else None
        record = {
            "job_num": config.hydra.job.num,
            "overrides": list(job_return.overrides or []),
            "status": job_return.status.name,
            "output_dir": str(Path(output_dir).absolute()),
            "return_value": value if isinstance(value, (int, float)) else None,
        }
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / JOB_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # Refresh the table after every job: Hydra's basic sweeper raises after a failed job and
        # never reaches on_multirun_end, and a long sweep can be watched while it runs.
        write_summary(self.sweep_dir or str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(self.sweep_dir or str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            logger.warning("sweep summary: %s does not exist; nothing to summarise", sweep_dir)
            return
        runs = write_summary(sweep_dir)
        logger.info("sweep summary (%d runs) → %s\n%s", len(runs), sweep_dir / SUMMARY_MD, to_markdown(runs))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m rlhf.utils.sweep <sweep dir>`: write the summary files and print the table."""
    parser = argparse.ArgumentParser(prog="python -m rlhf.utils.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    runs = write_summary(args.sweep_dir)
    sys.stdout.write(to_markdown(runs))


if __name__ == "__main__":
    main()
