"""Contract of every registry entry and every public loss (STYLE §2 rule 8).

For each: a 0-d finite loss, stats that are detached 0-d tensors under namespaced keys, finite
gradients that are exactly zero at masked positions, and values at masked positions (replaced by
large garbage) not changing the loss or the stats. Advantage estimators: ``[B, R]`` outputs,
finite, zero at masked positions, without gradient, unchanged by garbage at masked positions.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    DISTILLATION_LOSSES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    aggregate,
    kl_loss,
    kto_loss,
    orpo_loss,
    pairwise_reward_loss,
    sft_loss,
    simpo_loss,
    value_loss,
)

B, R, V = 4, 5, 7
MASK = torch.arange(R) < torch.tensor([5, 3, 1, 2])[:, None]


def _inputs(kinds: dict[str, str], seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    made = {}
    for name, kind in kinds.items():
        if kind == "logits":
            made[name] = torch.randn(B, R, V, generator=generator) * 2
        elif kind == "logprobs":
            made[name] = -torch.rand(B, R, generator=generator) * 3
        elif kind == "positive":
            made[name] = torch.rand(B, R, generator=generator) + 0.5
        else:
            made[name] = torch.randn(B, R, generator=generator)
    return made


def _with_garbage(inputs: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed + 1000)
    dirty = {}
    for name, tensor in inputs.items():
        mask = MASK if tensor.dim() == 2 else MASK[..., None]
        garbage = torch.randn(tensor.shape, generator=generator) * 50
        dirty[name] = torch.where(mask, tensor, garbage)
    return dirty


def _assert_stats(stats: dict[str, Tensor]) -> None:
    assert stats, "a loss returns at least one stat"
    for key, value in stats.items():
        assert "/" in key, f"stat {key!r} is not namespaced"
        assert isinstance(value, Tensor) and value.dim() == 0, f"stat {key!r} is not a 0-d tensor"
        assert not value.requires_grad and value.grad_fn is None, f"stat {key!r} is not detached"


# name -> (input kinds, the first of which carries the gradient, call)
TokenCall = Callable[[dict[str, Tensor], Tensor], tuple[Tensor, dict[str, Tensor]]]
TOKEN_CASES: dict[str, tuple[dict[str, str], TokenCall]] = {}

for _name in POLICY_LOSSES.names():
    for _agg in LOSS_AGGREGATIONS.names():
        TOKEN_CASES[f"policy-{_name}-{_agg}"] = (
            {"logprobs": "logprobs", "old_logprobs": "logprobs", "advantages": "normal", "weights": "positive"},
            lambda x, m, name=_name, agg=_agg: POLICY_LOSSES.get(name)(
                x["logprobs"],
                x["old_logprobs"],
                x["advantages"],
                m,
                clip_low=0.2,
                clip_high=0.28,
                dual_clip=3.0,
                agg=agg,
                rollout_is_weights=x["weights"],
                constant_normalizer=R,
            ),
        )
for _kind in KL_ESTIMATORS.names():
    TOKEN_CASES[f"kl_loss-{_kind}"] = (
        {"logprobs": "logprobs", "ref_logprobs": "logprobs"},
        lambda x, m, kind=_kind: kl_loss(x["logprobs"], x["ref_logprobs"], m, kind=kind),
    )
for _agg in LOSS_AGGREGATIONS.names():
    TOKEN_CASES[f"aggregate-{_agg}"] = (
        {"loss_mat": "normal"},
        lambda x, m, agg=_agg: (
            aggregate(x["loss_mat"], m, agg, constant_normalizer=R),
            {"loss/value": torch.tensor(0.0)},
        ),
    )
for _kind in DISTILLATION_LOSSES.names():
    TOKEN_CASES[f"distillation-{_kind}"] = (
        {"student_logits": "logits", "teacher_logits": "logits"},
        lambda x, m, kind=_kind: DISTILLATION_LOSSES.get(kind)(x["student_logits"], x["teacher_logits"], m, beta=0.3),
    )
TOKEN_CASES["value_loss"] = (
    {"values": "normal", "old_values": "normal", "returns": "normal"},
    lambda x, m: value_loss(x["values"], x["old_values"], x["returns"], m, clip_range=0.2),
)
TOKEN_CASES["sft_loss"] = ({"logprobs": "logprobs"}, lambda x, m: sft_loss(x["logprobs"], m))


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_per_token_loss_contract(case):
    kinds, call = TOKEN_CASES[case]
    seed = sum(map(ord, case))
    clean = _inputs(kinds, seed)
    grad_name = next(iter(kinds))
    clean[grad_name].requires_grad_(True)
    loss, stats = call(clean, MASK)

    assert isinstance(loss, Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    _assert_stats(stats)

    loss.backward()
    grad = clean[grad_name].grad
    assert grad is not None and torch.isfinite(grad).all()
    masked = ~MASK if grad.dim() == 2 else (~MASK)[..., None].expand_as(grad)
    assert (grad[masked] == 0).all(), "masked positions receive gradient"

    dirty = _with_garbage({k: v.detach() for k, v in clean.items()}, seed)
    dirty_loss, dirty_stats = call(dirty, MASK)
    torch.testing.assert_close(dirty_loss, loss.detach())
    for key, value in stats.items():
        torch.testing.assert_close(dirty_stats[key], value, msg=f"stat {key} depends on masked positions")


def test_float_and_bool_masks_agree():
    inputs = _inputs({"logprobs": "logprobs", "old_logprobs": "logprobs", "advantages": "normal"}, 0)
    args = (inputs["logprobs"], inputs["old_logprobs"], inputs["advantages"])
    for name in POLICY_LOSSES.names():
        bool_loss, _ = POLICY_LOSSES.get(name)(*args, MASK)
        float_loss, _ = POLICY_LOSSES.get(name)(*args, MASK.float())
        torch.testing.assert_close(bool_loss, float_loss)


SEQUENCE_CASES: dict[str, tuple[int, Callable[..., tuple[Tensor, dict[str, Tensor]]]]] = {
    **{
        f"preference-{name}": (4, lambda a, b, c, d, name=name: PREFERENCE_LOSSES.get(name)(a, b, c - 1, d - 1))
        for name in PREFERENCE_LOSSES.names()
    },
    "simpo": (2, lambda a, b: simpo_loss(a, b)),
    "orpo": (3, lambda a, b, c: orpo_loss(a / 10, b / 10, c.abs())),
    "kto": (2, lambda a, b: kto_loss(a, b, torch.tensor([True, False, True, False]), (a - b).detach())),
    "pairwise_reward": (2, lambda a, b: pairwise_reward_loss(a, b, margin=0.5)),
}


@pytest.mark.parametrize("case", sorted(SEQUENCE_CASES))
def test_sequence_loss_contract(case):
    arity, call = SEQUENCE_CASES[case]
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    tensors = [(-torch.rand(B, generator=generator) * 20).requires_grad_(True) for _ in range(arity)]
    loss, stats = call(*tensors)
    assert isinstance(loss, Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    _assert_stats(stats)
    loss.backward()
    assert tensors[0].grad is not None
    assert all(t.grad is None or torch.isfinite(t.grad).all() for t in tensors)


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS.names())
def test_advantage_estimator_contract(name):
    generator = torch.Generator().manual_seed(7)
    inputs = {
        "token_rewards": torch.randn(B, R, generator=generator),
        "values": torch.randn(B, R, generator=generator),
    }
    scores = torch.randn(B, generator=generator)
    group_ids = torch.tensor([0, 0, 1, 1])

    def estimate(tensors):
        return ADVANTAGE_ESTIMATORS.get(name)(
            token_rewards=tensors["token_rewards"],
            scores=scores,
            values=tensors["values"],
            mask=MASK,
            group_ids=group_ids,
            gamma=0.99,
            lam=0.95,
            norm_by_std=True,
            eps=1e-6,
        )

    advantages, returns = estimate(inputs)
    for out in (advantages, returns):
        assert out.shape == (B, R) and torch.isfinite(out).all()
        assert (out[~MASK] == 0).all() and not out.requires_grad
    dirty_advantages, dirty_returns = estimate(_with_garbage(inputs, 7))
    torch.testing.assert_close(dirty_advantages, advantages)
    torch.testing.assert_close(dirty_returns, returns)
