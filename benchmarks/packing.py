"""Token-budget micro-batches vs padded rows: policy logprob + update time on a long-tailed batch.

Two PolicyWorker groups of 2 ranks (ZeRO-2, gloo) start from the same checkpoint: *padded*
(`policy.micro_batch_size` rows, each padded to the batch's longest prompt and response) and
*packed* (`policy.max_tokens_per_micro_batch`: first-fit decreasing into micro-batches of at most
that many real tokens, one row each with positions restarting per sequence, ranks balanced by
tokens). The batch's response lengths are long-tailed over 1…256 (log-normal, one of 256 for the
padded width). A repeat times, per mode, `compute_logprobs` then one `update` (all minibatches of
one PPO epoch), from the driver; the modes alternate which goes first, so load drifts hit both,
and the speed-up is the ratio of the two medians (the per-repeat ratios, whose two runs are
seconds apart, are reported too). The first repeat also checks equal results
(both groups then hold the same weights): logprobs on every real token and the update's loss
and gradient norm. The 1-minute load average is read at every repeat.

    python -m benchmarks.packing [--quick] [--size 10m] [--rows 64] [--repeats 5] [--budget 2048]
"""

from __future__ import annotations

import logging
import math
import os
import random
import time

import torch

from benchmarks.common import (
    bench_model,
    finish,
    fmt,
    load_average,
    machine_info,
    parse_args,
    ray_cluster,
    summarize,
)

logger = logging.getLogger("benchmarks.packing")

NAME = "packing"
TARGET_SPEEDUP = 1.5
MODES = ("padded", "packed")


def long_tailed_lengths(rows: int, longest: int, seed: int) -> list[int]:
    """Response lengths in 1…longest, log-normal (median ~longest/8), the first 1 and the last `longest`."""
    rng = random.Random(seed)
    median = max(longest / 8, 1.0)
    lengths = [min(longest, max(1, round(rng.lognormvariate(math.log(median), 1.0)))) for _ in range(rows)]
    lengths[0], lengths[-1] = 1, longest
    return lengths


def make_batch(rows: int, longest: int, vocab_size: int, seed: int = 0):
    from rlhf.data.batch import RolloutBatch, pad_sequences

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(rng.randint(8, 24))] for _ in range(rows)]
    responses = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in long_tailed_lengths(rows, longest, seed)]
    prompt_ids, prompt_mask = pad_sequences(prompts, pad_id=0, left=True)
    response_ids, response_mask = pad_sequences(responses, pad_id=0, left=False)
    sign = torch.tensor([1.0 if i % 2 else -1.0 for i in range(rows)]).unsqueeze(1)
    batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask)
    return batch.replace(advantages=sign.expand_as(response_ids).clone())


def start_groups(path: str, micro_batch_size: int, budget: int, train_batch_size: int) -> dict:
    from rlhf.config import AlgorithmConfig, ClusterConfig, OptimConfig, RLHFConfig, TrainConfig
    from rlhf.trainers.rl import token_balance
    from rlhf.trainers.roles import start_policy_group
    from rlhf.workers.policy import PolicyWorker

    groups = {}
    for mode in MODES:
        cfg = RLHFConfig(
            policy=TrainConfig(
                num_workers=2,
                zero_stage=2,
                micro_batch_size=micro_batch_size,
                max_tokens_per_micro_batch=budget if mode == "packed" else None,
                train_batch_size=train_batch_size,
                optim=OptimConfig(lr=1e-5),
            ),
            algorithm=AlgorithmConfig(loss_agg="token_mean", entropy_coef=0.0),
            cluster=ClusterConfig(collective_timeout_s=1800),
        )
        groups[mode] = start_policy_group(
            cfg, PolicyWorker, role=f"policy-{mode}", algo_cfg=cfg.algorithm, **token_balance(cfg.policy)
        )
    pending = {mode: g.run(PolicyWorker.init_model, path) for mode, g in groups.items()}
    for mode, g in groups.items():
        g.wait(pending[mode], timeout=900)
    return groups


def timed_step(group, batch) -> dict:
    """Seconds of compute_logprobs and of one update (old logprobs: the ones just computed)."""
    from rlhf.workers.policy import PolicyWorker

    start = time.perf_counter()
    logprobs = group.call(PolicyWorker.compute_logprobs, batch)
    middle = time.perf_counter()
    stats = group.call(PolicyWorker.update, batch.replace(old_logprobs=logprobs))
    end = time.perf_counter()
    return {
        "logprobs_s": middle - start,
        "update_s": end - middle,
        "total_s": end - start,
        "logprobs": logprobs,
        **stats,
    }


def run(args) -> dict:
    path, num_params = bench_model(args.size)
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(path).vocab_size
    batch = make_batch(args.rows, args.longest, vocab_size)
    lengths = (batch.prompt_mask.sum(1) + batch.response_mask.sum(1)).tolist()
    groups = start_groups(path, args.micro_batch_size, args.budget, args.train_batch_size)
    repeats: list[dict] = []
    equality: dict = {}
    try:
        for repeat in range(args.repeats):
            order = MODES if repeat % 2 == 0 else MODES[::-1]
            row = {"repeat": repeat, "load_1min": load_average()[:1]}
            for mode in order:
                row[mode] = timed_step(groups[mode], batch)
                logger.info("repeat %d %s: %.2fs", repeat, mode, row[mode]["total_s"])
            if repeat == 0:
                mask = batch.response_mask.bool()
                diff = (row["packed"]["logprobs"] - row["padded"]["logprobs"])[mask].abs().max()
                equality = {
                    "max_abs_logprob_diff": float(diff),
                    **{
                        f"rel_diff_{key.split('/')[1]}": abs(row["packed"][key] - row["padded"][key])
                        / max(abs(row["padded"][key]), 1e-12)
                        for key in ("policy/loss", "policy/grad_norm")
                    },
                }
            for mode in MODES:
                row[mode] = {k: v for k, v in row[mode].items() if k.endswith("_s")}
            repeats.append(row)
    finally:
        for group in groups.values():
            group.shutdown()
    summary = {mode: {k: summarize([r[mode][k] for r in repeats]) for k in repeats[0][mode]} for mode in MODES}
    keys = ("logprobs_s", "update_s", "total_s")
    speedup = {k: summary["padded"][k]["median"] / summary["packed"][k]["median"] for k in keys}
    per_repeat = {k: summarize([r["padded"][k] / r["packed"][k] for r in repeats]) for k in keys}
    return {
        "size": args.size,
        "num_params": num_params,
        "rows": args.rows,
        "train_batch_size": args.train_batch_size,
        "micro_batch_size": args.micro_batch_size,
        "max_tokens_per_micro_batch": args.budget,
        "response_lengths": {
            "min": int(batch.response_mask.sum(1).min()),
            "median": float(batch.response_mask.sum(1).float().median()),
            "max": int(batch.response_mask.sum(1).max()),
        },
        "real_tokens": int(sum(lengths)),
        "padded_tokens": len(batch) * (batch.prompt_length + batch.response_ids.shape[1]),
        "equality": equality,
        "repeats": repeats,
        "summary": summary,
        "speedup": speedup,
        "speedup_per_repeat": per_repeat,
        "load_1min": summarize([r["load_1min"][0] for r in repeats if r["load_1min"]]),
    }


def table(result: dict) -> str:
    lines = [
        "| mode | logprobs s | update s | logprobs + update s |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        s = result["summary"][mode]
        lines.append(f"| {mode} | {fmt(s['logprobs_s'], 2)} | {fmt(s['update_s'], 2)} | {fmt(s['total_s'], 2)} |")
    sp = result["speedup"]
    lines.append(
        f"| **speed-up** (medians) | {sp['logprobs_s']:.2f}× | {sp['update_s']:.2f}× | **{sp['total_s']:.2f}×** |"
    )
    pr = result["speedup_per_repeat"]
    cells = " | ".join(f"{fmt(pr[k], 2)}×" for k in ("logprobs_s", "update_s", "total_s"))
    lines.append(f"| speed-up per repeat | {cells} |")
    return "\n".join(lines)


def main() -> None:
    def options(parser):
        parser.add_argument("--size", default="10m", help="benchmarks.common.MODEL_SIZES entry")
        parser.add_argument("--rows", type=int, default=64, help="sequences in the batch")
        parser.add_argument("--longest", type=int, default=256, help="longest response (tokens)")
        parser.add_argument("--repeats", type=int, default=5)
        parser.add_argument("--micro-batch-size", type=int, default=8, help="padded rows per micro-batch")
        parser.add_argument("--train-batch-size", type=int, default=32, help="sequences per optimizer step")
        parser.add_argument("--budget", type=int, default=2048, help="max_tokens_per_micro_batch of the packed mode")

    args = parse_args(__doc__.splitlines()[0], options)
    if args.quick:
        args.size, args.rows, args.longest, args.repeats = "tiny", 16, 32, 2
        args.micro_batch_size, args.train_batch_size, args.budget = 4, 8, 128
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    machine = machine_info()
    with ray_cluster():
        result = run(args)
    met = result["speedup"]["total_s"] >= TARGET_SPEEDUP
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "target": f"packed logprobs + update >= {TARGET_SPEEDUP}x faster than padded (median), equal results",
        "target_met": met,
        "results": [result],
    }
    eq = result["equality"]
    lengths = result["response_lengths"]
    markdown = f"""## Token-budget micro-batches vs padded rows (policy logprobs + update, CPU)

`python -m benchmarks.packing` — {{machine}}

{result["rows"]} sequences, prompts 8–24 tokens, response lengths long-tailed (log-normal) from {lengths["min"]} to
{lengths["max"]} (median {lengths["median"]:g}): {result["real_tokens"]} real tokens, {result["padded_tokens"]} padded.
Policy {args.size} ({result["num_params"] / 1e6:.1f}M, qwen2) on 2 DeepSpeed ranks (ZeRO-2, gloo), train_batch_size
{result["train_batch_size"]} ({result["rows"] // result["train_batch_size"]} optimizer steps per update). *padded*: micro_batch_size {result["micro_batch_size"]};
*packed*: `policy.max_tokens_per_micro_batch={result["max_tokens_per_micro_batch"]}`. {len(result["repeats"])}
repeats, modes alternating which runs first; median [min–max] seconds; 1-minute load average over the repeats
{fmt(result["load_1min"], 1)}. Equal results (first repeat, same weights): max |Δ logprob| {eq["max_abs_logprob_diff"]:.1e},
update loss relative difference {eq["rel_diff_loss"]:.1e}, gradient norm {eq["rel_diff_grad_norm"]:.1e}.

{table(result)}

Target packed ≥ {TARGET_SPEEDUP}× faster (logprobs + update, medians): **{"met" if met else "NOT met"}**.
Raw: `results/{NAME}.json`.
"""
    finish(NAME, payload, markdown, args)


if __name__ == "__main__":
    main()
