"""The documented recipes (`rlhf-pipeline sft_dpo | sft_rm_ppo | reft | rlaif`) as shipped, 3 seeds each.

Each recipe runs as a user runs it: `python -m rlhf.pipeline <recipe> output_dir=... run.seed=<seed>`
in its own process, on its tiny defaults (conf/experiment/tiny_*.yaml), timed from start to exit.
All four start from the random-init tiny qwen2 (`tiny-init`) and are measured on the carry world's
180 held-out two-digit additions (rlhf.data.tiny_world, "tiny:carry:eval"):

  initial            stage=eval of tiny-init (once per seed)
  after SFT / final  run.final_eval of the first and the last step: greedy accuracy, and sampled
                     accuracy (8 samples at temperature 1, pass@1)
  RM held-out        sft_rm_ppo: the reward model's accuracy on the 180 held-out carry pairs, first and
                     last evaluation (tiny:preference:eval)
  DPO reward acc.    sft_dpo: held-out pairs whose DPO implicit reward ranks the chosen answer first
  reward trend       the final RL step's train reward, first 10 vs last 10 steps: the reward model's raw
                     score (PPO), the judge's score (RLAIF), the rule reward (ReFT's GRPO)
  judge parse rate   rlaif: verdicts with a score in [1, 10] over all verdicts of the run

    python -m benchmarks.recipes [--quick] [--seeds 0,1,2] [--recipes sft_dpo,reft]
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import BENCH_DIR, Stopwatch, finish, load_average, machine_info, parse_args

logger = logging.getLogger("benchmarks.recipes")

NAME = "recipes"
RECIPES = ("sft_dpo", "sft_rm_ppo", "reft", "rlaif")
FINAL_STEP = {"sft_dpo": "dpo", "sft_rm_ppo": "ppo", "reft": "rl", "rlaif": "rlaif"}
FIRST_STEP = {"sft_dpo": "sft", "sft_rm_ppo": "sft", "reft": "warmup", "rlaif": "sft"}
REWARD_KEY = {"sft_rm_ppo": "reward/model_raw_mean", "reft": "reward/mean", "rlaif": "reward/judge_mean"}
HELD_OUT = "tiny:carry:eval"
QUICK = [  # smoke-test sizes: a few steps of everything (the numbers then mean nothing)
    "offline.max_steps=4",
    "run.total_steps=2",
    "run.eval_every=0",
    "run.eval_size=8",
    "eval.max_prompts=8",
    "eval.n_samples=2",
    "eval.k=[1]",
]
COMMON = ["run.progress_bar=false", "run.tensorboard=false", "run.plots=false"]


def run_recipe(recipe: str, seed: int, out: Path, quick: bool) -> dict:
    """One `python -m rlhf.pipeline` process; its wall time, exit code and the numbers of the module docstring."""
    output_dir = out / f"{recipe}-seed{seed}"
    cmd = [sys.executable, "-m", "rlhf.pipeline", recipe, f"output_dir={output_dir}", f"run.seed={seed}", *COMMON]
    cmd += QUICK if quick else []
    load_start = load_average()
    with Stopwatch() as sw:
        proc = subprocess.run(cmd, cwd=BENCH_DIR.parent, capture_output=True, text=True)
    result = {"recipe": recipe, "seed": seed, "exit_code": proc.returncode, "wall_seconds": round(sw.seconds, 1)}
    result["load_average"] = {"start": load_start, "end": load_average()}
    if proc.returncode:
        logger.error("%s seed %d failed:\n%s", recipe, seed, proc.stderr[-4000:])
        return result
    summary = json.loads((output_dir / "pipeline_summary.json").read_text())
    first, final = summary[FIRST_STEP[recipe]], summary[FINAL_STEP[recipe]]
    result.update(
        sft_accuracy=first.get("final_eval/accuracy"),
        sft_sampled_accuracy=first.get("final_eval/sampled_accuracy"),
        final_accuracy=final.get("final_eval/accuracy"),
        final_sampled_accuracy=final.get("final_eval/sampled_accuracy"),
        summary_lines=(output_dir / "pipeline_summary.txt").read_text().splitlines(),
    )
    final_rows = _rows(output_dir / FINAL_STEP[recipe] / "metrics.jsonl")
    if recipe == "sft_rm_ppo":
        rm_accuracy = [r["eval/accuracy"] for r in _rows(output_dir / "rm" / "metrics.jsonl") if "eval/accuracy" in r]
        result.update(rm_accuracy_start=rm_accuracy[0], rm_accuracy=rm_accuracy[-1])
    if recipe == "sft_dpo":
        reward_accuracy = [r["eval/reward_accuracy"] for r in final_rows if "eval/reward_accuracy" in r]
        result.update(dpo_reward_accuracy=reward_accuracy[-1])
    if recipe in REWARD_KEY:
        values = [r[REWARD_KEY[recipe]] for r in final_rows if REWARD_KEY[recipe] in r]
        window = max(1, min(10, len(values) // 2))
        result.update(
            reward_key=REWARD_KEY[recipe],
            reward_first=statistics.mean(values[:window]),
            reward_last=statistics.mean(values[-window:]),
        )
    if recipe == "rlaif":
        config = _config(output_dir / "rlaif")
        verdicts_per_step = config["run"]["rollout_batch_size"] * config["rollout"]["n_samples_per_prompt"]
        unparseable = sum(r["reward/judge_unparseable"] for r in final_rows if "reward/judge_unparseable" in r)
        steps = sum("reward/judge_unparseable" in r for r in final_rows)
        result.update(judge_parse_rate=1 - unparseable / max(1, steps * verdicts_per_step))
    return result


def _rows(path: Path) -> list[dict]:
    from rlhf.utils.metrics import read_metrics

    return read_metrics(path)


def _config(step_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(step_dir / "config.yaml"))  # type: ignore[return-value]


def initial_accuracy(seed: int, out: Path, quick: bool) -> dict:
    """stage=eval of tiny-init on the held-out prompts (greedy and sampled), as run.final_eval measures."""
    output = out / f"initial-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "rlhf",
        "stage=eval",
        "model.path=tiny-init",
        f"data.eval={HELD_OUT}",
        "eval.n_samples=8",
        "eval.k=[1,8]",
        "rollout.backend=hf",
        "rollout.sampling.max_new_tokens=24",
        f"run.seed={seed}",
        f"run.output_dir={output}",
        *COMMON,
        *(["eval.max_prompts=8", "eval.n_samples=2", "eval.k=[1]"] if quick else []),
    ]
    proc = subprocess.run(cmd, cwd=BENCH_DIR.parent, capture_output=True, text=True)
    if proc.returncode:
        logger.error("initial eval seed %d failed:\n%s", seed, proc.stderr[-4000:])
        return {}
    metrics = json.loads((output / "eval" / "eval_results.json").read_text())["metrics"]
    return {"accuracy": metrics["eval/accuracy"], "sampled_accuracy": metrics["eval/sampled_accuracy"]}


def judge_report() -> dict:
    """The tiny judge's own held-out measurement (judge.json next to the checkpoint)."""
    from rlhf.models.loading import resolve_model_path

    return json.loads((Path(resolve_model_path("tiny-judge")) / "judge.json").read_text())


def main() -> int:
    args = parse_args(
        __doc__.splitlines()[0],
        lambda p: (p.add_argument("--seeds", default="0,1,2"), p.add_argument("--recipes", default=",".join(RECIPES))),
    )
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    recipes = ["sft_dpo"] if args.quick else args.recipes.split(",")
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        out = Path(tmp)
        initial = {seed: initial_accuracy(seed, out, args.quick) for seed in seeds}
        runs = []
        for seed in seeds:
            for recipe in recipes:
                runs.append({**run_recipe(recipe, seed, out, args.quick), "initial": initial[seed]})
                logger.info("%s", json.dumps(runs[-1]))
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "settings": {
            "seeds": seeds,
            "recipes": recipes,
            "held_out": HELD_OUT,
            "quick_overrides": QUICK if args.quick else [],
        },
        "judge": judge_report() if "rlaif" in recipes else None,
        "results": runs,
    }
    finish(NAME, payload, render(payload), args)
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


CHECKS = {
    # recipe: [(label, test of one run)], the acceptance per seed
    "sft_dpo": [
        ("DPO raises held-out greedy accuracy over SFT", lambda r: r["final_accuracy"] > r["sft_accuracy"]),
        ("DPO held-out reward accuracy >= 0.7", lambda r: r["dpo_reward_accuracy"] >= 0.7),
    ],
    "sft_rm_ppo": [
        ("RM held-out accuracy >= 0.8", lambda r: r["rm_accuracy"] >= 0.8),
        (
            "PPO (RM reward only) raises held-out greedy accuracy over SFT",
            lambda r: r["final_accuracy"] > r["sft_accuracy"],
        ),
    ],
    "reft": [("GRPO after CoT SFT beats the SFT model (greedy)", lambda r: r["final_accuracy"] > r["sft_accuracy"])],
    "rlaif": [
        ("judge parses >= 90% of its verdicts", lambda r: r["judge_parse_rate"] >= 0.9),
        ("judged score rises (first vs last 10 steps)", lambda r: r["reward_last"] > r["reward_first"]),
    ],
}


def render(payload: dict) -> str:
    """The README section: one row per recipe and seed, and each acceptance check's count over seeds."""
    runs = [r for r in payload["results"] if r["exit_code"] == 0]
    failed = [f"{r['recipe']} seed {r['seed']}" for r in payload["results"] if r["exit_code"]]
    minutes = sum(r["wall_seconds"] for r in payload["results"]) / 60
    lines = [
        "## Recipes: SFT → DPO, SFT → RM → PPO, ReFT, RLAIF on the tiny world",
        "",
        f"`python -m benchmarks.recipes` — {{machine}} Recipes alone: {minutes:.1f} min.",
        "",
        "Each recipe as a user runs it (`rlhf-pipeline <recipe> run.seed=<seed>`, its own process, the tiny",
        "defaults of `conf/experiment/tiny_*.yaml`), all from the random-init tiny qwen2, on the carry world",
        "(`rlhf.data.tiny_world`): 720 two-digit additions to train on, 180 held out; SFT demonstrations from a",
        "careless demonstrator who forgets the carry in 60% of the problems that need one; preference pairs",
        "(and the tiny judge's training) that differ exactly in the carry. Accuracy: greedy (and sampled, 8 at",
        "temperature 1) on the 180 held-out prompts, graded by the rule, by `run.final_eval` after each step.",
        "Reward first→last: the last step's train reward over its first and last 10 steps (PPO: the reward",
        "model's raw score; RLAIF: the judge's score; ReFT: the rule reward).",
        "",
        "| recipe | seed | initial | after SFT | final | gain | RM held-out acc. | DPO held-out reward acc. "
        "| reward first→last | judge parse rate | wall (s) | 1-min load start→end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (RECIPES.index(r["recipe"]), r["seed"])):
        initial = r.get("initial") or {}
        rm = f"{r['rm_accuracy_start']:.3f} → {r['rm_accuracy']:.3f}" if "rm_accuracy" in r else ""
        dpo = f"{r['dpo_reward_accuracy']:.3f}" if "dpo_reward_accuracy" in r else ""
        trend = f"{r['reward_first']:.3f} → {r['reward_last']:.3f}" if "reward_first" in r else ""
        parse = f"{r['judge_parse_rate']:.3f}" if "judge_parse_rate" in r else ""
        load = r["load_average"]
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {_pair(initial.get('accuracy'), initial.get('sampled_accuracy'))} "
            f"| {_pair(r['sft_accuracy'], r['sft_sampled_accuracy'])} | {_pair(r['final_accuracy'], r['final_sampled_accuracy'])} "
            f"| {r['final_accuracy'] - r['sft_accuracy']:+.3f} | {rm} | {dpo} | {trend} | {parse} | {r['wall_seconds']:.0f} "
            f"| {load['start'][0] if load['start'] else '?'} → {load['end'][0] if load['end'] else '?'} |"
        )
    lines += ["", "Accuracy cells: greedy (sampled). Acceptance checks, seeds passing of seeds run:", ""]
    for recipe, checks in CHECKS.items():
        mine = [r for r in runs if r["recipe"] == recipe]
        if not mine:
            continue
        for label, check in checks:
            lines.append(f"- `{recipe}`: {label}: **{sum(bool(check(r)) for r in mine)} of {len(mine)}**")
    slow = [f"{r['recipe']} seed {r['seed']} ({r['wall_seconds']:.0f} s)" for r in runs if r["wall_seconds"] > 300]
    lines.append(f"- every recipe finishes within 5 minutes: {'yes' if not slow else 'no: ' + ', '.join(slow)}")
    if failed:
        lines.append(f"- runs that failed: {', '.join(failed)}")
    judge = payload.get("judge")
    if judge:
        lines += [
            "",
            f"The tiny judge (`tiny-judge`, built once per tiny world in {judge['train_seconds']:.0f} s): on the 180 held-out",
            f"problems' right answer and carry mistake it parses {judge['eval_parse_rate']:.3f} of its verdicts and grades",
            f"{judge['eval_accuracy']:.3f} of them right.",
        ]
    lines += ["", "Raw: `results/recipes.json` (with every run's summary lines)."]
    return "\n".join(lines)


def _pair(greedy: float | None, sampled: float | None) -> str:
    if greedy is None:
        return "–"
    return f"{greedy:.3f} ({sampled:.3f})" if sampled is not None else f"{greedy:.3f}"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
