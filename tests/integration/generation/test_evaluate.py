"""stage=eval: pass@k against hand counts on a fixed set, and a model evaluation that agrees with it."""

from __future__ import annotations

import json

import pytest

from rlhf.errors import ConfigError
from rlhf.trainers.evaluate import evaluate_model, pairwise_outcome, run_eval
from rlhf.trainers.generate import run_generate

from .conftest import compose_config


def hand_samples(path) -> None:
    """Three tiny-world problems, 4 responses each: 1, 0 and 4 of them correct."""
    problems = [("add 2 3", "5", ["5", "6", "7", "4"]), ("reverse abc", "cba", ["abc"] * 4), ("copy x", "x", ["x"] * 4)]
    rows = [
        {"prompt_index": i, "sample_index": j, "prompt": q, "response": r, "answer": a, "task": f"t{i}"}
        for i, (q, a, responses) in enumerate(problems)
        for j, r in enumerate(responses)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rescored_samples_match_hand_count(tmp_path):
    samples = tmp_path / "samples.jsonl"
    hand_samples(samples)
    cfg = compose_config("eval", tmp_path, f"eval.samples={samples}", "eval.k=[1,2,4]")
    metrics = run_eval(cfg)
    # per problem (n=4, c): pass@1 = c/4; pass@2 = 1 - C(4-c,2)/C(4,2); pass@4 = [c > 0]
    #   c=1: 0.25, 1 - 3/6 = 0.5, 1;   c=0: 0, 0, 0;   c=4: 1, 1, 1
    assert metrics["eval/pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert metrics["eval/pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert metrics["eval/pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["eval/sampled_accuracy"] == pytest.approx(5 / 12)
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["prompts"] == 3 and results["per_task"]["t0"]["eval/pass@2"] == pytest.approx(0.5)
    table = (tmp_path / "eval" / "eval_results.md").read_text()
    assert "| eval/pass@2 | 0.5000 |" in table and "| t2 |" in table


def test_eval_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="pass@16"):
        run_eval(compose_config("eval", tmp_path, "eval.n_samples=4", "eval.k=[1,16]"))
    with pytest.raises(ConfigError, match="reward.judge.model_path"):
        run_eval(compose_config("eval", tmp_path, "eval.reference_model=tiny-init"))


def test_pairwise_outcome_counts_both_orders():
    assert pairwise_outcome(0, 1) == 1.0  # model preferred as A and as B
    assert pairwise_outcome(1, 0) == 0.0
    assert pairwise_outcome(0, 0) == 0.5  # position bias: the judge always picks A
    assert pairwise_outcome(None, 1) == 0.5


@pytest.mark.ray
def test_model_eval_agrees_with_rescored_generation(ray_cluster, tmp_path):
    """evaluate_model's pass@k equals re-scoring a stage=generate set drawn with the same seeds."""
    prompts = ["eval.data=tiny:eval", "eval.max_prompts=12", "eval.n_samples=4", "eval.k=[1,2,4]"]
    metrics = evaluate_model(compose_config("eval", tmp_path, *prompts), "tiny")
    for key in ("eval/accuracy", "eval/pass@1", "eval/pass@4", "eval/reward_mean", "eval/response_length"):
        assert key in metrics
    assert metrics["eval/pass@1"] == pytest.approx(metrics["eval/sampled_accuracy"])
    assert metrics["eval/reward_mean"] == pytest.approx(metrics["eval/sampled_accuracy"])  # tiny_world: 1 if correct
    assert metrics["eval/pass@1"] <= metrics["eval/pass@2"] <= metrics["eval/pass@4"]

    out = tmp_path / "gen"
    run_generate(compose_config("generate", tmp_path, "data.train=tiny:eval", "generate.max_prompts=12", "generate.shard_size=64", f"generate.output={out}"))  # fmt: skip
    rescored = run_eval(compose_config("eval", tmp_path / "rescored", f"eval.samples={out / 'samples'}", "eval.k=[1,2,4]"))  # fmt: skip
    for k in (1, 2, 4):
        assert rescored[f"eval/pass@{k}"] == pytest.approx(metrics[f"eval/pass@{k}"])
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["prompts"] == 12 and results["per_task"]


@pytest.mark.ray
@pytest.mark.slow  # smoke test of the judge plumbing (the tiny judge gives no usable verdicts)
def test_win_rate_runs_the_pairwise_judge(ray_cluster, tmp_path):
    """The path runs end to end; the tiny judge rarely writes [[A]]/[[B]], so verdicts are mostly ties (0.5)."""
    cfg = compose_config(
        "eval", tmp_path, "eval.data=tiny:eval", "eval.max_prompts=4", "eval.n_samples=2", "eval.k=[1,2]",
        "eval.reference_model=tiny-init", "reward.judge.model_path=tiny", "reward.judge.max_new_tokens=4",
    )  # fmt: skip
    metrics = evaluate_model(cfg, "tiny")
    assert 0.0 <= metrics["eval/win_rate"] <= 1.0 and 0.0 <= metrics["eval/judge_consistent_frac"] <= 1.0
    assert "eval/reward_judge_mean" in metrics and "eval/pass@2" in metrics


@pytest.mark.ray
def test_eval_with_agent_env_scores_trajectories(ray_cluster, tmp_path):
    """agent.env in stage=eval: every response is a trajectory with the environment at hand (as the RL stages train
    it); TwoTurns answers each first turn and ends the second, so by construction every trajectory has two model
    turns and the environment's rewards 0.25 + 0.5."""
    agent = ["agent.env=tests.fixtures.two_turn_env:TwoTurns", "agent.max_turns=3"]
    prompts = ["eval.data=tiny:eval", "eval.max_prompts=6", "eval.n_samples=2", "eval.k=[1,2]"]
    metrics = evaluate_model(compose_config("eval", tmp_path, *agent, *prompts), "tiny")
    assert metrics["eval/agent_turns_mean"] == 2.0 and metrics["eval/agent_tool_calls"] == 1.0
    assert metrics["eval/agent_end_done_frac"] == 1.0
    assert metrics["eval/reward_env_mean"] == pytest.approx(0.75)
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and metrics["eval/pass@1"] <= metrics["eval/pass@2"]
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["prompts"] == 6


def test_eval_agent_env_errors(tmp_path):
    with pytest.raises(ConfigError, match="eval.samples re-scores saved responses"):
        run_eval(compose_config("eval", tmp_path, "agent.env=calculator", f"eval.samples={tmp_path}"))
    with pytest.raises(ConfigError, match="agent.max_turns must be >= 1"):
        run_eval(compose_config("eval", tmp_path, "agent.env=calculator", "agent.max_turns=0"))
    with pytest.raises(ConfigError, match="stage=generate has no such rollout"):
        run_generate(compose_config("generate", tmp_path, "agent.env=calculator"))
