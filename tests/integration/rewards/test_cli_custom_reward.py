"""A custom reward given by import path that cannot work fails before Ray starts. A run that scores with one, plus
DAPO's overlong penalty as a component, is an end-to-end case of tests/e2e/test_cli_rl.py (grpo-2-vllm-custom-reward)."""

from __future__ import annotations


def test_wrong_arity_fails_before_ray(rlhf_cli, tmp_path):
    proc = rlhf_cli(tmp_path, "reward.fn=tests.fixtures.my_reward:two_args", f"run.output_dir={tmp_path / 'bad'}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert (
        "reward.fn: reward function 'tests.fixtures.my_reward:two_args' must take (prompts, responses, metadata)"
        in text
    )
    assert not proc.used_ray
