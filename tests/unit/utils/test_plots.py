"""PNG plots from metrics.jsonl: one figure per kind of metric the run logged, none for the rest."""

from __future__ import annotations

import json

from rlhf.utils.plots import plot_run, plot_sweep


def write_metrics(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rl_run_gets_reward_kl_entropy_length_and_timing_plots(tmp_path):
    rows = [
        {
            "step": s,
            "reward/mean": s / 10,
            "policy/kl": 0.01 * s,
            "policy/entropy": 1.0 - s / 20,
            "policy/loss": 0.1,
            "rollout/response_length": 8.0,
            "timing/generate": 0.2,
            "timing/update": 0.1,
            "timing/step": 0.35,
        }
        for s in range(1, 6)
    ]
    rows.append({"step": 5, "eval/accuracy": 0.4})
    write_metrics(tmp_path, rows)
    written = plot_run(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["entropy.png", "kl.png", "loss.png", "response_length.png", "reward.png", "timings.png"]
    assert all(is_png(p) and p.parent == tmp_path / "plots" for p in written)


def test_offline_run_gets_only_the_figures_it_has_metrics_for(tmp_path):
    write_metrics(tmp_path, [{"step": s, "train/loss": 2.0 / s, "dpo/loss": 0.7 / s} for s in range(1, 4)])
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png"]


def test_agentic_run_gets_turn_and_environment_reward_plots(tmp_path):
    keys = ("agent/turns_mean", "agent/tool_calls", "agent/reward_per_turn", "reward/env_mean", "agent/env_token_frac")
    write_metrics(tmp_path, [{"step": s, **{k: 0.1 * s for k in keys}} for s in range(1, 4)])
    assert sorted(p.name for p in plot_run(tmp_path)) == ["agent_rewards.png", "agent_turns.png"]


def test_sweep_plot_skips_runs_without_metrics(tmp_path):
    write_metrics(tmp_path / "0", [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.3}])
    (tmp_path / "1").mkdir()
    path = plot_sweep([tmp_path / "0", tmp_path / "1"], ["kl=0.0", "kl=0.1"], tmp_path / "sweep.png")
    assert path is not None and is_png(path)
    assert plot_sweep([tmp_path / "1"], ["kl=0.1"], tmp_path / "none.png") is None
