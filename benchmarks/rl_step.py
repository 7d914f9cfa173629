"""Throughput and phase breakdown of a full RL step (GRPO), for the tiny model and a ~10M one.

Each case is `rlhf stage=grpo ...` run in this process (`rlhf.cli.train`) on one Ray cluster, with
the trainer's own PhaseTimer metrics (`timing/<phase>`, metrics.jsonl). Per step:
  samples/s         sequences generated and trained on ÷ step seconds
  tokens/s          generated response tokens ÷ step seconds (and ÷ generate seconds)
  overhead          step − Σ phases (generate, score, logprobs, values, advantages, update, sync):
                    prompt fetching, batch assembly outside the phases, Python between calls
Step 1 (warm-up: first forward passes, allocator growth) is left out; the median and spread are
over the remaining steps. Target: overhead < 10% of the step (median), reported met or not.

    python -m benchmarks.rl_step [--quick] [--sizes tiny,10m] [--steps 8] [--backend vllm]
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from benchmarks.common import bench_model, compose, finish, fmt, machine_info, parse_args, ray_cluster, summarize

logger = logging.getLogger("benchmarks.rl_step")

NAME = "rl_step"
PHASES = ("generate", "score", "logprobs", "values", "advantages", "update", "sync")
TARGET_OVERHEAD = 0.10


def run_case(size: str, backend: str, steps: int, prompts: int, n: int, max_new_tokens: int, out: Path) -> dict:
    from rlhf.cli import train
    from rlhf.utils.metrics import read_metrics

    path, num_params = bench_model(size)
    sequences = prompts * n
    train_batch = min(64, sequences)
    overrides = [
        "stage=grpo",
        f"model.path={path}",
        "data.train=tiny:train",
        "data.eval=null",
        f"run.rollout_batch_size={prompts}",
        f"rollout.n_samples_per_prompt={n}",
        f"rollout.backend={backend}",
        f"rollout.sampling.max_new_tokens={max_new_tokens}",
        "policy.num_workers=1",
        f"policy.train_batch_size={train_batch}",
        f"policy.micro_batch_size={min(16, train_batch)}",
        f"run.total_steps={steps}",
        "run.eval_every=0",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "run.plots=false",
        f"run.output_dir={out}",
    ]
    train(compose(overrides))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "timing/step" in r]
    timed = rows[1:] if len(rows) > 1 else rows
    per_step = []
    for r in timed:
        phases = {p: r.get(f"timing/{p}", 0.0) for p in PHASES}
        step_s = r["timing/step"]
        samples = sequences
        tokens = r["rollout/response_length"] * samples
        per_step.append(
            {
                "step": r["step"],
                "step_s": step_s,
                **{f"{p}_s": s for p, s in phases.items()},
                "overhead_s": step_s - sum(phases.values()),
                "overhead_frac": (step_s - sum(phases.values())) / step_s,
                "samples_per_s": samples / step_s,
                "tokens_per_s_step": tokens / step_s,
                "tokens_per_s_generate": r["perf/tokens_per_s"],
                "response_length": r["rollout/response_length"],
            }
        )
    keys = [k for k in per_step[0] if k != "step"]
    return {
        "size": size,
        "num_params": num_params,
        "backend": backend,
        "prompts_per_step": prompts,
        "samples_per_prompt": n,
        "max_new_tokens": max_new_tokens,
        "steps": steps,
        "steps_summarized": [r["step"] for r in per_step],
        "per_step": per_step,
        "summary": {k: summarize([r[k] for r in per_step]) for k in keys},
    }


def table(results: list[dict]) -> str:
    head = (
        "| model | backend | step s | "
        + " | ".join(PHASES)
        + " | overhead s | overhead % | samples/s | tokens/s (step) | tokens/s (generate) | resp. len |"
    )
    lines = [head, "|" + "---|" * (len(PHASES) + 9)]
    for r in results:
        s = r["summary"]
        cells = [
            f"{r['size']} ({r['num_params'] / 1e6:.1f}M)",
            r["backend"],
            fmt(s["step_s"], 2),
            *[f"{s[f'{p}_s']['median']:.3f}" for p in PHASES],
            f"{s['overhead_s']['median']:.3f}",
            fmt(s["overhead_frac"], 1, 100),
            fmt(s["samples_per_s"], 1),
            fmt(s["tokens_per_s_step"], 0),
            fmt(s["tokens_per_s_generate"], 0),
            f"{s['response_length']['median']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    def options(parser):
        parser.add_argument("--sizes", default="tiny,10m")
        parser.add_argument("--backend", default="vllm", help="rollout backend: vllm or hf")
        parser.add_argument("--steps", type=int, default=8)
        parser.add_argument("--prompts", type=int, default=16)
        parser.add_argument("--n", type=int, default=8)
        parser.add_argument("--max-new-tokens", type=int, default=16)

    args = parse_args(__doc__.splitlines()[0], options)
    sizes = ["tiny"] if args.quick else args.sizes.split(",")
    steps, prompts, n = (3, 4, 4) if args.quick else (args.steps, args.prompts, args.n)
    backend = "hf" if args.quick else args.backend
    machine = machine_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-rl-step-") as tmp, ray_cluster():
        for size in sizes:
            results.append(run_case(size, backend, steps, prompts, n, args.max_new_tokens, Path(tmp) / size))
    met = [r["summary"]["overhead_frac"]["median"] < TARGET_OVERHEAD for r in results]
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "target": f"overhead (step - sum of phases) < {TARGET_OVERHEAD:.0%} of the step (median)",
        "target_met": all(met),
        "results": results,
    }
    verdict = "met" if all(met) else f"NOT met ({sum(met)} of {len(met)} cases)"
    markdown = f"""## RL step throughput and phase breakdown (GRPO, CPU)

`python -m benchmarks.rl_step` — {{machine}}

`stage=grpo` through `rlhf.cli.train`, {prompts} prompts × {n} samples = {prompts * n} sequences per step from
`tiny:train`, max {args.max_new_tokens} new tokens, policy 1 DeepSpeed rank (ZeRO-2), one {backend} rollout engine,
cpu_debug cluster. *tiny*: the shipped SFT-warmed tiny policy (stops early: short answers); *10m*: a random-init
qwen2 (hidden 384, 6 layers) that mostly runs to the token limit. Phase columns are medians (seconds) of steps
2–{steps}; other cells median [min–max]. Overhead = step − Σ phases.

{table(results)}

Target overhead < {TARGET_OVERHEAD:.0%} of the step: **{verdict}**. Raw: `results/{NAME}.json`.
"""
    finish(NAME, payload, markdown, args)


if __name__ == "__main__":
    main()
