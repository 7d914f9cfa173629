"""What this machine's cores allow an RL step of issue 20's shape: the compute floor from plain PyTorch, the
samples/s ceiling it implies, against TRL's and our best samples/s from results/async_rl.json.

Shape (benchmarks/async_rl.py): the ~25M Qwen2, 64 sequences of a chat-templated tiny-world prompt plus 64 response
tokens, one optimizer step per RL step. Measured here:
  update_s (1 and 2 threads)  a plain-PyTorch forward, backward and AdamW step on the 64 sequences, no padding mask,
                              no DeepSpeed, no entropy or KL: less work than any RL update; median after a warm-up.
  generate_s (1 thread)       read from results/async_rl.json: the sync mode's generate phase (vLLM, 1 thread).
  forward_s (1 thread)        a plain forward of the batch without gradients: the least generation could cost.
The best any system can do on C cores with one thread per piece of work is a step of (update_s + generate_s) / C
seconds: every core busy all the time at one-thread efficiency, generation and update split perfectly. That
bound's samples/s ÷ TRL's measured samples/s is the most any overlap could reach against TRL here.

    python -m benchmarks.compute_ceiling [--quick] [--repeats 6]
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time

from benchmarks.common import RESULTS_DIR, bench_model, finish, machine_info, parse_args

logger = logging.getLogger("benchmarks.compute_ceiling")

NAME = "compute_ceiling"
SEQUENCES, RESPONSE_TOKENS = 64, 64  # benchmarks/async_rl.py: 16 prompts × 4 samples, ≤ 64 new tokens
TASK = "sub_1d"


def prompt_tokens() -> int:
    """The longest chat-templated prompt of the task's first 16 train prompts (what async_rl's batches hold)."""
    from rlhf.data.prompts import load_prompt_dataset
    from rlhf.data.tokenizer import encode_chat_prompt
    from rlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    rows = load_prompt_dataset(f"tiny:train:{TASK}", prompt_key="prompt", answer_key="answer")[:16]
    return max(len(encode_chat_prompt(tokenizer, r.prompt)) for r in rows)


def update_seconds(
    model_path: str, threads: int, length: int, repeats: int, *, forward_only: bool = False
) -> list[float]:
    """Plain-PyTorch forward + backward + AdamW step of SEQUENCES × `length` tokens on `threads` threads
    (`forward_only`: the forward alone, without gradients)."""
    import torch
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(0, model.config.vocab_size, (SEQUENCES, length))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            if forward_only:
                with torch.no_grad():
                    model(input_ids=ids)
                times.append(time.perf_counter() - start)
                continue
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return times


def measured(size: str) -> dict:
    """The sync generate phase (1 thread), TRL's and our best mode's samples/s from results/async_rl.json."""
    path = RESULTS_DIR / "async_rl.json"
    if not path.exists():
        return {}
    result = json.loads(path.read_text())["results"].get(size, {})
    summary, best = result.get("summary", {}), result.get("best_mode")
    if "trl" not in summary or "sync" not in summary:
        return {}
    return {
        "generate_s_1_thread": summary["sync"]["phases_s"]["generate"]["median"],
        "trl_samples_per_s": summary["trl"]["samples_per_s"]["median"],
        "best_mode": best,
        "best_mode_samples_per_s": summary[best]["samples_per_s"]["median"] if best else None,
    }


def table(payload: dict) -> str:
    r = payload["results"]
    lines = [
        "| what | value |",
        "|---|---|",
        f"| batch | {SEQUENCES} sequences × ({r['prompt_tokens']} prompt + {RESPONSE_TOKENS} response) tokens |",
        f"| plain-PyTorch update, 1 thread | {r['update_s_1_thread']:.2f} s |",
        f"| plain-PyTorch update, 2 threads | {r['update_s_2_threads']:.2f} s |",
    ]
    if "generate_s_1_thread" in r:
        lines += [
            f"| generate phase, 1 thread (sync, vLLM; results/async_rl.json) | {r['generate_s_1_thread']:.2f} s |",
            f"| floor of a step on {r['cores']} cores: (update + generate) / cores | {r['step_floor_s']:.2f} s |",
            f"| ceiling: {SEQUENCES} / floor | {r['ceiling_samples_per_s']:.2f} samples/s |",
            f"| TRL GRPOTrainer, measured | {r['trl_samples_per_s']:.2f} samples/s |",
            f"| our best mode ({r['best_mode']}), measured | {r['best_mode_samples_per_s']:.2f} samples/s |",
            f"| **ceiling ÷ TRL** (issue 20's target: ≥ 1.8) | **{r['ceiling_vs_trl']:.2f}** |",
            f"| plain-PyTorch forward of the batch, 1 thread (the least generation could cost) | "
            f"{r['forward_s_1_thread']:.2f} s |",
            f"| with generation at that cost: floor (update + forward) / cores; ceiling ÷ TRL | "
            f"{r['ideal_step_floor_s']:.2f} s; **{r['ideal_ceiling_vs_trl']:.2f}** |",
        ]
    return "\n".join(lines)


def render(payload: dict) -> str:
    return f"""## Compute ceiling: what the cores allow an RL step of the async_rl shape

`python -m benchmarks.compute_ceiling` — {{machine}}

The compute floor of one RL step of benchmarks/async_rl.py's 25M shape, from plain PyTorch (a forward, backward
and AdamW step with no mask, no DeepSpeed, no entropy: less than any RL update does) and the generate phase
measured there. With every core busy all the time at one-thread efficiency and generation and update split
perfectly, a step takes (update + generate) / cores: the ceiling of samples/s any overlap can reach here. The
last row lowers generation to one forward pass over every token at once, less than any decoder can spend (it
decodes token by token): no rollout engine, however fast, lifts the ceiling above that.

{table(payload)}

Raw: `results/{NAME}.json`.
"""


def main() -> None:
    def options(parser):
        parser.add_argument("--repeats", type=int, default=6, help="timed steps per thread count (the first dropped)")

    args = parse_args(__doc__.splitlines()[0], options)
    size, repeats = ("tiny", 2) if args.quick else ("25m", args.repeats)
    machine = machine_info()
    model_path, num_params = bench_model(size)
    length = prompt_tokens() + RESPONSE_TOKENS
    one = update_seconds(model_path, 1, length, repeats)
    two = update_seconds(model_path, 2, length, repeats)
    forward = update_seconds(model_path, 1, length, repeats, forward_only=True)
    result = {
        "size": size,
        "num_params": num_params,
        "prompt_tokens": length - RESPONSE_TOKENS,
        "cores": os.cpu_count(),
        "update_s_1_thread_runs": one,
        "update_s_2_threads_runs": two,
        "update_s_1_thread": statistics.median(one[1:] or one),
        "update_s_2_threads": statistics.median(two[1:] or two),
        "forward_s_1_thread_runs": forward,
        "forward_s_1_thread": statistics.median(forward[1:] or forward),
        **measured(size),
    }
    if "generate_s_1_thread" in result:
        result["step_floor_s"] = (result["update_s_1_thread"] + result["generate_s_1_thread"]) / result["cores"]
        result["ceiling_samples_per_s"] = SEQUENCES / result["step_floor_s"]
        result["ceiling_vs_trl"] = result["ceiling_samples_per_s"] / result["trl_samples_per_s"]
        # generation can cost no less than one forward over every token at once (decoding is token by token)
        ideal = (result["update_s_1_thread"] + result["forward_s_1_thread"]) / result["cores"]
        result["ideal_step_floor_s"] = ideal
        result["ideal_ceiling_vs_trl"] = SEQUENCES / ideal / result["trl_samples_per_s"]
    logger.info("compute ceiling: %s", result)
    payload = {"benchmark": NAME, "quick": args.quick, "machine": machine, "results": result}
    finish(NAME, payload, render(payload), args)


if __name__ == "__main__":
    main()
