"""PNG plots of a run's metrics.jsonl (and of a sweep's runs side by side).

Written at the end of every training stage into <output_dir>/plots/, and on demand with
`rlhf stage=report report.run_dir=<dir>` (a run or a sweep directory). Each figure shows the
metrics of one kind that the run logged; figures whose metrics the run never logged are skipped,
so the same code serves RL, SFT, DPO and the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from rlhf.utils.metrics import read_metrics

logger = logging.getLogger(__name__)

FIGURES: dict[str, tuple[str, ...]] = {
    "reward": (
        "reward/mean",
        "reward/max",
        "reward/model_raw_mean",  # the reward model's raw score (reward/mean is ~0 when it is whitened)
        "reward/judge_mean",
        "eval/reward_mean",
        "eval/accuracy",  # RL: held-out rule accuracy; stage=rm: held-out pair accuracy
        "eval/reward_accuracy",  # DPO family: held-out pairs whose implicit reward ranks chosen first
    ),
    "kl": ("reward/kl_to_ref", "policy/kl", "distill/kl", "eval/kl"),
    "entropy": ("policy/entropy",),
    "response_length": ("rollout/response_length", "rollout/response_length_max", "eval/response_length"),
    "loss": ("policy/loss", "critic/loss", "train/loss", "eval/loss"),
    # multi-turn rollouts (agent.env): per trajectory, then the environment's rewards and share of the tokens
    "agent_turns": (
        "agent/turns_mean",
        "agent/tool_calls",
        "agent/tool_errors",
        "agent/tool_timeouts",
        "agent/env_errors",
    ),  # fmt: skip
    "agent_rewards": ("agent/reward_per_turn", "reward/env_mean", "agent/env_token_frac"),
}
"""Figure name → the metrics it may show (every one the run logged is drawn)."""

TIMING_PREFIX = "timing/"


def _series(rows: Sequence[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        if key in row and row[key] == row[key]:  # skip NaN
            steps.append(row["step"])
            values.append(row[key])
    return steps, values


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.grid(alpha=0.3)
    ax.set_xlabel("step")
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Plots of <run_dir>/metrics.jsonl into `out_dir` (default <run_dir>/plots); returns the files."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    logged = {k for row in rows for k in row}
    extra_losses = sorted(k for k in logged if k.endswith("/loss") and k not in FIGURES["loss"])
    figures = {**FIGURES, "loss": FIGURES["loss"] + tuple(extra_losses)}
    for name, keys in figures.items():
        present = [k for k in keys if k in logged]
        if not present:
            continue
        plt, fig, ax = _figure()
        for key in present:
            steps, values = _series(rows, key)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        ax.set_title(f"{name} — {run_dir.name}")
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out / f"{name}.png"))
    timings = sorted(k for k in logged if k.startswith(TIMING_PREFIX) and k != f"{TIMING_PREFIX}step")
    if timings:
        written.append(_plot_timings(rows, timings, run_dir.name, out / "timings.png"))
    return written


def _plot_timings(rows: Sequence[dict[str, float]], keys: list[str], title: str, path: Path) -> Path:
    """Seconds per phase, stacked, with the whole step drawn on top (the gap is orchestration)."""
    plt, fig, ax = _figure()
    steps = [r["step"] for r in rows if any(k in r for k in keys)]
    stacks = [[r.get(k, 0.0) for r in rows if any(kk in r for kk in keys)] for k in keys]
    ax.stackplot(steps, *stacks, labels=[k[len(TIMING_PREFIX) :] for k in keys], alpha=0.8)
    step_steps, step_values = _series(rows, f"{TIMING_PREFIX}step")
    if step_steps:
        ax.plot(step_steps, step_values, color="black", linewidth=1, label="step (total)")
    ax.set_ylabel("seconds")
    ax.set_title(f"phase timings — {title}")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    return _save(plt, fig, path)


def plot_sweep(
    run_dirs: Sequence[str | Path], labels: Sequence[str], path: str | Path, key: str = "reward/mean"
) -> Path | None:
    """One figure with `key` of every run of a sweep, labelled by its swept values."""
    plt, fig, ax = _figure()
    drawn = 0
    for run_dir, label in zip(run_dirs, labels):
        metrics = Path(run_dir) / "metrics.jsonl"
        if not metrics.exists():
            continue
        steps, values = _series(read_metrics(metrics), key)
        if steps:
            ax.plot(steps, values, label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_ylabel(key)
    ax.set_title(f"sweep: {key}")
    ax.legend(fontsize=8)
    return _save(plt, fig, Path(path))


def write_plots(run_dir: str | Path) -> list[Path]:
    """plot_run for the end of a run: a plotting failure is logged, never fails the finished run."""
    try:
        written = plot_run(run_dir)
    except Exception:  # noqa: BLE001 - the model is saved; a broken plot must not turn that into an error
        logger.warning("could not write plots for %s", run_dir, exc_info=True)
        return []
    if written:
        logger.info("plots written to %s", Path(run_dir) / "plots")
    return written
