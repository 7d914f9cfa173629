"""Learning proof: tiny-init → SFT → GRPO / PPO with the rule reward, held-out greedy accuracy before and after.

Per seed, everything through `rlhf.cli.train` in this process on one Ray cluster:
  1. SFT of the random-init tiny qwen2 (`tiny-init`) on `tiny:sft:train` (all six tasks), with the
     tiny world's warm-up recipe (300 optimizer steps of 64 rows, lr 3e-3, cosine) on DeepSpeed.
  2. stage=eval of the SFT model on the held-out prompts of the RL task: greedy accuracy, and
     sampled accuracy (8 samples, temperature 1).
  3. GRPO and PPO from the SFT model on the RL task's train prompts, rule reward (tiny_world), the
     sizes of tests/e2e/test_rl_learning.py (8 prompts × 8 samples for GRPO, × 2 for PPO).
  4. stage=eval of each RL model, same prompts and settings as 2.
"RL helps" means greedy held-out accuracy after RL > the SFT model's, reported per seed. The
reward curves (task reward per step, every seed and algorithm) go to results/learning_reward.png.

    python -m benchmarks.learning [--quick] [--seeds 0,1,2] [--steps 50] [--sft run|shipped]
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS_DIR, Stopwatch, compose, finish, machine_info, parse_args, ray_cluster

logger = logging.getLogger("benchmarks.learning")

NAME = "learning"
ALGORITHMS = ("grpo", "ppo")

SFT = [
    "stage=sft",
    "model.path=tiny-init",
    "data.train=tiny:sft:train",
    "data.eval=null",
    "offline.max_steps=300",
    "policy.num_workers=1",
    "policy.train_batch_size=64",
    "policy.micro_batch_size=64",
    "policy.optim.lr=3e-3",
    "policy.optim.warmup_steps=30",
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
]


def rl_overrides(task: str, steps: int, prompts: int, n: int) -> list[str]:
    """test_rl_learning.py's SMALL sizes (PPO's stage keeps its 2 samples per prompt)."""
    return [
        f"data.train=tiny:train:{task}",
        "data.eval=null",
        f"run.rollout_batch_size={prompts}",
        "rollout.backend=hf",
        "rollout.sampling.max_new_tokens=4",
        "policy.num_workers=1",
        "policy.train_batch_size=16",
        "policy.micro_batch_size=16",
        "policy.optim.lr=2e-4",
        "critic.num_workers=1",
        "critic.train_batch_size=16",
        "critic.micro_batch_size=16",
        f"run.total_steps={steps}",
        "run.eval_every=0",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "run.plots=false",
    ] + ([f"rollout.n_samples_per_prompt={n}"] if n else [])


def evaluate(model: str, prompts: str, out: Path, seed: int) -> dict[str, float]:
    from rlhf.cli import train

    metrics = train(
        compose(
            [
                "stage=eval",
                f"model.path={model}",
                f"data.eval={prompts}",
                "eval.n_samples=8",
                "eval.k=[1]",
                "rollout.backend=hf",
                f"run.seed={seed}",
                f"run.output_dir={out}",
                "run.progress_bar=false",
                "run.tensorboard=false",
                "run.plots=false",
            ]
        )
    )
    return {
        "greedy_accuracy": float(metrics["eval/accuracy"]),
        "sampled_accuracy": float(metrics["eval/sampled_accuracy"]),
    }


def evaluate_both(model: str, task: str, out: Path, seed: int) -> dict[str, float]:
    """Held-out prompts (tiny:eval:<task>) and, to tell generalisation from fitting, the RL train prompts."""
    held_out = evaluate(model, f"tiny:eval:{task}", out / "held-out", seed)
    train = evaluate(model, f"tiny:train:{task}", out / "train", seed)
    return {**held_out, **{f"train_prompts_{k}": v for k, v in train.items()}}


def run_seed(seed: int, args, root: Path) -> dict:
    from rlhf.cli import train
    from rlhf.utils.metrics import read_metrics

    result: dict = {"seed": seed}
    if args.sft == "run":
        with Stopwatch() as sw:
            train(compose([*SFT, f"run.seed={seed}", f"run.output_dir={root / 'sft'}"]))
        sft_model = str(root / "sft" / "final")
        result["sft_seconds"] = sw.seconds
    else:
        sft_model = "tiny"
    result["sft"] = evaluate_both(sft_model, args.task, root / "eval-sft", seed)
    logger.info("seed %d SFT: %s", seed, result["sft"])
    for algo in args.algorithms:
        out = root / algo
        steps, prompts = (3, 4) if args.quick else (args.steps, 8)
        n = 4 if args.quick else (8 if algo != "ppo" else 0)
        with Stopwatch() as sw:
            train(
                compose(
                    [
                        f"stage={algo}",
                        f"model.path={sft_model}",
                        *rl_overrides(args.task, steps, prompts, n),
                        f"run.seed={seed}",
                        f"run.output_dir={out}",
                    ]
                )
            )
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "policy/loss" in r]
        rewards = [r["reward/tiny_world_mean"] for r in rows]
        window = max(1, min(12, len(rewards) // 4))
        after = evaluate_both(str(out / "final"), args.task, root / f"eval-{algo}", seed)
        result[algo] = {
            "seconds": sw.seconds,
            "reward_curve": rewards,
            "reward_first_window": statistics.fmean(rewards[:window]),
            "reward_last_window": statistics.fmean(rewards[-window:]),
            "window": window,
            "after": after,
            "greedy_gain": after["greedy_accuracy"] - result["sft"]["greedy_accuracy"],
            "sampled_gain": after["sampled_accuracy"] - result["sft"]["sampled_accuracy"],
            "train_prompts_greedy_gain": after["train_prompts_greedy_accuracy"]
            - result["sft"]["train_prompts_greedy_accuracy"],
        }
        logger.info("seed %d %s: after %s (SFT %s)", seed, algo, after, result["sft"])
    return result


def plot(results: list[dict], algorithms, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(algorithms), figsize=(5.5 * len(algorithms), 4), squeeze=False)
    for ax, algo in zip(axes[0], algorithms):
        for r in results:
            curve = r[algo]["reward_curve"]
            k = 5
            smooth = [statistics.fmean(curve[max(0, i - k + 1) : i + 1]) for i in range(len(curve))]
            line = ax.plot(range(1, len(curve) + 1), curve, alpha=0.25)[0]
            ax.plot(range(1, len(curve) + 1), smooth, color=line.get_color(), label=f"seed {r['seed']} (5-step mean)")
        ax.set_title(f"{algo.upper()}: train task reward per step")
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward/tiny_world_mean")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(results: list[dict], algorithms) -> str:
    lines = [
        "| seed | SFT greedy | SFT sampled | SFT greedy (train prompts) | "
        + " | ".join(
            f"{a.upper()} greedy | {a.upper()} sampled | {a.upper()} greedy (train prompts) | {a.upper()} reward first→last"
            for a in algorithms
        )
        + " |",
        "|---|---|---|---|" + "---|---|---|---|" * len(algorithms),
    ]
    for r in results:
        cells = [
            str(r["seed"]),
            f"{r['sft']['greedy_accuracy']:.3f}",
            f"{r['sft']['sampled_accuracy']:.3f}",
            f"{r['sft']['train_prompts_greedy_accuracy']:.3f}",
        ]
        for a in algorithms:
            x = r[a]
            cells += [
                f"{x['after']['greedy_accuracy']:.3f} ({x['greedy_gain']:+.3f})",
                f"{x['after']['sampled_accuracy']:.3f} ({x['sampled_gain']:+.3f})",
                f"{x['after']['train_prompts_greedy_accuracy']:.3f} ({x['train_prompts_greedy_gain']:+.3f})",
                f"{x['reward_first_window']:.3f} → {x['reward_last_window']:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    def options(parser):
        parser.add_argument("--seeds", default="0,1,2")
        parser.add_argument("--steps", type=int, default=50)
        parser.add_argument(
            "--task", default="sub_1d", help="tiny-world task(s) of the RL step, e.g. sub_1d or add_1d+sub_1d"
        )
        parser.add_argument(
            "--sft", choices=("run", "shipped"), default="run", help="run the SFT step or use the shipped 'tiny'"
        )
        parser.add_argument("--algorithms", default=",".join(ALGORITHMS))

    args = parse_args(__doc__.splitlines()[0], options)
    args.algorithms = ["grpo"] if args.quick else args.algorithms.split(",")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.sft = "shipped"
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp, ray_cluster():
        results = [run_seed(seed, args, Path(tmp) / f"seed{seed}") for seed in seeds]
    png = plot(results, args.algorithms, (args.out or RESULTS_DIR) / f"{NAME}_reward.png")
    improved = {a: [r[a]["greedy_gain"] > 0 for r in results] for a in args.algorithms}
    improved_train = {a: [r[a]["train_prompts_greedy_gain"] > 0 for r in results] for a in args.algorithms}
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "settings": {"task": args.task, "steps": args.steps, "sft": args.sft, "seeds": seeds, "sft_overrides": SFT},
        "rl_improves_greedy_accuracy": improved,
        "rl_improves_train_prompt_greedy_accuracy": improved_train,
        "reward_plot": png.name,
        "results": results,
    }
    verdict = "; ".join(f"{a.upper()} {sum(v)} of {len(v)} seeds" for a, v in improved.items())
    verdict_train = "; ".join(f"{a.upper()} {sum(v)} of {len(v)} seeds" for a, v in improved_train.items())
    sft_how = (
        "SFT run here from `tiny-init` (300 steps × 64 rows of `tiny:sft:train`, lr 3e-3, DeepSpeed, 1 rank)"
        if args.sft == "run"
        else "the shipped SFT-warmed `tiny` policy"
    )
    markdown = f"""## Learning proof: tiny-init → SFT → GRPO / PPO (rule reward)

`python -m benchmarks.learning` — {{machine}}

Per seed: {sft_how}; then GRPO (8 prompts × 8 samples) and PPO (8 × 2, critic + GAE) from the SFT model,
{args.steps} steps each on `tiny:train:{args.task}`, rule reward, lr 2e-4, HF rollout backend (the sizes of
`tests/e2e/test_rl_learning.py`). Accuracy on the held-out `tiny:eval:{args.task}` prompts with `stage=eval`
before (SFT) and after RL: greedy, and sampled (8 samples at temperature 1; pass@1); gain over SFT in brackets.
The same greedy accuracy on the RL train prompts (`tiny:train:{args.task}`) tells fitting from generalising.
"reward first→last": mean train task reward of the first vs last 12 RL steps.

{table(results, args.algorithms)}

RL beats SFT on held-out greedy accuracy: **{verdict}**. On the RL train prompts (greedy, in-distribution):
**{verdict_train}**. Reward curves: `results/{png.name}`. Raw: `results/{NAME}.json`.

![reward curves](results/{png.name})
"""
    finish(NAME, payload, markdown, args)


if __name__ == "__main__":
    main()
