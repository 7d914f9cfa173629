"""Agentic RL proof: GRPO with a calculator tool in the rollout vs the SFT-warmed tool user and vs GRPO without tools.

Data: the tiny world's tool task (`rlhf.data.tiny_world.tool_file`): products "347*28=" of a 3-digit and a
2-digit number, 1000 train and 200 held-out problems. The tiny policy cannot multiply such numbers itself; with the
calculator (`agent.env=calculator`, rlhf.environments.calculator) it can, by writing "<calc>347*28</calc>" and
reading the value the environment appends.

Per seed, everything through `rlhf.cli.train` in this process on one Ray cluster:
  1. Two SFT warm-ups of the random-init tiny qwen2 (`tiny-init`) with the tiny world's recipe (batch 64, lr
     3e-3, cosine): "tool" on demonstrations of which half call the calculator and half write the answer
     directly, "plain" on the direct answers alone (the warm-up of a run without tools).
  2. GRPO (8 prompts × 8 trajectories, rule reward `tiny_world` on the whole trajectory text) from each: the tool
     model with agent.env=calculator (multi-turn trajectories, the environment's tokens out of the loss), the
     plain model without tools (single-turn, the same prompts, sampling and steps).
  3. stage=eval of the four models on the 200 held-out prompts: greedy accuracy and sampled accuracy (4 samples at
     temperature 1), the tool models with the calculator at hand (trajectories, as trained), the plain ones without.

"GRPO with the tool helps" means its held-out greedy accuracy > its SFT start's (per seed) and > GRPO without
tools from the plain warm-up on the same problems.

    python -m benchmarks.agentic [--quick] [--seeds 0,1,2] [--steps 20] [--sft-steps 400]
    python -m benchmarks.agentic --render   # rewrite the README section from results/agentic.json
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import (
    Stopwatch,
    compose,
    finish,
    machine_info,
    parse_args,
    ray_cluster,
    rerender,
)
from benchmarks.learning import sft_overrides

logger = logging.getLogger("benchmarks.agentic")

NAME = "agentic"
SFT_STEPS = 400
RL_STEPS = 20
RL_LR = 1e-4
TURN_TOKENS = 24
"""Tokens per model turn (train and eval): a call "<calc>347*28</calc>" is ~15 tiny-tokenizer tokens; at the
default 16 a greedy call is cut before its stop string."""
TRAJECTORY_TOKENS = 48
ARMS = {"tool": ("sft_tool", True), "plain": ("sft_plain", False)}
"""arm -> (SFT data kind, the calculator in the rollout)."""
TOOL = ("agent.env=calculator", f"agent.max_tokens={TRAJECTORY_TOKENS}", "agent.max_turns=3")


def sampling_overrides() -> list[str]:
    return [
        f"rollout.sampling.max_new_tokens={TURN_TOKENS}",
        f"rollout.eval_sampling.max_new_tokens={TURN_TOKENS}",
        "rollout.backend=hf",
    ]


def tool_data() -> dict[str, str]:
    from rlhf.data.tiny_world import tool_file

    return {
        "sft_tool": str(tool_file("sft_tool", "train")),
        "sft_plain": str(tool_file("sft_plain", "train")),
        "train": str(tool_file("rl", "train")),
        "held_out": str(tool_file("rl", "eval")),
    }


def evaluate(model: str, prompts: str, out: Path, seed: int, tools: bool, max_prompts: int) -> dict[str, float]:
    """Held-out greedy and sampled accuracy; with `tools`, as trajectories with the calculator at hand."""
    from rlhf.cli import train

    metrics = train(
        compose(
            [
                "stage=eval",
                f"model.path={model}",
                f"data.eval={prompts}",
                "eval.n_samples=4",
                "eval.k=[1]",
                f"eval.max_prompts={max_prompts}",
                *sampling_overrides(),
                *(TOOL if tools else ()),
                f"run.seed={seed}",
                f"run.output_dir={out}",
                "run.progress_bar=false",
                "run.tensorboard=false",
                "run.plots=false",
            ]
        )
    )
    result = {
        "greedy_accuracy": float(metrics["eval/accuracy"]),
        "sampled_accuracy": float(metrics["eval/sampled_accuracy"]),
    }
    if tools:
        result["tool_calls"] = float(metrics["eval/agent_tool_calls"])  # per sampled trajectory
        result["tool_errors"] = float(metrics["eval/agent_tool_errors"])
    return result


def grpo_overrides(model: str, data: str, steps: int, prompts: int, n: int) -> list[str]:
    return [
        "stage=grpo",
        f"model.path={model}",
        f"data.train={data}",
        "data.eval=null",
        f"run.rollout_batch_size={prompts}",
        f"rollout.n_samples_per_prompt={n}",
        *sampling_overrides(),
        "policy.num_workers=1",
        "policy.train_batch_size=16",
        "policy.micro_batch_size=16",
        f"policy.optim.lr={RL_LR}",
        f"run.total_steps={steps}",
        "run.eval_every=0",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "run.plots=false",
    ]


def run_seed(seed: int, args, root: Path) -> dict:
    from rlhf.cli import train
    from rlhf.utils.metrics import read_metrics

    data = tool_data()
    steps, prompts, n = (2, 4, 4) if args.quick else (args.steps, 8, 8)
    max_prompts = 8 if args.quick else 0
    result: dict = {"seed": seed}
    for arm, (sft_kind, tools) in ARMS.items():
        with Stopwatch() as sw:
            sft = root / f"sft-{arm}"
            train(compose([*sft_overrides(data[sft_kind], args.sft_steps), "data.max_length=64", f"run.seed={seed}", f"run.output_dir={sft}"]))  # fmt: skip
        before = evaluate(str(sft / "final"), data["held_out"], root / f"eval-sft-{arm}", seed, tools, max_prompts)
        out = root / f"grpo-{arm}"
        with Stopwatch() as rl:
            train(compose([*grpo_overrides(str(sft / "final"), data["train"], steps, prompts, n), *(TOOL if tools else ()), f"run.seed={seed}", f"run.output_dir={out}"]))  # fmt: skip
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "policy/loss" in r]
        after = evaluate(str(out / "final"), data["held_out"], root / f"eval-grpo-{arm}", seed, tools, max_prompts)
        result[arm] = {
            "sft_seconds": sw.seconds,
            "grpo_seconds": rl.seconds,
            "sft": before,
            "grpo": after,
            "greedy_gain": after["greedy_accuracy"] - before["greedy_accuracy"],
            "reward_curve": [r["reward/tiny_world_mean"] for r in rows],
            "tool_call_curve": [r["agent/tool_calls"] for r in rows] if tools else [],
        }
        logger.info("seed %d %s: SFT %s → GRPO %s", seed, arm, before, after)
    result["tool_beats_plain"] = result["tool"]["grpo"]["greedy_accuracy"] > result["plain"]["grpo"]["greedy_accuracy"]
    return result


def window_mean(curve: list[float], first: bool) -> float:
    k = max(1, min(5, len(curve) // 4))
    return statistics.fmean(curve[:k] if first else curve[-k:]) if curve else float("nan")


def table(results: list[dict]) -> str:
    lines = [
        "| seed | tool: SFT greedy / sampled | tool: GRPO greedy / sampled | tool calls per trajectory SFT → GRPO "
        "| tool: reward first→last | plain: SFT greedy | plain: GRPO greedy | plain: reward first→last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tool, plain = r["tool"], r["plain"]
        lines.append(
            f"| {r['seed']} "
            f"| {tool['sft']['greedy_accuracy']:.3f} / {tool['sft']['sampled_accuracy']:.3f} "
            f"| {tool['grpo']['greedy_accuracy']:.3f} ({tool['greedy_gain']:+.3f}) / {tool['grpo']['sampled_accuracy']:.3f} "
            f"| {tool['sft']['tool_calls']:.2f} → {tool['grpo']['tool_calls']:.2f} "
            f"| {window_mean(tool['reward_curve'], True):.3f} → {window_mean(tool['reward_curve'], False):.3f} "
            f"| {plain['sft']['greedy_accuracy']:.3f} | {plain['grpo']['greedy_accuracy']:.3f} "
            f"| {window_mean(plain['reward_curve'], True):.3f} → {window_mean(plain['reward_curve'], False):.3f} |"
        )
    return "\n".join(lines)


def render(payload: dict) -> str:
    """The README section, from the JSON payload alone (so --render can redo it without rerunning)."""
    s, results = payload["settings"], payload["results"]
    raised = sum(payload["tool_grpo_beats_its_sft"])
    beats = sum(payload["tool_grpo_beats_plain_grpo"])
    return f"""## Agentic RL: GRPO with a calculator tool in the rollout (tiny world, held-out accuracy)

`python -m benchmarks.agentic` — {{machine}} Whole run: {payload["seconds"] / 60:.1f} min.

Task: the tiny world's tool task, products "347*28=" (3-digit × 2-digit; `rlhf.data.tiny_world.tool_file`),
{s["train"]} train and {s["held_out"]} held-out problems; the tiny policy cannot multiply such numbers alone. Per seed: two
SFT warm-ups from `tiny-init` ({s["sft_steps"]} steps × 64 rows, lr 3e-3): **tool**, on demonstrations of which half call
the calculator ("<calc>347*28</calc>9716") and half write the answer directly; **plain**, on the direct answers
alone. Then GRPO ({s["prompts"]} prompts × {s["n"]}, {s["rl_steps"]} steps, lr {s["rl_lr"]:g}, rule reward on the
whole trajectory text, HF engine, {s["turn_tokens"]} tokens per turn): the tool model with `agent.env=calculator`
(multi-turn trajectories, at most {s["trajectory_tokens"]} tokens, the calculator's tokens out of the loss), the plain
model without tools. Held-out accuracy with `stage=eval` (the tool models with the calculator at hand): greedy, and
sampled (4 samples at temperature 1); gain over SFT in brackets. "tool calls": calculator calls per sampled
trajectory. "reward first→last": mean train reward of the first vs last 5 GRPO steps.

{table(results)}

GRPO with the calculator raises held-out greedy accuracy over its SFT start: **{raised} of {len(results)} seeds**; it
beats GRPO without tools on the same problems: **{beats} of {len(results)} seeds**.
Raw: `results/{NAME}.json`.
"""


def main() -> None:
    def options(parser):
        parser.add_argument("--seeds", default="0,1,2")
        parser.add_argument("--steps", type=int, default=RL_STEPS)
        parser.add_argument("--sft-steps", type=int, default=SFT_STEPS)
        parser.add_argument("--render", action="store_true", help="only rewrite the README section from the JSON")

    args = parse_args(__doc__.splitlines()[0], options)
    if rerender(NAME, args, render):
        return
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.sft_steps = 20
    machine = machine_info()
    with Stopwatch() as total, tempfile.TemporaryDirectory(prefix="bench-agentic-") as tmp, ray_cluster():
        results = [run_seed(seed, args, Path(tmp) / f"seed{seed}") for seed in seeds]
    from rlhf.data.tiny_world import TOOL_EVAL, TOOL_TRAIN

    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "seconds": total.seconds,
        "settings": {
            "train": TOOL_TRAIN,
            "held_out": TOOL_EVAL,
            "sft_steps": args.sft_steps,
            "rl_steps": 2 if args.quick else args.steps,
            "prompts": 4 if args.quick else 8,
            "n": 4 if args.quick else 8,
            "rl_lr": RL_LR,
            "turn_tokens": TURN_TOKENS,
            "trajectory_tokens": TRAJECTORY_TOKENS,
            "seeds": seeds,
        },
        "tool_grpo_beats_its_sft": [r["tool"]["greedy_gain"] > 0 for r in results],
        "tool_grpo_beats_plain_grpo": [r["tool_beats_plain"] for r in results],
        "results": results,
    }
    finish(NAME, payload, render(payload), args)


if __name__ == "__main__":
    main()
