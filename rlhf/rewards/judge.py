"""LLM-as-a-judge rewards (RLAIF): a rubric rendered per response, a verdict generated, a score parsed.

The judge runs on its own RolloutGroup (vLLM or hf backend, greedy, never weight-synced).

Pointwise: the rubric (JudgeConfig.template, placeholders {prompt}, {response}, optional
{reference} = metadata["answer"]) asks for a number; JudgeConfig.pattern's first group in the
verdict's *last* match is that number (judges often reason first, then conclude). A number in
[score_min, score_max] maps linearly to [0, 1]. A verdict without one, or with a number out of
range, is *unparseable*: it is counted (reward/judge_unparseable) and scored
`unparseable_score` (0.0 by default). We score rather than drop it: dropping a sample would
change the GRPO group sizes and the batch arithmetic, while a fixed score keeps every row and the
count makes a bad rubric visible.

Pairwise (`compare`, for online DPO): JudgeConfig.pairwise_template with {prompt},
{response_a}, {response_b} (optional {reference}); pairwise_pattern's first group is A or B.
Returns 0 (A better), 1 (B better) or None (unparseable, also counted).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import string
from typing import Any, Optional

import torch
from torch import Tensor

from rlhf.config import ClusterConfig, JudgeConfig, ModelConfig, RolloutConfig, SamplingConfig
from rlhf.errors import ConfigError
from rlhf.rewards.rule import reference_answer

logger = logging.getLogger(__name__)

POINTWISE_FIELDS = ("prompt", "response", "reference")
PAIRWISE_FIELDS = ("prompt", "response_a", "response_b", "reference")


def template_fields(template: str, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> set[str]:
    """The placeholders of a str.format template; ConfigError for unknown, positional or missing ones."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError(f"{where} is not a valid template ({e}); write literal braces as {{{{ and }}}}") from e
    unknown = sorted(n for n in names if n not in allowed)
    if unknown:
        raise ConfigError(
            f"{where} has unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
            f"allowed: {', '.join('{' + n + '}' for n in allowed)} (literal braces: {{{{ }}}})"
        )
    missing = [n for n in required if n not in names]
    if missing:
        raise ConfigError(f"{where} must contain {', '.join('{' + n + '}' for n in missing)}")
    return names


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """A verdict regex with at least one capture group (the value)."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{where} {pattern!r} is not a valid regular expression: {e}") from e
    if compiled.groups < 1:
        raise ConfigError(f"{where} {pattern!r} needs a capture group around the verdict, e.g. (\\d+)")
    return compiled


def parse_pointwise(verdict: str, pattern: re.Pattern[str], score_min: float, score_max: float) -> Optional[float]:
    """The last match's number mapped from [score_min, score_max] to [0, 1]; None when absent or out of range."""
    matches = list(pattern.finditer(verdict))
    if not matches:
        return None
    try:
        value = float(matches[-1].group(1))
    except (TypeError, ValueError):
        return None
    if not score_min <= value <= score_max:
        return None
    return (value - score_min) / (score_max - score_min)


def parse_pairwise(verdict: str, pattern: re.Pattern[str]) -> Optional[int]:
    """0 when the last match says A, 1 for B, None otherwise."""
    matches = list(pattern.finditer(verdict))
    if not matches:
        return None
    choice = (matches[-1].group(1) or "").strip().upper()
    return {"A": 0, "B": 1}.get(choice)


class LLMJudge:
    """Checked at construction (before Ray); `start` launches the engines, `score_async`/`collect` judge."""

    def __init__(
        self,
        cfg: JudgeConfig,
        *,
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        cluster_cfg: ClusterConfig,
        seed: int,
    ):
        from rlhf.models.loading import load_tokenizer, resolve_model_path

        self.cfg = cfg
        self.fields = template_fields(cfg.template, POINTWISE_FIELDS, ("response",), "reward.judge.template")
        self.pair_fields = template_fields(
            cfg.pairwise_template, PAIRWISE_FIELDS, ("response_a", "response_b"), "reward.judge.pairwise_template"
        )
        self.pattern = compile_pattern(cfg.pattern, "reward.judge.pattern")
        self.pairwise_pattern = compile_pattern(cfg.pairwise_pattern, "reward.judge.pairwise_pattern")
        self.model_path = resolve_model_path(cfg.model_path)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=model_cfg.trust_remote_code)
        self.model_cfg = dataclasses.replace(
            model_cfg, path=cfg.model_path, lora=dataclasses.replace(model_cfg.lora, rank=0)
        )
        self.rollout_cfg = dataclasses.replace(
            rollout_cfg,
            backend=cfg.backend or rollout_cfg.backend,
            num_engines=cfg.num_engines,
            n_samples_per_prompt=1,
            tensor_parallel_size=1,
        )  # enable_sleep as the policy's engines: on a shared GPU the judge sleeps between its verdicts too
        self.cluster_cfg = dataclasses.replace(cluster_cfg, rollout=cluster_cfg.reward)
        self.sampling = SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
        self.seed = seed
        self.engines = None
        self.unparseable_total = 0

    def start(self) -> None:
        from rlhf.workers.rollout import RolloutGroup

        self.engines = RolloutGroup(self.model_path, self.model_cfg, self.rollout_cfg, self.cluster_cfg, seed=self.seed)

    def render(self, template: str, fields: set[str], row: int, metadata: dict[str, Any], **values: str) -> list[int]:
        """Rubric → (chat-templated) token ids, keeping the last max_prompt_tokens."""
        if "reference" in fields:
            values["reference"] = reference_answer(metadata, row, "judge")
        text = template.format(**values)
        if self.cfg.use_chat_template and self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        else:
            ids = self.tokenizer(text, add_special_tokens=True).input_ids
        ids = list(ids)
        return ids[-self.cfg.max_prompt_tokens :]

    def score_async(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]):
        """Render and submit one verdict per response; pass the result to `collect`."""
        ids = [
            self.render(self.cfg.template, self.fields, i, meta, prompt=p, response=r)
            for i, (p, r, meta) in enumerate(zip(prompts, responses, metadata))
        ]
        engines = self._engines()
        engines.memory.before_generate()
        return engines.generate_async(ids, self.sampling, n=1, seed=None)

    def collect(self, pending) -> tuple[Tensor, int, list[str]]:
        """(normalised scores [B], number unparseable, verdict texts)."""
        engines = self._engines()
        verdicts = [gens[0].text for gens in engines.wait(pending)]
        engines.memory.after_generate()
        parsed = [parse_pointwise(v, self.pattern, self.cfg.score_min, self.cfg.score_max) for v in verdicts]
        unparseable = sum(p is None for p in parsed)
        self.unparseable_total += unparseable
        if unparseable:
            logger.debug("judge: %d of %d verdicts unparseable, e.g. %r", unparseable, len(parsed), verdicts[0][:200])
        scores = [self.cfg.unparseable_score if p is None else p for p in parsed]
        return torch.tensor(scores, dtype=torch.float), unparseable, verdicts

    def compare(
        self, prompts: list[str], responses_a: list[str], responses_b: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[list[Optional[int]], list[str]]:
        """Pairwise preferences: per row 0 (A better), 1 (B better) or None (unparseable); and the verdicts."""
        ids = [
            self.render(self.cfg.pairwise_template, self.pair_fields, i, meta, prompt=p, response_a=a, response_b=b)
            for i, (p, a, b, meta) in enumerate(zip(prompts, responses_a, responses_b, metadata))
        ]
        engines = self._engines()
        engines.memory.before_generate()
        outputs = engines.generate(ids, self.sampling, n=1, seed=None)
        engines.memory.after_generate()
        verdicts = [gens[0].text for gens in outputs]
        choices = [parse_pairwise(v, self.pairwise_pattern) for v in verdicts]
        self.unparseable_total += sum(c is None for c in choices)
        return choices, verdicts

    def _engines(self):
        if self.engines is None:
            raise RuntimeError("LLMJudge.start() was not called")
        return self.engines

    def close(self) -> None:
        if self.engines is not None:
            self.engines.shutdown()
            self.engines = None
