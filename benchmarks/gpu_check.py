"""The prepared GPU check (issue 18, item 6): GRPO and PPO steps of a ~0.5B Qwen2-shaped model on one GPU.

Run by `benchmarks/gpu/check.sh` on a lent H100/H200, where ray, deepspeed and hydra-core come from
wheels and vLLM for CUDA is not available (so the HF rollout backend). The model is built from a
config, random init, with the tiny world's tokenizer (no hub): hidden 1024, 24 layers, 16 heads /
2 KV heads, intermediate 5632, ~0.47B parameters. Every role runs in bf16 on the one GPU
(`cluster=single_gpu`), the policy and critic under ZeRO-3 built inside `deepspeed.zero.Init`.
A random model rarely samples EOS, so every response runs to max_new_tokens: generation is measured
at its full length.

Per stage, over the steps after the first (warm-up: allocator, kernels):
  update MFU     6·N·(prompt + response tokens of the batch) / timing/update / peak bf16 FLOP/s
                 (forward and backward over the real tokens, one PPO epoch; N the policy's parameter
                 count, twice that for PPO, whose critic updates at the same time;
                 Kaplan et al. 2020 (arXiv:2001.08361) §2.1: 6N FLOPs per trained token; the peak is the
                 dense bf16 figure of the device's datasheet, 989 TFLOP/s for H100 SXM and H200)
  generate tok/s response tokens of the batch / timing/generate
  peak memory    per role, the most any of its processes held at a sample (every 0.5 s): on cuda
                 nvidia-smi's per-process used memory, on cpu the process's RSS; processes are named
                 by Ray's title (ray::PolicyWorker -> policy). Also the GPU's total used memory.

    python -m benchmarks.gpu_check [--quick] [--device cuda|cpu] [--steps 5] [--stage-timeout 200]

`--quick --device cpu` is the smoke test (the tiny shape on cluster=cpu_debug; the numbers mean nothing).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, Stopwatch, bench_model, finish, machine_info, parse_args

logger = logging.getLogger("benchmarks.gpu_check")

NAME = "gpu_check"
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 tensor-core peak per GPU (NVIDIA H100 SXM / H200 datasheets, without sparsity)."""
STAGES = {
    # stage: (prompts per step, samples per prompt, extra overrides); 128 sequences per step either way.
    # GRPO's group of 8; PPO's default 2 samples, its critic under ZeRO-3 as well.
    "grpo": (16, 8, []),
    "ppo": (64, 2, ["critic.zero_stage=3"]),
}
RAY_TITLE = re.compile(rb"^ray::(\w+?)Worker\b")


def stage_command(stage: str, model: str, output_dir: Path, device: str, steps: int, quick: bool) -> list[str]:
    """`python -m rlhf ...` for one stage, as a user would run it on one GPU (or the CPU debug cluster)."""
    cluster = ["cluster=single_gpu", "model.dtype=bfloat16"] if device == "cuda" else ["cluster=cpu_debug"]
    prompts, samples, extra = STAGES[stage]
    prompts, new_tokens, micro = (2, 8, 2) if quick else (prompts, 256, 8)
    train = prompts * samples // (1 if quick else 2)  # two optimizer steps per RL step
    return [
        sys.executable, "-m", "rlhf", f"stage={stage}", *cluster, f"model.path={model}", "rollout.backend=hf",
        f"run.rollout_batch_size={prompts}", f"rollout.n_samples_per_prompt={samples}",
        f"rollout.sampling.max_new_tokens={new_tokens}", "policy.zero_stage=3",
        f"policy.train_batch_size={train}", f"critic.train_batch_size={train}",
        f"policy.micro_batch_size={micro}", f"critic.micro_batch_size={micro}", *extra,
        f"run.total_steps={steps}", "run.eval_every=0", "run.final_eval=false", "run.save_every=0",
        "run.progress_bar=false", "run.tensorboard=false", "run.plots=false", f"run.output_dir={output_dir}",
    ]  # fmt: skip


class RoleMemory(threading.Thread):
    """Peak memory per role while a stage runs, sampled from outside the processes (nothing in them changes)."""

    def __init__(self, root_pid: int, device: str, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.root_pid, self.device, self.interval_s = root_pid, device, interval_s
        self.peak: dict[str, int] = {}
        self.gpu_total_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            try:
                self.sample()
            except (OSError, subprocess.SubprocessError, ValueError) as e:  # a process left mid-sample
                logger.debug("memory sample skipped: %s", e)

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.join(timeout=10)
        self.sample()
        return {"per_role_bytes": dict(self.peak), "gpu_total_bytes": self.gpu_total_peak or None}

    def sample(self) -> None:
        used = self._gpu_processes() if self.device == "cuda" else self._rss_of_ray_workers()
        ours = descendants(self.root_pid)  # not another job's Ray workers on the same machine
        for pid, nbytes in used.items():
            role = role_of(pid)
            if role is not None and pid in ours:
                self.peak[role] = max(self.peak.get(role, 0), nbytes)
        if self.device == "cuda":
            out = _nvidia_smi("--query-gpu=memory.used")
            self.gpu_total_peak = max(self.gpu_total_peak, sum(int(v) << 20 for v in out.split()))

    @staticmethod
    def _gpu_processes() -> dict[int, int]:
        rows = _nvidia_smi("--query-compute-apps=pid,used_memory").splitlines()
        return {int(pid): int(mib) << 20 for pid, mib in (row.split(",") for row in rows if row.strip())}

    @staticmethod
    def _rss_of_ray_workers() -> dict[int, int]:
        used = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and role_of(int(proc.name)) is not None:
                status = (proc / "status").read_text()
                rss_kib = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
                if rss_kib:
                    used[int(proc.name)] = int(rss_kib.group(1)) << 10
        return used


def _nvidia_smi(query: str) -> str:
    return subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def descendants(root: int) -> set[int]:
    """Every process below `root` (the stage's driver; Ray's raylet and workers are its children)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(proc.name))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def role_of(pid: int) -> str | None:
    """The role of a Ray worker process from its title (ray::PolicyWorker.update() -> policy); None otherwise."""
    try:
        match = RAY_TITLE.match(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return None
    return match.group(1).decode().lower() if match else None


def stage_figures(metrics: list[dict[str, float]], trained_params: int, peak_flops: float | None) -> dict:
    """Medians over the steps after the first: update MFU, generation tokens/s, step and phase seconds.

    `trained_params`: the parameters the update trains over each token (the policy's; PPO adds its
    critic, which updates at the same time); one PPO epoch per batch.
    """
    steps = metrics[1:] or metrics
    flops = [6 * trained_params * m["perf/sequence_tokens"] / m["timing/update"] for m in steps]
    return {
        "steps_measured": len(steps),
        "update_mfu": statistics.median(flops) / peak_flops if peak_flops else None,
        "update_tflops": statistics.median(flops) / 1e12,
        "generate_tokens_per_s": statistics.median(m["perf/tokens_per_s"] for m in steps),
        "sequence_tokens": statistics.median(m["perf/sequence_tokens"] for m in steps),
        **{f"{k.split('/')[1]}_s": statistics.median(m[k] for m in steps) for k in _timings(steps)},
    }


def _timings(steps: list[dict[str, float]]) -> list[str]:
    return sorted(k for k in steps[0] if k.startswith("timing/"))


def run_stage(stage: str, model: str, params: int, out: Path, args) -> dict[str, Any]:
    output_dir = out / stage
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    cmd = stage_command(stage, model, output_dir, args.device, args.steps, args.quick)
    log = out / f"{stage}.log"
    with Stopwatch() as sw, log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=BENCH_DIR.parent, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        memory = RoleMemory(proc.pid, args.device)
        memory.start()
        try:
            returncode = proc.wait(timeout=args.stage_timeout)
        except subprocess.TimeoutExpired:  # the other stage still runs and the JSON is still written
            logger.error("%s ran past --stage-timeout %ds: stopped", stage, args.stage_timeout)
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
            returncode = proc.wait()
    peaks = memory.stop()
    result: dict[str, Any] = {"stage": stage, "returncode": returncode, "wall_s": sw.seconds, "memory": peaks}
    if returncode != 0:
        logger.error("%s failed (exit %d):\n%s", stage, returncode, log.read_text()[-3000:])
        return result
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in rows if "perf/sequence_tokens" in m]  # the train steps (not eval or summary rows)
    trained = params * (2 if stage == "ppo" else 1)  # PPO's critic: the same backbone plus a value head
    result.update(stage_figures(metrics, trained, peak_flops=_peak_flops(args.device)))
    return result


def _peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = _nvidia_smi("--query-gpu=name").splitlines()[0]
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def markdown(payload: dict[str, Any]) -> str:
    gib = 1 << 30
    lines = [
        "## GPU check: GRPO and PPO steps of a ~0.5B Qwen2-shaped model on one GPU",
        "",
        f"`benchmarks/gpu/check.sh` — {payload['device']}, {payload['params']:,} parameters (random init from a "
        "config), bf16, ZeRO-3 built inside `zero.Init`, HF rollout backend, every role on the one GPU "
        f"(`cluster=single_gpu`). Medians over steps 2–{payload['steps']}. {{machine}}",
        "",
        "| stage | update MFU | update TFLOP/s | generate tok/s | tokens per step | step s | generate s | "
        "update s | peak GPU memory per role (GiB) | GPU total peak GiB | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        if r["returncode"] != 0:
            lines.append(f"| {r['stage']} | failed (exit {r['returncode']}) |" + " |" * 9)
            continue
        roles = ", ".join(f"{k} {v / gib:.1f}" for k, v in sorted(r["memory"]["per_role_bytes"].items())) or "–"
        total = r["memory"]["gpu_total_bytes"]
        mfu = f"{r['update_mfu']:.1%}" if r["update_mfu"] is not None else "–"
        lines.append(
            f"| {r['stage']} | {mfu} | {r['update_tflops']:.1f} | {r['generate_tokens_per_s']:.0f} | "
            f"{r['sequence_tokens']:.0f} | {r['step_s']:.2f} | {r['generate_s']:.2f} | {r['update_s']:.2f} | "
            f"{roles} | {total / gib if total else 0:.1f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    def extra(parser) -> None:
        parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        parser.add_argument("--steps", type=int, default=5)
        parser.add_argument("--stage-timeout", type=int, default=200, help="seconds per stage before it is stopped")

    args = parse_args(__doc__.splitlines()[0], extra)
    out = Path(args.out or os.environ.get("OUT") or BENCH_DIR / "results" / NAME)
    out.mkdir(parents=True, exist_ok=True)
    model, params = bench_model("tiny" if args.quick else "500m")
    machine = machine_info()
    device = _nvidia_smi("--query-gpu=name").splitlines()[0] if args.device == "cuda" else "CPU"
    machine["gpu"] = device if args.device == "cuda" else None
    stages = [run_stage(stage, model, params, out, args) for stage in STAGES]
    payload = {
        "benchmark": NAME, "quick": args.quick, "device": device, "params": params, "steps": args.steps,
        "machine": machine, "results": stages,
    }  # fmt: skip
    finish(NAME, payload, markdown(payload), args)
    if any(r["returncode"] != 0 for r in stages):
        sys.exit(1)


if __name__ == "__main__":
    main()
