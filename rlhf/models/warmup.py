"""Tiny-world model fixtures: a random-init tiny policy and the same after a short warm-up.

This is a fixture builder for tests and the demo, NOT the SFT stage of the product (that runs on
the distributed runtime: DeepSpeed workers driven by the offline controller). A random tiny model
never answers correctly, so an RL test or demo starting from it would see reward 0 everywhere and
learn nothing. A half-minute supervised warm-up on the tiny world's SFT pairs (plain torch loop,
CPU, loss on response tokens only, prompts rendered with the chat template) gives a policy that
solves some eval problems but not all (see `warmup.json` next to the checkpoint), which is what
GRPO needs to show a rising reward.

Outputs, each a normal Hugging Face checkpoint dir (safetensors + tokenizer, generation_config
with the tokenizer's bos/eos/pad ids) loadable with `AutoModelForCausalLM.from_pretrained`:
  <out_dir>/policy-init/   random init from rlhf.models.tiny.build_tiny_model(arch, seed)
  <out_dir>/policy-sft/    after `steps` AdamW steps on the SFT pairs, plus warmup.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.data.batch import pad_sequences
from rlhf.data.tiny_world import (
    CARRY_TASK,
    JUDGE_ARCH,
    TINY_ARCHS,
    TinyWorldPaths,
    build_once,
    cache_root,
    check_answer,
    generate_rows,
    grid_split,
    locked,
    materialize_tiny_world,
    read_jsonl,
    tiny_world_hash,
)
from rlhf.data.tokenizer import encode_chat_prompt
from rlhf.errors import DataError
from rlhf.models.tiny import build_tiny_model, save_tiny_model

logger = logging.getLogger(__name__)

WARMUP_STEPS = 300
WARMUP_BATCH_SIZE = 64
WARMUP_LR = 3e-3
IGNORE_INDEX = -100


def build_tiny_checkpoints(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    arch: str = "qwen2",
    seed: int = 0,
    sft_rows: Sequence[dict[str, Any]] | None = None,
    eval_rows: Sequence[dict[str, Any]] | None = None,
    steps: int = WARMUP_STEPS,
) -> dict[str, Path]:
    """Write policy-init and policy-sft under `out_dir`; returns {"policy-init": dir, "policy-sft": dir}.

    `sft_rows` ({"prompt", "response"}) default to the tiny world's SFT train split for `seed`,
    `eval_rows` ({"prompt", "answer"}) to its RL eval split; accuracy on the latter is measured
    (greedy and sampled at temperature 1) and written to policy-sft/warmup.json.
    """
    out_dir = Path(out_dir)
    sft_rows = generate_rows("sft", "train", seed=seed) if sft_rows is None else sft_rows
    eval_rows = generate_rows("rl", "eval", seed=seed) if eval_rows is None else eval_rows
    model = build_tiny_model(
        arch,
        vocab_size=len(tokenizer),
        seed=seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    init_dir = save_tiny_model(model, tokenizer, out_dir / "policy-init")

    with one_thread():
        start = time.perf_counter()
        losses = warm_up(model, tokenizer, sft_rows, steps=steps, seed=seed)
        train_seconds = time.perf_counter() - start
        report = _warmup_report(model, tokenizer, eval_rows, arch=arch, seed=seed, steps=steps, losses=losses)
    report["train_seconds"] = round(train_seconds, 2)
    sft_dir = save_tiny_model(model, tokenizer, out_dir / "policy-sft")
    (sft_dir / "warmup.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "tiny %s warm-up: %d steps in %.1fs, loss %.3f, eval accuracy greedy %.2f sampled %.2f",
        arch, steps, train_seconds, report["final_loss"], report["eval_accuracy_greedy"], report["eval_accuracy_sampled"],
    )  # fmt: skip
    return {"policy-init": init_dir, "policy-sft": sft_dir}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch intra-op thread inside: the tiny models' matrices are small, and on a busy machine (tests
    running beside Ray workers) two spinning OpenMP threads were measured 10-20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _warmup_report(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_rows: Sequence[dict[str, Any]],
    *,
    arch: str,
    seed: int,
    steps: int,
    losses: list[float],
) -> dict[str, Any]:
    tail = losses[-20:]
    return {
        "arch": arch,
        "seed": seed,
        "steps": steps,
        "batch_size": WARMUP_BATCH_SIZE,
        "lr": WARMUP_LR,
        "final_loss": round(sum(tail) / len(tail), 4),
        "eval_prompts": len(eval_rows),
        "eval_accuracy_greedy": round(evaluate_accuracy(model, tokenizer, eval_rows, temperature=0.0), 4),
        "eval_accuracy_sampled": round(evaluate_accuracy(model, tokenizer, eval_rows, temperature=1.0, seed=seed), 4),
        "eval_accuracy_sampled_by_task": accuracy_by_task(model, tokenizer, eval_rows, temperature=1.0, seed=seed),
    }


def encode_sft_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of chat prompt + response + eos; labels are IGNORE_INDEX on the prompt."""
    prompt_ids = encode_chat_prompt(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def warm_up(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    *,
    steps: int = WARMUP_STEPS,
    batch_size: int = WARMUP_BATCH_SIZE,
    lr: float = WARMUP_LR,
    seed: int = 0,
) -> list[float]:
    """Train `model` in place on prompt/response rows; returns the loss of every step.

    AdamW with linear warm-up over the first 10% of steps then cosine decay to 10% of `lr`;
    mini-batches are drawn by epoch-wise random permutations from a seeded generator.
    """
    examples = [encode_sft_example(tokenizer, row["prompt"], row["response"]) for row in rows]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        input_ids, attention_mask = pad_sequences(
            [examples[i][0] for i in batch], pad_id=tokenizer.pad_token_id, left=False
        )
        labels, _ = pad_sequences([examples[i][1] for i in batch], pad_id=IGNORE_INDEX, left=False)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    seed: int = 0,
    batch_size: int = 128,
) -> list[str]:
    """Decoded responses to chat-rendered `prompts` with HF generate (greedy when temperature is 0)."""
    rows = [encode_chat_prompt(tokenizer, p) for p in prompts]
    return generate_from_ids(
        model, tokenizer, rows, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size
    )


@torch.no_grad()
def generate_from_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[list[int]],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    seed: int = 0,
    batch_size: int = 128,
) -> list[str]:
    """`generate_responses` for prompts already tokenized (e.g. a judge's rubric, no chat template)."""
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    responses = []
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            input_ids, attention_mask = pad_sequences(
                list(rows[start : start + batch_size]), pad_id=tokenizer.pad_token_id, left=True
            )
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            responses += tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return responses


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    *,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 8,
    samples_per_prompt: int = 1,
) -> float:
    """Fraction of responses to {"prompt", "answer"} rows that pass `check_answer` (samples_per_prompt each)."""
    if not rows:
        return 0.0
    rows = [row for row in rows for _ in range(samples_per_prompt)]
    responses = generate_responses(
        model, tokenizer, [r["prompt"] for r in rows], temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
    )
    return sum(check_answer(text, row["answer"]) for text, row in zip(responses, rows)) / len(rows)


def accuracy_by_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    *,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """`evaluate_accuracy` per value of each row's "task" field."""
    tasks = sorted({row["task"] for row in rows})
    return {
        task: round(
            evaluate_accuracy(
                model, tokenizer, [r for r in rows if r["task"] == task], temperature=temperature, seed=seed
            ),
            4,
        )
        for task in tasks
    }


# ---------------------------------------------------------------------------------------------
# The tiny world's checkpoints (its data and tokenizer: rlhf.data.tiny_world)


def tiny_world_models(seed: int = 0, *, archs: Sequence[str] = TINY_ARCHS, judge: bool = False) -> TinyWorldPaths:
    """The cached tiny world for `seed` with the checkpoints of `archs` (and the judge), built on first use.

    Each arch's warm-up takes about half a minute (one CPU thread); judge=True also builds the tiny
    judge (about 40 s more; see `materialize_tiny_models`).
    """
    return materialize_tiny_models(
        cache_root() / "tiny_world" / tiny_world_hash(seed), seed=seed, archs=archs, judge=judge
    )


def materialize_tiny_models(
    out_dir: str | Path, *, seed: int = 0, archs: Sequence[str] = TINY_ARCHS, judge: bool = False
) -> TinyWorldPaths:
    """rlhf.data.tiny_world.materialize_tiny_world (data, tokenizer), then models/<arch>/ for each of `archs`;
    parts already there are kept (idempotent).

    judge: also models/qwen2/judge (rlhf.models.tiny_judge: from policy-init, trained on the carry
    world), which the rlaif recipe's reward.judge.model_path=tiny-judge loads.
    """
    unknown = [a for a in archs if a not in TINY_ARCHS]
    if unknown:
        raise DataError(f"unknown tiny-world arch {unknown[0]!r}; known: {', '.join(TINY_ARCHS)}")
    if judge and JUDGE_ARCH not in archs:
        archs = (*archs, JUDGE_ARCH)
    paths = materialize_tiny_world(out_dir, seed=seed)
    with locked(paths.root / ".lock"):
        for arch in archs:
            build_once(paths.root / "models" / arch, lambda tmp, arch=arch: _write_checkpoints(tmp, paths, arch))
        if judge:
            build_once(paths.checkpoint(JUDGE_ARCH, "judge"), lambda tmp: _write_judge(tmp, paths))
    return paths


def _write_checkpoints(tmp: Path, paths: TinyWorldPaths, arch: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer_dir)
    build_tiny_checkpoints(
        tmp,
        tokenizer,
        arch=arch,
        seed=paths.seed,
        sft_rows=read_jsonl(paths.data("sft", "train")),
        eval_rows=read_jsonl(paths.data("rl", "eval")),
    )


def _write_judge(tmp: Path, paths: TinyWorldPaths) -> None:
    from transformers import AutoTokenizer

    from rlhf.models.tiny_judge import build_tiny_judge

    build_tiny_judge(
        tmp,
        paths.checkpoint(JUDGE_ARCH, "policy-init"),
        AutoTokenizer.from_pretrained(paths.tokenizer_dir),
        grid_split(CARRY_TASK, seed=paths.seed),
        seed=paths.seed,
    )
