"""Rollout backends: vLLM vs HF generate, generated tokens/s on the same model, prompts and sampling.

Both engines are started as the trainer starts them (a `RolloutGroup` of one Ray actor each, same
checkpoint, same seed), then asked in alternation for the same batch (`--prompts` tiny-world
prompts × `--n` samples, temperature 1, `--max-new-tokens`). One untimed warm-up call each, then
`--reps` rounds; tokens/s = response tokens returned ÷ wall seconds of the call (Ray round trip
included). The ratio vLLM ÷ HF of each round is the headline. The shipped tiny policy answers in
a few tokens; the random-init ~10M model mostly runs to the token limit, so it measures decode speed.

    python -m benchmarks.rollout_backends [--quick] [--sizes tiny,10m] [--reps 5]
"""

from __future__ import annotations

import logging

from benchmarks.common import Stopwatch, bench_model, finish, fmt, machine_info, parse_args, ray_cluster, summarize

logger = logging.getLogger("benchmarks.rollout_backends")

NAME = "rollout_backends"
BACKENDS = ("vllm", "hf")


def tiny_prompts(count: int) -> list[list[int]]:
    from rlhf.data.tiny_world import generate_rows
    from rlhf.data.tokenizer import encode_chat_prompt
    from rlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    rows = generate_rows("rl", "train")[:count]
    return [encode_chat_prompt(tokenizer, row["prompt"]) for row in rows]


def measure(size: str, prompts: list[list[int]], n: int, max_new_tokens: int, reps: int) -> dict:
    from rlhf.config import RLHFConfig, SamplingConfig
    from rlhf.workers.rollout import RolloutGroup

    path, num_params = bench_model(size)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens)
    engines = {}
    try:
        for backend in BACKENDS:
            cfg = RLHFConfig()
            cfg.rollout.backend = backend
            engines[backend] = RolloutGroup(path, cfg.model, cfg.rollout, cfg.cluster, seed=0)
        for engine in engines.values():
            engine.generate(prompts, sampling, n=n, seed=0)  # warm-up
        rounds = []
        for rep in range(reps):
            row = {}
            for backend, engine in engines.items():
                with Stopwatch() as sw:
                    outputs = engine.generate(prompts, sampling, n=n, seed=rep + 1)
                tokens = sum(len(g.token_ids) for gens in outputs for g in gens)
                row[backend] = {"seconds": sw.seconds, "tokens": tokens, "tokens_per_s": tokens / sw.seconds}
            row["ratio_vllm_vs_hf"] = row["vllm"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            rounds.append(row)
            logger.info("%s round %d: %s", size, rep, row)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return {
        "size": size,
        "num_params": num_params,
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        **{
            f"{b}_{k}": summarize([r[b][k] for r in rounds])
            for b in BACKENDS
            for k in ("tokens_per_s", "seconds", "tokens")
        },
        "ratio_vllm_vs_hf": summarize([r["ratio_vllm_vs_hf"] for r in rounds]),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| model | batch | vLLM tokens/s | HF tokens/s | vLLM ÷ HF | tokens per call (vLLM / HF) | vLLM s | HF s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['size']} ({r['num_params'] / 1e6:.1f}M) | {r['prompts']}×{r['samples_per_prompt']}, ≤{r['max_new_tokens']} tok "
            f"| {fmt(r['vllm_tokens_per_s'], 0)} | {fmt(r['hf_tokens_per_s'], 0)} | {fmt(r['ratio_vllm_vs_hf'], 2)} "
            f"| {r['vllm_tokens']['median']:.0f} / {r['hf_tokens']['median']:.0f} "
            f"| {fmt(r['vllm_seconds'], 2)} | {fmt(r['hf_seconds'], 2)} |"
        )
    return "\n".join(lines)


def main() -> None:
    def options(parser):
        parser.add_argument("--sizes", default="tiny,10m")
        parser.add_argument("--prompts", type=int, default=16)
        parser.add_argument("--n", type=int, default=8)
        parser.add_argument("--max-new-tokens", type=int, default=32)
        parser.add_argument("--reps", type=int, default=5)

    args = parse_args(__doc__.splitlines()[0], options)
    sizes = ["tiny"] if args.quick else args.sizes.split(",")
    count, n, max_new, reps = (4, 2, 8, 2) if args.quick else (args.prompts, args.n, args.max_new_tokens, args.reps)
    machine = machine_info()
    prompts = tiny_prompts(count)
    with ray_cluster():
        results = [measure(size, prompts, n, max_new, reps) for size in sizes]
    payload = {"benchmark": NAME, "quick": args.quick, "machine": machine, "results": results}
    markdown = f"""## Rollout backends: vLLM vs HF generate (CPU)

`python -m benchmarks.rollout_backends` — {{machine}}

One engine of each backend as a Ray actor (`RolloutGroup`, fp32, same checkpoint and seed), called in alternation
with the same {count} tiny-world prompts × {n} samples, temperature 1, ≤ {max_new} new tokens; one warm-up call each,
then {reps} rounds. Tokens/s = response tokens ÷ the call's wall time (Ray round trip included); median [min–max];
the ratio is per round. Sampled responses differ between backends, so the token counts are shown too.

{table(results)}

Raw: `results/{NAME}.json`.
"""
    finish(NAME, payload, markdown, args)


if __name__ == "__main__":
    main()
