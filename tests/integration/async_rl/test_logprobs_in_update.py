"""algorithm.old_logprobs=auto: with one optimizer step per batch the update's forward is the old policy, so its
logprobs are taken from there (no separate pass) and training is the same as with a separate pass, to float noise.
Two policy ranks, so the engine-vs-trainer stats the update reports are reduced across ranks too."""

from __future__ import annotations

import pytest

from rlhf.trainers.prepare import prepare
from rlhf.trainers.rl import RLTrainer

from .conftest import compose_config, step_metrics

pytestmark = [pytest.mark.ray]

TWO_RANKS = ["policy.num_workers=2", "policy.micro_batch_size=2", "run.total_steps=2"]


def fit(output_dir, *overrides) -> bool:
    trainer = RLTrainer(prepare(compose_config(output_dir, *TWO_RANKS, *overrides)))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer.logprobs_in_update


def test_old_logprobs_from_the_update_train_as_a_separate_pass_does(ray_cluster, tmp_path):
    assert fit(tmp_path / "auto")
    assert not fit(tmp_path / "recompute", "algorithm.old_logprobs=recompute")
    auto, recompute = step_metrics(tmp_path / "auto"), step_metrics(tmp_path / "recompute")
    assert sorted(auto) == sorted(recompute) == [1, 2]
    for step in (1, 2):
        a, r = auto[step], recompute[step]
        assert a.keys() == r.keys()
        for key in a:
            assert a[key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), (step, key)
        # the engines' logprobs of their own samples against the policy's, measured inside the update
        assert a["rollout/mismatch_kl"] < 1e-7 and a["rollout/mismatch_kl_max"] < 1e-6
        assert a["policy/approx_kl"] == 0.0 and a["policy/clip_frac"] == 0.0  # old is this very forward
