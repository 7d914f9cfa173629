"""Side by side with TRL: TRL's GRPOTrainer vs our GRPO on the same tiny model, data, group size and lengths.

TRL is installed for this benchmark only, never into the project venv:
`pip install --target $RLHF_CACHE/trl-bench trl==1.16.0 --no-deps` (done on first use; its
dependencies, transformers/accelerate/datasets, are the venv's), and that directory goes on
PYTHONPATH of the TRL subprocess alone (benchmarks/trl_grpo_runner.py).

Rows: TRL (one process: HF generate + training), ours with the hf rollout backend (like-for-like
generation code path) and ours with vLLM. Each runs `--steps` RL steps (one generation batch of
prompts × n each, then sequences ÷ 16 optimizer steps), alternating the three, `--rounds` times.
Time per step: median over steps 2..N of each run; the ratios (ours ÷ TRL) are taken per round.

    python -m benchmarks.trl_compare [--quick] [--steps 30] [--rounds 2]
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

from benchmarks.common import (
    BENCH_DIR,
    bench_model,
    compose,
    finish,
    fmt,
    machine_info,
    parse_args,
    ray_cluster,
    summarize,
)

logger = logging.getLogger("benchmarks.trl_compare")

NAME = "trl_compare"
TRL_VERSION = "1.16.0"
TRAIN_BATCH = 16
MAX_NEW_TOKENS = 4
LR = 2e-4


def trl_dir() -> Path:
    """$RLHF_CACHE/trl-bench holding TRL (installed there with --no-deps on first use)."""
    target = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")) / "trl-bench"
    if not (target / "trl" / "__init__.py").exists():
        logger.info("installing trl==%s into %s (not the venv)", TRL_VERSION, target)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--target",
                str(target),
                f"trl=={TRL_VERSION}",
                "--no-deps",
            ],
            check=True,
        )
    return target


def run_trl(
    model: str,
    task: str,
    steps: int,
    prompts: int,
    n: int,
    out: Path,
    *,
    train_batch: int = TRAIN_BATCH,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(trl_dir()), str(BENCH_DIR.parent), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    cmd = [
        sys.executable, "-m", "benchmarks.trl_grpo_runner", "--out", str(out), "--model", model, "--task", task,
        "--steps", str(steps), "--prompts", str(prompts), "--n", str(n), "--train-batch", str(train_batch),
        "--max-new-tokens", str(max_new_tokens), "--lr", str(LR),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=BENCH_DIR.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    return {"step_s": data["rl_step_s"], "rewards": data["rewards"], "response_length": data["response_length"],
            "setup_s": data["setup_s"], "total_s": data["total_s"], "trl_version": data["trl_version"],
            "torch_threads": data["torch_threads"], "trl_config": data["config"]}  # fmt: skip


def run_ours(
    model: str,
    backend: str,
    task: str,
    steps: int,
    prompts: int,
    n: int,
    out: Path,
    *,
    train_batch: int = TRAIN_BATCH,
    max_new_tokens: int = MAX_NEW_TOKENS,
    extra: tuple[str, ...] = (),
) -> dict:
    """`rlhf stage=grpo` on `model` in this process; per-step times, rewards and lengths from its metrics.jsonl."""
    import time

    from rlhf.cli import train
    from rlhf.utils.metrics import read_metrics

    overrides = [
        "stage=grpo",
        f"model.path={model}",
        f"data.train=tiny:train:{task}",
        "data.eval=null",
        f"run.rollout_batch_size={prompts}",
        f"rollout.n_samples_per_prompt={n}",
        f"rollout.backend={backend}",
        f"rollout.sampling.max_new_tokens={max_new_tokens}",
        "policy.num_workers=1",
        f"policy.train_batch_size={train_batch}",
        f"policy.micro_batch_size={train_batch}",
        f"policy.optim.lr={LR}",
        f"run.total_steps={steps}",
        "run.eval_every=0",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "run.plots=false",
        f"run.output_dir={out}",
        *extra,
    ]
    start = time.perf_counter()
    train(compose(overrides))
    total = time.perf_counter() - start
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "timing/step" in r]
    return {
        "step_s": [r["timing/step"] for r in rows],
        "rewards": [r["reward/tiny_world_mean"] for r in rows],
        "response_length": [r["rollout/response_length"] for r in rows],
        "phases_s": [{k.removeprefix("timing/"): v for k, v in r.items() if k.startswith("timing/")} for r in rows],
        "total_s": total,
    }


def digest(run: dict, sequences: int) -> dict:
    timed = run["step_s"][1:] or run["step_s"]
    window = max(1, min(10, len(run["rewards"]) // 3))
    return {
        "step_s": statistics.median(timed),
        "step_s_p10": statistics.quantiles(timed, n=10)[0] if len(timed) > 1 else timed[0],
        "samples_per_s": sequences / statistics.median(timed),
        "reward_first": statistics.fmean(run["rewards"][:window]),
        "reward_last": statistics.fmean(run["rewards"][-window:]),
        "window": window,
    }


def main() -> None:
    def options(parser):
        parser.add_argument("--steps", type=int, default=30)
        parser.add_argument("--rounds", type=int, default=2)
        parser.add_argument("--prompts", type=int, default=8)
        parser.add_argument("--n", type=int, default=8)
        parser.add_argument("--task", default="sub_1d")

    args = parse_args(__doc__.splitlines()[0], options)
    steps, rounds, prompts, n = (3, 1, 4, 4) if args.quick else (args.steps, args.rounds, args.prompts, args.n)
    systems = ("trl", "ours_hf") if args.quick else ("trl", "ours_hf", "ours_vllm")
    model, _ = bench_model("tiny")
    machine = machine_info()
    sequences = prompts * n
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp, ray_cluster():
        for r in range(rounds):
            for system in systems:
                out = Path(tmp) / f"{system}-{r}"
                out.mkdir(parents=True, exist_ok=True)
                if system == "trl":
                    run = run_trl(model, args.task, steps, prompts, n, out / "trl.json")
                else:
                    run = run_ours(model, system.removeprefix("ours_"), args.task, steps, prompts, n, out)
                run["digest"] = digest(run, sequences)
                runs[system].append(run)
                logger.info("round %d %s: %s", r, system, run["digest"])
    summary = {
        s: {
            k: summarize([run["digest"][k] for run in rs])
            for k in ("step_s", "step_s_p10", "samples_per_s", "reward_first", "reward_last")
        }
        for s, rs in runs.items()
    }
    ratios = {
        s: summarize([runs[s][i]["digest"]["step_s"] / runs["trl"][i]["digest"]["step_s"] for i in range(rounds)])
        for s in systems
        if s != "trl"
    }
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "settings": {"task": args.task, "steps": steps, "rounds": rounds, "prompts": prompts, "n": n,
                     "train_batch": TRAIN_BATCH, "max_new_tokens": MAX_NEW_TOKENS, "lr": LR, "trl_version": TRL_VERSION},
        "summary": summary,
        "step_time_ratio_vs_trl": ratios,
        "runs": runs,
    }  # fmt: skip
    lines = [
        "| system | s / RL step | fastest 10% of steps, s | samples/s | step time ÷ TRL | reward first → last |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"trl": f"TRL {TRL_VERSION} GRPOTrainer", "ours_hf": "ours, hf backend", "ours_vllm": "ours, vLLM backend"}
    for s in systems:
        x = summary[s]
        ratio = "1" if s == "trl" else fmt(ratios[s], 2)
        lines.append(
            f"| {labels[s]} | {fmt(x['step_s'])} | {fmt(x['step_s_p10'])} | {fmt(x['samples_per_s'], 1)} | {ratio} "
            f"| {x['reward_first']['median']:.3f} → {x['reward_last']['median']:.3f} |"
        )
    markdown = f"""## Side by side with TRL's GRPOTrainer (CPU)

`python -m benchmarks.trl_compare` — {{machine}}

Same model (the shipped SFT-warmed `tiny` qwen2, fp32), same prompts (`tiny:train:{args.task}`), same rule reward
(`rlhf.data.tiny_world.check_answer`), {prompts} prompts × {n} samples per RL step, ≤ {MAX_NEW_TOKENS} new tokens,
temperature 1 (top-p 1, no top-k), {sequences // TRAIN_BATCH} optimizer steps of {TRAIN_BATCH} sequences per RL step, one
pass (num_iterations 1), AdamW lr {LR} constant, grad clip 1.0, clip ε 0.2, no KL (β 0), group-normalised advantages
(mean and std), token-mean loss (TRL `loss_type="dapo"`), {steps} RL steps per run, {rounds} rounds alternating the
systems. s / RL step: median of steps 2–{steps} per run, then median [min–max] over rounds; the ratio is per round.
Reward: mean train task reward of the first vs last {runs["trl"][0]["digest"]["window"]} steps (median over rounds).

{chr(10).join(lines)}

What cannot match: TRL is one process (torch on both cores, {runs["trl"][0]["torch_threads"]} threads; HF `generate`,
plain torch AdamW, no DeepSpeed); ours is Ray actors (policy on DeepSpeed ZeRO-2 with 1 thread, rollout engine with
1 thread, controller) exchanging batches by Ray calls and syncing weights over gloo every step. Prompt order
differs (TRL's seeded sampler vs our seeded stream), and so do the random samples. Per-step wall times include
everything each system does per step; start-up (Ray, actors, engines) is excluded from both. *fastest 10%*: the
10th percentile of a run's step times (median over rounds): what each system does when the cores are not taken.
On a loaded machine TRL's single process with 2 torch threads suffers far more than our 1-thread actors (its
steps jump from ~0.1 s to several seconds while other jobs run), so read the median ratio with the load average
above; the fastest-steps column is the fairer speed comparison there. Raw: `results/{NAME}.json`.
"""
    finish(NAME, payload, markdown, args)


if __name__ == "__main__":
    main()
