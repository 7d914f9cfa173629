"""Pipeline files: parsing, references to earlier steps, composition and validation before any run."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.errors import ConfigError
from rlhf.pipeline import PIPELINE_DIR, compose_step, load_pipeline, step_overrides


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_references_become_earlier_final_models(tmp_path):
    path = write(
        tmp_path,
        f"""
output_dir: {tmp_path}/out
common: [run.total_steps=3]
steps:
  - name: first
    overrides: [stage=grpo]
  - name: second
    overrides: [stage=ppo, "model.path={{first}}"]
""",
    )
    pipeline = load_pipeline(str(path), ["run.seed=7"])
    first, second = pipeline.steps
    assert step_overrides(pipeline, second) == [
        "run.total_steps=3",
        "run.seed=7",
        "stage=ppo",
        f"model.path={(tmp_path / 'out' / 'first' / 'final').resolve()}",
        f"run.output_dir={(tmp_path / 'out' / 'second').resolve()}",
    ]
    cfg = compose_step(pipeline, second)
    assert cfg.stage == "ppo" and cfg.run.total_steps == 3 and cfg.run.seed == 7
    assert cfg.algorithm.advantage == "gae"  # conf/stage/ppo.yaml applied
    assert cfg.model.path.endswith("first/final")


@pytest.mark.parametrize(
    "body,message",
    [
        ("steps: []", "non-empty `steps:`"),
        ("steps:\n  - name: a\n    overrides: [stage=grpo]\n  - name: a\n    overrides: [stage=grpo]", "used twice"),
        ("steps:\n  - name: a\n    overrides: [stage=grpo, 'model.path={b}']", "{b} refers to no earlier step"),
        ("steps:\n  - name: a\n    overrides: [run.seed=1]", "sets no stage"),
        ("steps:\n  - name: a-b\n    overrides: [stage=grpo]", "must be an identifier"),
        ("stepz: []", "non-empty `steps:`"),
    ],
)
def test_malformed_pipeline_files_name_the_problem(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}").replace("`", ".")):
        load_pipeline(str(write(tmp_path, body)))


def test_bad_override_in_a_late_step_fails_at_composition(tmp_path):
    path = write(
        tmp_path,
        "steps:\n  - name: a\n    overrides: [stage=grpo]\n  - name: b\n    overrides: [stage=grpo, policy.micro_batch_size=3]",
    )
    pipeline = load_pipeline(str(path))
    compose_step(pipeline, pipeline.steps[0])
    with pytest.raises(ConfigError, match=r"step 'b'.*not divisible"):
        compose_step(pipeline, pipeline.steps[1])


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped recipes"):
        load_pipeline("no_such_recipe")


def test_every_shipped_recipe_composes_and_validates():
    recipes = sorted(PIPELINE_DIR.glob("*.yaml"))
    for recipe in recipes:
        pipeline = load_pipeline(str(recipe))
        for step in pipeline.steps:
            compose_step(pipeline, step)


def test_a_late_step_may_read_what_an_earlier_step_writes_but_a_missing_path_fails_up_front(tmp_path):
    """validate() checks local paths; inside an earlier step's directory they are still to be written."""
    path = write(
        tmp_path,
        f"""
output_dir: {tmp_path}/out
steps:
  - name: gen
    overrides: [stage=generate]
  - name: sft
    overrides: [stage=sft, "model.path={{gen}}", data.train={tmp_path}/out/gen/generated/sft]
  - name: dpo
    overrides: [stage=dpo, "model.path={{sft}}", data.train={tmp_path}/no_such/pairs.jsonl]
""",
    )
    pipeline = load_pipeline(str(path))
    gen, sft, dpo = pipeline.steps
    assert compose_step(pipeline, sft).data.train.endswith("gen/generated/sft")
    with pytest.raises(ConfigError, match=r"step 'dpo': data.train='.*no_such/pairs.jsonl': no dataset file"):
        compose_step(pipeline, dpo)


def test_step_prefixed_override_applies_to_that_step_only(tmp_path):
    path = write(
        tmp_path,
        """
steps:
  - name: sft
    overrides: [stage=sft, offline.max_steps=500]
  - name: dpo
    overrides: [stage=dpo, offline.max_steps=150, "model.path={sft}"]
""",
    )
    pipeline = load_pipeline(str(path), ["sft:offline.max_steps=7", "run.seed=3", "data.train=tiny:sft:train"])
    sft, dpo = (compose_step(pipeline, step) for step in pipeline.steps)
    assert (sft.offline.max_steps, dpo.offline.max_steps) == (7, 150)  # after the step's own value
    assert sft.run.seed == dpo.run.seed == 3 and sft.data.train == "tiny:sft:train"  # ":" in a value is not a step
    with pytest.raises(ConfigError, match=r"'rm:run.seed=1' names no step .* \(steps: sft, dpo\)"):
        load_pipeline(str(path), ["rm:run.seed=1"])
