"""The tiny world: a small synthetic task family with checkable answers, for tests and the demo.

Every stage of the framework (PT, SFT, RM, DPO, KTO, PPO/GRPO, evaluation) needs data, a
tokenizer and a model that runs in seconds on a laptop, with a reward a rule can compute. The
tiny world provides all of them offline, deterministically from a seed:

  task       prompt            answer   difficulty
  copy       "copy abd="       "abd"    easy     3 to 6 letters from "abcde"
  reverse    "reverse abd="    "dba"    medium   3 to 6 letters from "abcde"
  add_1d     "3+4="            "7"      medium   a, b in 0..9
  sub_1d     "9-5="            "4"      medium   0 <= b <= a <= 9
  add_2d     "47+5="           "52"     hard     a in 10..99, b in 0..9
  sub_2d     "47-5="           "42"     hard     a in 10..99, b in 0..9

Each task's problems are drawn with the seed and split into a held-out eval set (at most 32 per
task) and a train set (at most 800 per task), so eval prompts never appear in any train file.
The warmed-up tiny models (rlhf.models.warmup) copy and reverse well, longer words less often,
and get held-out arithmetic mostly wrong: about a third of eval prompts right when sampling at
temperature 1, which leaves GRPO room to raise accuracy.

The carry world (the data of the recipes in conf/pipeline/): the grid split of
two-digit addition (`grid_split`, 720 train and 180 held-out problems "a+b=", a in 10..99, b in
0..9), with the demonstrations of a careless demonstrator who forgets the carry in 60% of the
problems that need one (`carry_sft`, see `slipped_sft_rows`), so the SFT model forgets it too, and
preference pairs that differ exactly in the carry (`preference`, see `carry_preference_rows`): the
correct answer against the forgotten carry ("47+5=": 52 over 42) or a carry where none belongs
("47+2=": 49 over 59). The pairs bring what the demonstrations lack, and checking a carry is a
rule a 2-layer model learns from the pairs (a reward model reaches ~0.97 held-out accuracy), so
DPO, a reward model and PPO can fix what more SFT on the same demonstrations cannot. `carry`
holds the RL prompts with reference answers of the same split (prompt source "tiny:carry:<split>"),
`carry_cot` the same demonstrations as worked solutions (ReFT's warm-up, `slipped_chain_of_thought`).

`preference_hard` pairs the correct answer of every task with a wrong one a rule makes (off by a
little, or one letter changed): a 2-layer reward model does not learn to judge those (held-out
accuracy ~0.55: a held-out sum is a fact it never saw).

`materialize_tiny_world` writes the data and tokenizer to a directory; `tiny_world_dir` does so once under
the cache (`${RLHF_CACHE:-~/.cache/rlhf}/tiny_world/<version-hash>`) and reuses it. The checkpoints are
the models layer's (rlhf.models.warmup.tiny_world_models / materialize_tiny_models), in the same
directory under the same lock. Layout:

  data/{pretrain,sft,preference_hard,kto,rl,carry_sft,carry_cot,preference,carry}_{train,eval}.jsonl,
  data/manifest.json
  tokenizer/                        Hugging Face tokenizer dir (rlhf.data.tokenizer)
  models/<arch>/policy-init/        random-init tiny model + tokenizer (arch: qwen2, llama)
  models/<arch>/policy-sft/         the same after a short supervised warm-up (+ warmup.json)
  models/qwen2/judge/               the tiny LLM judge of the carry world (rlhf.models.tiny_judge;
                                    built on request by rlhf.models.warmup.tiny_world_models(judge=True); + judge.json)

Each part is written to a temporary directory and renamed into place when complete, under a
file lock, so concurrent processes build it once and a crash never leaves half a part behind.
Bump TINY_WORLD_VERSION whenever the output of any generator here, the tokenizer or the warm-up
changes, so stale caches are not reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from itertools import product
from pathlib import Path
from typing import Any

from rlhf.errors import DataError

logger = logging.getLogger(__name__)

TINY_WORLD_VERSION = 2
DATA_KINDS = ("pretrain", "sft", "preference_hard", "kto", "rl", "carry_sft", "carry_cot", "preference", "carry")
SPLITS = ("train", "eval")
TINY_ARCHS = ("qwen2", "llama")  # rlhf.models.tiny.TINY_ARCHITECTURES, without importing torch here
CHECKPOINT_NAMES = ("policy-init", "policy-sft", "judge")  # judge: JUDGE_ARCH only
JUDGE_ARCH = "qwen2"
CARRY_TASK = "add_2d"
"""The task of the carry world's grid split."""
JUDGE_TEMPLATE = "<|bos|><|user|>\n{prompt}<|end|><|assistant|>\n{response}<|end|>"
"""The tiny judge's rubric (reward.judge.template, with use_chat_template=false, in the rlaif recipe):
the conversation exactly as the policy's chat template renders it; the verdict follows its last token."""
JUDGE_VERDICTS = {True: "Right. Score: 10", False: "Wrong. Score: 1"}
"""The tiny judge's verdicts on a right and a wrong answer (JudgeConfig.pattern reads the score)."""

EVAL_PER_TASK = 32  # at most this many held-out problems per task (and at most a fifth of it)
TRAIN_PER_TASK = 800  # at most this many train problems per task, so no task dominates
PRETRAIN_LINES_PER_DOC = 8
LETTERS = "abcde"
WORD_LENGTHS = (3, 4, 5, 6)
WORDS_PER_LENGTH = 250


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt text and the reference answer (both plain strings)."""

    task: str
    difficulty: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class TinyTask:
    name: str
    difficulty: str
    pairs: Callable[[random.Random], list[tuple[str, str]]]  # (prompt, answer) of the task, from a seeded rng


def _arith(symbol: str, pairs: Iterator[tuple[int, int]]) -> list[tuple[str, str]]:
    op = (lambda a, b: a + b) if symbol == "+" else (lambda a, b: a - b)
    return [(f"{a}{symbol}{b}=", str(op(a, b))) for a, b in pairs]


def _words(rng: random.Random) -> list[str]:
    """WORDS_PER_LENGTH words of each length in WORD_LENGTHS, so every length is equally common."""
    words = []
    for n in WORD_LENGTHS:
        all_words = ["".join(p) for p in product(LETTERS, repeat=n)]
        words += rng.sample(all_words, min(WORDS_PER_LENGTH, len(all_words)))
    return words


TASKS: tuple[TinyTask, ...] = (
    TinyTask("copy", "easy", lambda rng: [(f"copy {w}=", w) for w in _words(rng)]),
    TinyTask("reverse", "medium", lambda rng: [(f"reverse {w}=", w[::-1]) for w in _words(rng)]),
    TinyTask("add_1d", "medium", lambda rng: _arith("+", product(range(10), range(10)))),
    TinyTask("sub_1d", "medium", lambda rng: _arith("-", ((a, b) for a in range(10) for b in range(a + 1)))),
    TinyTask("add_2d", "hard", lambda rng: _arith("+", product(range(10, 100), range(10)))),
    TinyTask("sub_2d", "hard", lambda rng: _arith("-", product(range(10, 100), range(10)))),
)


def _rng(seed: int, *parts: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes
    # (unlike hash(), which PYTHONHASHSEED randomises).
    return random.Random(":".join([str(seed), *parts]))


def split_problems(seed: int = 0) -> dict[str, list[Problem]]:
    """All problems of every task, split into {"train": [...], "eval": [...]}, disjoint by prompt."""
    splits: dict[str, list[Problem]] = {"train": [], "eval": []}
    for task in TASKS:
        rng = _rng(seed, "split", task.name)
        pairs = task.pairs(rng)
        rng.shuffle(pairs)
        n_eval = min(EVAL_PER_TASK, len(pairs) // 5)
        problems = [Problem(task.name, task.difficulty, p, a) for p, a in pairs]
        splits["eval"] += problems[:n_eval]
        splits["train"] += problems[n_eval : n_eval + TRAIN_PER_TASK]
    for name, problems in splits.items():
        _rng(seed, "order", name).shuffle(problems)
    return splits


# ---------------------------------------------------------------------------------------------
# Answer checking


_SPECIAL_TOKEN = re.compile(r"<\|[^|<>]*\|>")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_MARKER = re.compile(r"####|answer\s*(?:is|:)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]+")


def is_numeric_answer(answer: str) -> bool:
    return _NUMBER.fullmatch(answer.strip()) is not None


def extract_answer(response_text: str, *, numeric: bool) -> str | None:
    """The final answer in a response: a number if `numeric`, else a word of letters.

    Looks, in order, inside the last `\\boxed{...}`, after the last "####" / "answer is" /
    "answer:" marker (first candidate after it), and otherwise takes the last candidate in the
    text, so "3+4=7", "7", " 7.", "The answer is 7" and "\\boxed{7}" all give "7".
    Chat special tokens such as "<|end|>" are ignored. None when nothing answer-shaped is found.
    """
    pattern = _NUMBER if numeric else _WORD
    text = _SPECIAL_TOKEN.sub(" ", response_text)
    boxed = _BOXED.findall(text)
    if boxed:
        found = pattern.findall(boxed[-1])
        return found[-1] if found else None
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        found = pattern.findall(text[markers[-1].end() :])
        if found:
            return found[0]
    found = pattern.findall(text)
    return found[-1] if found else None


def check_answer(response_text: str, answer: str) -> bool:
    """True when the response's final answer equals the reference `answer`.

    Numeric answers compare as numbers ("7.0" == "7"); other answers compare as words,
    case-insensitively. See `extract_answer` for what counts as the final answer.
    """
    numeric = is_numeric_answer(answer)
    found = extract_answer(response_text, numeric=numeric)
    if found is None:
        return False
    if not numeric:
        return found.lower() == answer.strip().lower()
    try:
        return Decimal(found) == Decimal(answer.strip())
    except InvalidOperation:
        return False


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer (off by a little, or one letter changed) for preference/KTO data."""
    if is_numeric_answer(problem.answer):
        value = int(problem.answer)
        candidates = [value + d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0]
        return str(rng.choice(candidates))
    letters = list(problem.answer)
    i = rng.randrange(len(letters))
    letters[i] = rng.choice([c for c in LETTERS if c != letters[i]])
    return "".join(letters)


# ---------------------------------------------------------------------------------------------
# Row generators, one per data format (all rows are JSON-serialisable dicts)


def pretrain_rows(problems: Sequence[Problem], *, seed: int = 0) -> list[dict[str, Any]]:
    """Plain-text documents of a few solved problems each: {"text": "3+4=7\\n12-5=7\\n..."}."""
    lines = [p.prompt + p.answer for p in problems]
    _rng(seed, "pretrain").shuffle(lines)
    n = PRETRAIN_LINES_PER_DOC
    return [{"text": "\n".join(lines[i : i + n]) + "\n"} for i in range(0, len(lines), n)]


def sft_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Prompt/response pairs, with the same pair as chat `messages` for chat-format SFT."""
    return [
        {
            "prompt": p.prompt,
            "response": p.answer,
            "messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}],
            "task": p.task,
        }
        for p in problems
    ]


def hard_preference_rows(problems: Sequence[Problem], *, seed: int = 0) -> list[dict[str, Any]]:
    """The `preference_hard` pairs: `chosen` is the correct answer, `rejected` a plausible wrong one (`wrong_answer`)."""
    rng = _rng(seed, "preference")
    return [
        {"prompt": p.prompt, "chosen": p.answer, "rejected": wrong_answer(p, rng), "task": p.task} for p in problems
    ]


def kto_rows(problems: Sequence[Problem], *, seed: int = 0) -> list[dict[str, Any]]:
    """KTO examples: a completion and whether it is desirable (correct); about half are."""
    rng = _rng(seed, "kto")
    rows = []
    for p in problems:
        label = rng.random() < 0.5
        completion = p.answer if label else wrong_answer(p, rng)
        rows.append({"prompt": p.prompt, "completion": completion, "label": label, "task": p.task})
    return rows


def chain_of_thought(problem: Problem) -> str:
    """A worked solution ending in "#### <answer>" (the marker `extract_answer` reads), as in GSM8K.

    Two-digit arithmetic goes through the units and then the tens ("47+8=" → "7+8=15 40+15=55
    #### 55"); one-digit arithmetic states the sum; copy/reverse spell the letters in order.
    """
    answer = problem.answer
    if problem.task in ("add_2d", "sub_2d"):
        left, right = problem.prompt.rstrip("=").split("+" if problem.task == "add_2d" else "-")
        a, b = int(left), int(right)
        tens, units = a - a % 10, a % 10
        symbol = "+" if problem.task == "add_2d" else "-"
        partial = units + b if symbol == "+" else units - b
        carry = f"{tens}+{partial}" if partial >= 0 else f"{tens}-{-partial}"
        return f"{units}{symbol}{b}={partial} {carry}={answer} #### {answer}"
    if problem.task in ("add_1d", "sub_1d"):
        return f"{problem.prompt}{answer} #### {answer}"
    return f"{' '.join(answer)} #### {answer}"


def cot_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Chain-of-thought SFT rows (the ReFT warm-up data): prompt, worked response, reference answer."""
    return [{"prompt": p.prompt, "response": chain_of_thought(p), "answer": p.answer, "task": p.task} for p in problems]


def cot_file(split: str = "train", *, seed: int = 0) -> Path:
    """The chain-of-thought rows of `split` as jsonl, written on first use next to the tiny world's data.

    Kept outside DATA_KINDS so adding it did not change the cached tiny world (its version).
    """
    if split not in SPLITS:
        raise DataError(f"unknown tiny-world split {split!r}; splits: {', '.join(SPLITS)}")
    path = tiny_world_dir(seed).root / "extra" / f"cot_{split}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        write_jsonl(tmp, cot_rows(split_problems(seed)[split]))
        tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Grid split: one task's whole operand grid, a random fifth held out


GRID_KINDS = ("sft", "sft_slip", "rl")
GRID_EVAL_FRACTION = 0.2
CARRY_SLIP = 0.6  # share of carry/borrow problems whose "sft_slip" demonstration forgets the carry


def grid_split(task: str = "add_2d", *, seed: int = 0) -> dict[str, list[Problem]]:
    """Every problem of one task, split at random into train (4/5) and held-out eval (1/5), disjoint by prompt.

    `split_problems` holds out at most 32 problems per task (11 of sub_1d's 55), and a held-out
    one-digit fact such as "9-5=" shares nothing with the train facts, so held-out accuracy there
    cannot show generalisation. Here the held-out set is a fifth of the task's whole operand grid
    (180 of add_2d's 900 pairs "a+b=", a in 10..99, b in 0..9), and each held-out problem is
    built from parts seen in training: "47+5=" is held out while "37+5=", "57+5=" (same units
    step) and "47+3=" (same tens digit) are trained on. A model that learns the rule on the train
    prompts therefore gains on the held-out ones. Same seed, same split; independent of
    `split_problems`, so it leaves the cached tiny world unchanged.
    """
    known = {t.name: t for t in TASKS}
    if task not in known:
        raise DataError(f"unknown tiny-world task {task!r} for a grid split; tasks: {', '.join(known)}")
    spec = known[task]
    rng = _rng(seed, "grid", task)
    pairs = spec.pairs(rng)
    rng.shuffle(pairs)
    n_eval = round(len(pairs) * GRID_EVAL_FRACTION)
    problems = [Problem(spec.name, spec.difficulty, p, a) for p, a in pairs]
    return {"train": problems[n_eval:], "eval": problems[:n_eval]}


def carry_slip(problem: Problem) -> str | None:
    """The answer with the carry (add_2d) or borrow (sub_2d) forgotten, e.g. "47+5=" -> "42"; None without one."""
    if problem.task not in ("add_2d", "sub_2d"):
        return None
    a, b = (int(x) for x in re.split(r"[+-]", problem.prompt.rstrip("=")))
    if problem.task == "add_2d" and a % 10 + b >= 10:
        return str(int(problem.answer) - 10)
    if problem.task == "sub_2d" and a % 10 < b:
        return str(int(problem.answer) + 10)
    return None


def slipped_sft_rows(
    problems: Sequence[Problem], *, seed: int = 0, chain_of_thought: bool = False
) -> list[dict[str, Any]]:
    """SFT rows of a careless demonstrator: CARRY_SLIP of the problems that need a carry get `carry_slip`.

    Its demonstrations forget the carry more often than not, so a model trained on them learns to
    forget it too when greedy, while its samples carry some of the time: a systematic error that
    more SFT on the same rows cannot fix and a verifiable reward can (benchmarks/learning.py).
    Problems without a carry keep their correct answer. chain_of_thought=True writes worked
    solutions instead (`slipped_chain_of_thought`, the carry world's ReFT warm-up data), with the
    same problems slipped.
    """
    rng = _rng(seed, "slip")
    rows = []
    for p in problems:
        slipped = carry_slip(p) is not None and rng.random() < CARRY_SLIP
        if chain_of_thought:
            rows.append(
                {
                    "prompt": p.prompt,
                    "response": slipped_chain_of_thought(p, slipped),
                    "answer": p.answer,
                    "task": p.task,
                }
            )
        else:
            rows += sft_rows([Problem(p.task, p.difficulty, p.prompt, carry_slip(p)) if slipped else p])  # type: ignore[arg-type]
    return rows


def slipped_chain_of_thought(problem: Problem, slipped: bool) -> str:
    """`chain_of_thought`, or with the carry forgotten: "47+5=" -> "7+5=12 40+2=42 #### 42" (only the units' last digit added)."""
    if not slipped:
        return chain_of_thought(problem)
    a, b = (int(x) for x in re.split(r"[+-]", problem.prompt.rstrip("=")))
    symbol = "+" if problem.task == "add_2d" else "-"
    units, tens = a % 10, a - a % 10
    partial = units + b if symbol == "+" else units - b
    wrong = carry_slip(problem)
    return f"{units}{symbol}{b}={partial} {tens}+{abs(partial) % 10}={wrong} #### {wrong}"


def grid_file(kind: str = "rl", split: str = "train", *, task: str = "add_2d", seed: int = 0) -> Path:
    """The grid split's rows of `kind` and `split` as jsonl, written on first use.

    kind: "sft" (correct answers), "sft_slip" (`slipped_sft_rows`) or "rl" (prompts + reference answers).
    Lives under the tiny world's extra/ dir (like `cot_file`), outside DATA_KINDS, so adding it did
    not change the cached tiny world; a file once written is reused, so rename it (or bump
    TINY_WORLD_VERSION) if its rows ever change. Use the path as data.train / data.eval, e.g.
    data.train=<grid_file("sft_slip", "train")> for the warm-up and data.eval=<grid_file("rl", "eval")>.
    """
    if kind not in GRID_KINDS or split not in SPLITS:
        raise DataError(
            f"unknown tiny-world grid data {kind!r}/{split!r}; kinds: {', '.join(GRID_KINDS)}; splits: train, eval"
        )
    problems = grid_split(task, seed=seed)[split]  # validates the task before touching the disk
    path = tiny_world_dir(seed).root / "extra" / f"grid_{task}_{kind}_{split}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if kind == "sft_slip":
            write_jsonl(tmp, slipped_sft_rows(problems, seed=seed))
        else:
            write_jsonl(tmp, sft_rows(problems) if kind == "sft" else rl_rows(problems))
        tmp.replace(path)
    return path


TOOL_TASK = "mul_3x2"
"""The tool world's task: a 3-digit times a 2-digit number ("347*28="), beyond what the tiny policy computes."""
TOOL_KINDS = ("sft_tool", "sft_plain", "rl")
TOOL_TRAIN, TOOL_EVAL = 1000, 200
TOOL_DEMO_SHARE = 0.5
"""Share of the "sft_tool" demonstrations that call the calculator; the others write the answer directly, so the
warmed policy calls the tool only some of the time and RL with the tool has something to raise."""


def tool_problems(seed: int = 0) -> dict[str, list[Problem]]:
    """TOOL_TRAIN train and TOOL_EVAL held-out products "a*b=" (a in 100..999, b in 10..99), disjoint by prompt."""
    rng = _rng(seed, "tool", TOOL_TASK)
    pairs = rng.sample([(a, b) for a in range(100, 1000) for b in range(10, 100)], TOOL_TRAIN + TOOL_EVAL)
    problems = [Problem(TOOL_TASK, "tool", f"{a}*{b}=", str(a * b)) for a, b in pairs]
    return {"train": problems[TOOL_EVAL:], "eval": problems[:TOOL_EVAL]}


def tool_call(problem: Problem) -> str:
    """The calculator call that solves a tool-world problem: "347*28=" -> "<calc>347*28</calc>"."""
    return f"<calc>{problem.prompt.rstrip('=')}</calc>"


def tool_sft_rows(problems: Sequence[Problem], *, seed: int = 0, tool_share: float = TOOL_DEMO_SHARE) -> list[dict]:
    """SFT rows of the tool world: a `tool_share` of the problems (drawn with `seed`) demonstrate the call and the
    value it returns ("<calc>347*28</calc>9716": in a multi-turn rollout the model writes the call, the calculator
    the value, rlhf.environments.calculator); the others the answer alone ("9716")."""
    rng = _rng(seed, "tool-demos")
    rows = []
    for p in problems:
        response = tool_call(p) + p.answer if rng.random() < tool_share else p.answer
        rows.append({"prompt": p.prompt, "response": response, "answer": p.answer, "task": p.task})
    return rows


def tool_file(kind: str = "rl", split: str = "train", *, seed: int = 0) -> Path:
    """The tool world's rows of `kind` and `split` as jsonl, written on first use (under extra/, like `grid_file`).

    kind: "sft_tool" (`tool_sft_rows`: half the demonstrations call the calculator), "sft_plain" (the answer alone,
    the warm-up of a run without tools) or "rl" (prompts + reference answers for the `tiny_world` reward).
    """
    if kind not in TOOL_KINDS or split not in SPLITS:
        raise DataError(
            f"unknown tiny-world tool data {kind!r}/{split!r}; kinds: {', '.join(TOOL_KINDS)}; splits: train, eval"
        )
    path = tiny_world_dir(seed).root / "extra" / f"tool_{TOOL_TASK}_{kind}_{split}.jsonl"
    if not path.exists():
        problems = tool_problems(seed)[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if kind == "sft_tool":
            write_jsonl(tmp, tool_sft_rows(problems, seed=seed))
        elif kind == "sft_plain":
            write_jsonl(tmp, tool_sft_rows(problems, seed=seed, tool_share=0.0))
        else:
            write_jsonl(tmp, rl_rows(problems))
        tmp.replace(path)
    return path


def carry_mistake(problem: Problem) -> str:
    """The carry world's wrong answer: the carry forgotten (`carry_slip`), or else one added where none belongs."""
    return carry_slip(problem) or str(int(problem.answer) + 10)


def carry_preference_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Pairs that differ exactly in the carry: the correct answer over `carry_mistake`, with "carry": needed or not."""
    return [
        {
            "prompt": p.prompt,
            "chosen": p.answer,
            "rejected": carry_mistake(p),
            "task": p.task,
            "carry": carry_slip(p) is not None,
        }
        for p in problems
    ]


def rl_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """RL prompts with the reference answer that the `tiny_world` reward checks against."""
    return [{"prompt": p.prompt, "answer": p.answer, "task": p.task, "difficulty": p.difficulty} for p in problems]


def generate_rows(kind: str, split: str = "train", *, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of one data `kind` (see DATA_KINDS) and `split` ("train" or "eval"), in memory."""
    if kind not in DATA_KINDS or split not in SPLITS:
        raise DataError(
            f"unknown tiny-world data {kind!r}/{split!r}; kinds: {', '.join(DATA_KINDS)}; splits: train, eval"
        )
    if kind in ("carry_sft", "carry_cot", "preference", "carry"):
        grid = grid_split(CARRY_TASK, seed=seed)[split]
        if kind in ("carry_sft", "carry_cot"):
            return slipped_sft_rows(grid, seed=seed, chain_of_thought=kind == "carry_cot")
        return carry_preference_rows(grid) if kind == "preference" else rl_rows(grid)
    problems = split_problems(seed)[split]
    if kind == "pretrain":
        return pretrain_rows(problems, seed=seed)
    if kind == "sft":
        return sft_rows(problems)
    if kind == "preference_hard":
        return hard_preference_rows(problems, seed=seed)
    if kind == "kto":
        return kto_rows(problems, seed=seed)
    return rl_rows(problems)


# ---------------------------------------------------------------------------------------------
# On-disk tiny world


@dataclass(frozen=True)
class TinyWorldPaths:
    """Where the parts of a materialized tiny world live."""

    root: Path
    seed: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def data(self, kind: str, split: str = "train") -> Path:
        """The jsonl file of one data kind and split, e.g. data("rl", "eval")."""
        if kind not in DATA_KINDS or split not in SPLITS:
            raise DataError(
                f"unknown tiny-world data {kind!r}/{split!r}; kinds: {', '.join(DATA_KINDS)}; splits: train, eval"
            )
        return self.data_dir / f"{kind}_{split}.jsonl"

    def checkpoint(self, arch: str = "qwen2", name: str = "policy-sft") -> Path:
        """A model checkpoint dir: arch in TINY_ARCHS, name in CHECKPOINT_NAMES (judge: JUDGE_ARCH only)."""
        if arch not in TINY_ARCHS or name not in CHECKPOINT_NAMES or (name == "judge" and arch != JUDGE_ARCH):
            raise DataError(
                f"unknown tiny-world checkpoint {arch!r}/{name!r}; archs: {', '.join(TINY_ARCHS)}; "
                f"names: {', '.join(CHECKPOINT_NAMES)} (judge: {JUDGE_ARCH} only)"
            )
        return self.root / "models" / arch / name


def cache_root() -> Path:
    """`$RLHF_CACHE`, or ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE") or "~/.cache/rlhf").expanduser()


def tiny_world_hash(seed: int = 0) -> str:
    """Names the cache dir: changes with the seed and with TINY_WORLD_VERSION."""
    key = json.dumps({"version": TINY_WORLD_VERSION, "seed": seed}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def tiny_world_dir(seed: int = 0) -> TinyWorldPaths:
    """The cached tiny world for `seed`, built on first use: data and tokenizer (about a second).

    Its checkpoints (models/) are built by rlhf.models.warmup.tiny_world_models, on first use too.
    """
    return materialize_tiny_world(cache_root() / "tiny_world" / tiny_world_hash(seed), seed=seed)


def materialize_tiny_world(out_dir: str | Path, *, seed: int = 0) -> TinyWorldPaths:
    """Write the tiny world's data and tokenizer under `out_dir`; parts already there are kept (idempotent).
    rlhf.models.warmup.materialize_tiny_models adds the checkpoints."""
    paths = TinyWorldPaths(Path(out_dir).expanduser(), seed)
    paths.root.mkdir(parents=True, exist_ok=True)
    with locked(paths.root / ".lock"):
        build_once(paths.data_dir, lambda tmp: _write_data(tmp, seed))
        _check_manifest(paths)
        build_once(paths.tokenizer_dir, lambda tmp: _write_tokenizer(tmp, paths))
    return paths


def tiny_data_file(kind: str, split: str = "train", *, seed: int = 0) -> Path:
    """The jsonl file of a tiny-world data kind (DATA_KINDS, "cot", or the tool world's "tool_sft" and "tool_plain"),
    built if needed."""
    if kind == "cot":
        return cot_file(split, seed=seed)
    if kind in ("tool_sft", "tool_plain"):
        return tool_file("sft_tool" if kind == "tool_sft" else "sft_plain", split, seed=seed)
    return tiny_world_dir(seed).data(kind, split)


def _write_data(tmp: Path, seed: int) -> None:
    counts = {}
    for kind in DATA_KINDS:
        for split in SPLITS:
            rows = generate_rows(kind, split, seed=seed)
            write_jsonl(tmp / f"{kind}_{split}.jsonl", rows)
            counts[f"{kind}_{split}"] = len(rows)
    manifest = {
        "version": TINY_WORLD_VERSION,
        "seed": seed,
        "tasks": {t.name: t.difficulty for t in TASKS},
        "rows": counts,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _check_manifest(paths: TinyWorldPaths) -> None:
    manifest = json.loads((paths.data_dir / "manifest.json").read_text())
    if (manifest.get("version"), manifest.get("seed")) != (TINY_WORLD_VERSION, paths.seed):
        raise DataError(
            f"{paths.root} holds a tiny world of version {manifest.get('version')} / seed {manifest.get('seed')}, "
            f"not version {TINY_WORLD_VERSION} / seed {paths.seed}; pick another directory or delete this one"
        )


def _write_tokenizer(tmp: Path, paths: TinyWorldPaths) -> None:
    from rlhf.data.tokenizer import save_tiny_tokenizer, train_tiny_tokenizer

    texts = [row["text"] for row in read_jsonl(paths.data("pretrain", "train"))]
    save_tiny_tokenizer(train_tiny_tokenizer(texts), tmp)


def build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build` into a temp dir next to `target` and rename it into place, unless target exists."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}-*"):  # from a builder that crashed (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("building tiny world part %s", target)
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
        # Another process renamed its copy first (only possible without the lock, e.g. on NFS).
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file we wrote ourselves (user files go through rlhf.data.sources)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
