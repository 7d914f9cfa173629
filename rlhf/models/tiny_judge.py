"""The tiny LLM judge of the carry world (RLAIF on the tiny world), a fixture like rlhf.models.warmup.

`tiny-judge` (rlhf.models.loading) is a tiny qwen2 causal LM that reads a conversation rendered
with rlhf.data.tiny_world.JUDGE_TEMPLATE ("<|bos|><|user|>\\n47+5=<|end|><|assistant|>\\n52<|end|>")
and writes "Right. Score: 10" or "Wrong. Score: 1" (JUDGE_VERDICTS), which the LLM-judge reward
(rlhf.rewards.judge, default pattern) parses. Built from policy-init in two plain-torch phases:

  1. the warm-up recipe (rlhf.models.warmup.warm_up) on the carry world's demonstrations (its 720
     train problems, carries often forgotten: `slipped_sft_rows`) for JUDGE_BASE_STEPS steps, i.e.
     the SFT model of the recipes, as InstructGPT starts its reward model from the SFT model;
  2. JUDGE_STEPS steps on verdicts for each train problem's correct answer and its carry mistake
     (`carry_mistake`), a pair per problem in the same batch: the verdicts' token cross-entropy
     plus a Bradley-Terry term on the first verdict token's log-odds ("Right" vs "Wrong") of the
     right over the wrong answer.

Why the pairwise term: with cross-entropy alone the first verdict token stayed at the class prior
(held-out verdict accuracy 0.50 after 1000 steps), while the same pairs in the Bradley-Terry loss
of a reward model are learned in ~100 steps; the term gives the verdict the reward model's signal
(held-out verdict accuracy ~0.96 after 300 steps, seed 0). The verdict must follow the answer's
<|end|> directly: rendered inside a user turn, or after another "<|assistant|>", it was not learned;
nor from a base trained on the correct answers (0.53: measured once, seed 0; not understood).
judge.json next to the checkpoint holds its parse rate and accuracy on the 180 held-out problems.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from rlhf.data.batch import pad_sequences
from rlhf.data.tiny_world import JUDGE_TEMPLATE, JUDGE_VERDICTS, Problem, carry_mistake, slipped_sft_rows
from rlhf.models.tiny import save_tiny_model
from rlhf.models.warmup import IGNORE_INDEX, generate_from_ids, one_thread, warm_up

logger = logging.getLogger(__name__)

JUDGE_BASE_STEPS = 500
JUDGE_STEPS = 300
JUDGE_PAIRS_PER_STEP = 16
JUDGE_LR = 3e-4
JUDGE_PAIRWISE_WEIGHT = 1.0
JUDGE_MAX_NEW_TOKENS = 24


def conversation_ids(tokenizer: PreTrainedTokenizerBase, problem: Problem, response: str) -> list[int]:
    """JUDGE_TEMPLATE rendered and tokenized as the judge engine does it (use_chat_template=false)."""
    return list(
        tokenizer(JUDGE_TEMPLATE.format(prompt=problem.prompt, response=response), add_special_tokens=True)["input_ids"]
    )


def verdict_ids(tokenizer: PreTrainedTokenizerBase, right: bool) -> list[int]:
    return tokenizer(JUDGE_VERDICTS[right], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def train_judge(model: Any, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], *, steps: int, seed: int):
    """Phase 2 of the module docstring, in place; returns the loss of every step."""
    pairs = [
        (conversation_ids(tokenizer, p, p.answer), conversation_ids(tokenizer, p, carry_mistake(p))) for p in problems
    ]
    verdicts = {right: verdict_ids(tokenizer, right) for right in (True, False)}
    right_id, wrong_id = verdicts[True][0], verdicts[False][0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=JUDGE_LR, weight_decay=0.0)
    rng, order, losses = random.Random(f"{seed}:judge"), [], []
    model.train()
    for _ in range(steps):
        if len(order) < JUDGE_PAIRS_PER_STEP:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:JUDGE_PAIRS_PER_STEP], order[JUDGE_PAIRS_PER_STEP:]
        rows = [(pairs[i][k], verdicts[k == 0]) for i in chosen for k in (0, 1)]  # right, wrong, right, ...
        input_ids, attention_mask = pad_sequences([c + v for c, v in rows], pad_id=tokenizer.pad_token_id, left=False)
        labels, _ = pad_sequences([[IGNORE_INDEX] * len(c) + v for c, v in rows], pad_id=IGNORE_INDEX, left=False)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        cross_entropy = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        decision = torch.tensor([len(c) - 1 for c, _ in rows])  # its logits predict the first verdict token
        first_logits = logits[torch.arange(len(rows)), decision]
        log_odds = (first_logits[:, right_id] - first_logits[:, wrong_id]).view(-1, 2)
        pairwise = -F.logsigmoid(log_odds[:, 0] - log_odds[:, 1]).mean()
        loss = cross_entropy + JUDGE_PAIRWISE_WEIGHT * pairwise
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny_judge(
    out_dir: Path, init_dir: Path, tokenizer: PreTrainedTokenizerBase, grid: dict[str, list[Problem]], *, seed: int = 0
) -> dict[str, Any]:
    """Train the judge from `init_dir` on grid["train"], measure it on grid["eval"]; save it and judge.json."""
    from rlhf.config import JudgeConfig

    model = AutoModelForCausalLM.from_pretrained(init_dir)
    with one_thread():
        start = time.perf_counter()
        warm_up(model, tokenizer, slipped_sft_rows(grid["train"], seed=seed), steps=JUDGE_BASE_STEPS, seed=seed)
        losses = train_judge(model, tokenizer, grid["train"], steps=JUDGE_STEPS, seed=seed)
        seconds = time.perf_counter() - start
        graded = [(p, p.answer, True) for p in grid["eval"]] + [(p, carry_mistake(p), False) for p in grid["eval"]]
        conversations = [conversation_ids(tokenizer, p, r) for p, r, _ in graded]
        verdicts = generate_from_ids(
            model, tokenizer, conversations, temperature=0.0, max_new_tokens=JUDGE_MAX_NEW_TOKENS
        )
    pattern = re.compile(JudgeConfig.pattern)
    scores = [pattern.findall(v) for v in verdicts]
    report = {
        "seed": seed,
        "base_steps": JUDGE_BASE_STEPS,
        "judge_steps": JUDGE_STEPS,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "train_seconds": round(seconds, 1),
        "eval_verdicts": len(verdicts),
        "eval_parse_rate": round(sum(bool(s) for s in scores) / len(scores), 4),
        "eval_accuracy": round(
            sum(bool(s) and (float(s[-1]) > 5) == ok for s, (_, _, ok) in zip(scores, graded)) / len(graded), 4
        ),
    }
    save_tiny_model(model, tokenizer, out_dir)
    (out_dir / "judge.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("tiny judge: %s", report)
    return report
