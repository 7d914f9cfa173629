"""Soak: a few hundred tiny PPO steps; resident memory of every Ray actor and the driver, step over step.

The real loop (`RLTrainer.fit`: generate, score, logprobs, values, advantages, update, sync, plus
periodic evaluation and checkpoints) runs on the tiny world with every role as its own actor:
policy and critic (DeepSpeed ZeRO-2), reference, one HF rollout engine, and a reward-model actor
(a random tiny sequence classifier, weight 0.1 beside the rule reward). Every `--every` steps the
driver asks each actor for its RSS (psutil, through Ray's `__ray_call__`, so the workers need no
extra method) and reads its own.

Growth is the least-squares slope of RSS over the *second half* of the samples (the first half
holds the warm-up: allocator arenas, caches, the first checkpoint), in MiB per step. Target:
every process below `TARGET_MIB_PER_STEP` (0.05 MiB/step = 50 MiB per 1000 steps).

    python -m benchmarks.soak [--quick] [--steps 300] [--every 10] [--backend hf]
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import bench_model, compose, finish, machine_info, parse_args, ray_cluster

logger = logging.getLogger("benchmarks.soak")

NAME = "soak"
TARGET_MIB_PER_STEP = 0.05
MIB = 2**20


def _actor_rss(actor_self: Any) -> tuple[int, int]:
    """(pid, RSS bytes) of the actor's process; runs inside the actor."""
    import psutil

    return os.getpid(), psutil.Process().memory_info().rss


def driver_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def tiny_reward_model(root: Path) -> str:
    """A random tiny sequence-classification reward model with the tiny world's tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.models.loading import load_tokenizer, resolve_model_path
    from rlhf.models.tiny import tiny_config

    tokenizer = load_tokenizer(resolve_model_path("tiny"))
    config = tiny_config("qwen2", vocab_size=len(tokenizer))
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def actors_of(trainer: Any) -> dict[str, Any]:
    """`role/rank` → actor handle of every worker group the RL trainer started."""
    groups = [g for g in trainer.groups() if g is not None] + [trainer.rollout.group]
    groups += [t.group for t in trainer.rewards.terms if getattr(t, "group", None) is not None]
    return {f"{g.role}/{rank}": actor for g in groups for rank, actor in enumerate(g.actors)}


def overrides(args: Any, out: Path, reward_model: str) -> list[str]:
    path, _ = bench_model("tiny")
    return [
        "stage=ppo",
        f"model.path={path}",
        "data.train=tiny:train",
        "data.eval=tiny:eval",
        f"run.rollout_batch_size={args.prompts}",
        "rollout.n_samples_per_prompt=2",
        f"rollout.backend={args.backend}",
        f"rollout.sampling.max_new_tokens={args.max_new_tokens}",
        *[
            f"{role}.{key}"
            for role in ("policy", "critic")
            for key in ("num_workers=1", f"train_batch_size={args.prompts * 2}", f"micro_batch_size={args.prompts}")
        ],
        f"reward.model_path={reward_model}",
        "reward.model_weight=0.1",
        f"run.total_steps={args.steps}",
        f"run.eval_every={args.checkpoint_every}",
        "run.eval_size=8",
        f"run.save_every={args.checkpoint_every}",
        "run.keep_last=1",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "run.plots=false",
        f"run.output_dir={out}",
    ]


def soak(args: Any, out: Path) -> dict[str, Any]:
    """Run the loop with RSS sampling hooked into the trainer's metric logging; return the samples."""
    import ray

    from rlhf.trainers.prepare import prepare
    from rlhf.trainers.rl import RLTrainer

    cfg = compose(overrides(args, out, tiny_reward_model(out / "reward-model")))
    prepared = prepare(cfg)
    samples: list[dict[str, float]] = []
    trainer = RLTrainer(prepared)
    try:
        names = list(actors_of(trainer))

        def sample(step: int) -> None:
            actors = actors_of(trainer)  # looked up each time: a restarted rank keeps its name, not its handle
            rss = ray.get([a.__ray_call__.remote(_actor_rss) for a in actors.values()])
            row = {"step": float(step), "driver": driver_rss() / MIB}
            row.update({name: r / MIB for name, (_, r) in zip(actors, rss)})
            samples.append(row)

        sample(0)
        log: Callable[..., dict[str, float]] = trainer.metrics.log

        def log_and_sample(step: int, metrics: Any) -> dict[str, float]:
            values = log(step, metrics)
            # after the step's own line (evaluations log a second line at the same step: sampled once)
            if step % args.every == 0 and (not samples or samples[-1]["step"] != step):
                sample(step)
            return values

        trainer.metrics.log = log_and_sample  # type: ignore[method-assign]
        trainer.fit()
    finally:
        trainer.close()
    return {"samples": samples, "processes": ["driver", *names]}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def quarters(samples: list[dict[str, float]]) -> list[list[dict[str, float]]]:
    """The samples in four consecutive step ranges (each range's first sample is the previous one's last)."""
    last = samples[-1]["step"]
    return [[s for s in samples if q * last / 4 <= s["step"] <= (q + 1) * last / 4] for q in range(4)]


def growth(samples: list[dict[str, float]], processes: list[str]) -> list[dict[str, Any]]:
    """Per process: RSS at the start, middle and end, and the slope over the second half (MiB/step)."""
    last = samples[-1]["step"]
    half = [s for s in samples if s["step"] >= last / 2]
    rows = []
    for name in processes:
        xs, ys = [s["step"] for s in half], [s[name] for s in half]
        per_step = slope(xs, ys)
        rows.append(
            {
                "process": name,
                "rss_start_mib": samples[0][name],
                "rss_half_mib": ys[0],
                "rss_end_mib": samples[-1][name],
                "mib_per_step": per_step,
                "mib_per_1000_steps": per_step * 1000,
                "flat": per_step < TARGET_MIB_PER_STEP,
                "mib_per_step_by_quarter": [
                    slope([s["step"] for s in part], [s[name] for s in part]) if len(part) > 1 else 0.0
                    for part in quarters(samples)
                ],
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| process | RSS start MiB | RSS at half MiB | RSS end MiB | slope, 2nd half (MiB/step) | per 1000 steps (MiB) "
        "| slope by quarter (MiB/step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['process']} | {r['rss_start_mib']:.0f} | {r['rss_half_mib']:.0f} | {r['rss_end_mib']:.0f} | "
            f"{r['mib_per_step']:+.4f} | {r['mib_per_1000_steps']:+.0f} | "
            + " ".join(f"{q:+.3f}" for q in r["mib_per_step_by_quarter"])
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    def options(parser):
        parser.add_argument("--steps", type=int, default=300)
        parser.add_argument("--every", type=int, default=10, help="sample RSS every N steps")
        parser.add_argument("--checkpoint-every", type=int, default=50, help="run.save_every and run.eval_every")
        parser.add_argument("--prompts", type=int, default=4)
        parser.add_argument("--max-new-tokens", type=int, default=8)
        parser.add_argument("--backend", default="hf", help="rollout backend: hf or vllm")

    args = parse_args(__doc__.splitlines()[0], options)
    if args.quick:
        args.steps, args.every, args.checkpoint_every = 6, 2, 3
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, ray_cluster():
        run = soak(args, Path(tmp))
    rows = growth(run["samples"], run["processes"])
    flat = all(r["flat"] for r in rows)
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "settings": {k: getattr(args, k) for k in ("steps", "every", "checkpoint_every", "prompts", "max_new_tokens")}
        | {"backend": args.backend, "stage": "ppo"},
        "target": f"RSS slope over the second half < {TARGET_MIB_PER_STEP} MiB/step for every process",
        "target_met": flat,
        "results": rows,
        "samples": run["samples"],
    }
    verdict = "met" if flat else "NOT met: " + ", ".join(r["process"] for r in rows if not r["flat"])
    markdown = f"""## Soak: memory of every actor over {args.steps} PPO steps (CPU)

`python -m benchmarks.soak --steps {args.steps} --every {args.every}` (`make soak` runs 300 steps) — {{machine}}

`stage=ppo` through `RLTrainer.fit` on the tiny world: {args.prompts} prompts × 2 samples per step, max
{args.max_new_tokens} new tokens, {args.backend} rollout engine, policy and critic 1 DeepSpeed rank each (ZeRO-2),
reference, and a reward-model actor beside the rule reward; evaluation and a checkpoint (keep_last 1) every
{args.checkpoint_every} steps. RSS of each process sampled every {args.every} steps; the slope is a least-squares
fit over the second half of the run (the first half holds the warm-up); the last column fits each quarter of the run.

{table(rows)}

Target: slope < {TARGET_MIB_PER_STEP} MiB/step (50 MiB per 1000 steps) for every process: **{verdict}**.
Raw samples: `results/{NAME}.json`.
"""
    finish(NAME, payload, markdown, args)


if __name__ == "__main__":
    main()
