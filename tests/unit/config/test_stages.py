"""The stage registry (rlhf.config.stages): every stage is one module of rlhf.stages plus its conf/stage yaml,
the docs list exactly the registered stages, and the CLI runs whatever is registered (no Ray here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf.config import RLHFConfig, Stage, all_stages, get_stage, names_where, register_stage, stage_names, validate
from rlhf.config import stages as registry
from rlhf.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def test_every_stage_has_its_yaml_and_every_yaml_a_stage():
    yamls = {p.stem for p in (REPO / "conf" / "stage").glob("*.yaml")}
    assert set(stage_names()) == yamls
    for name in stage_names():
        assert f"stage: {name}" in (REPO / "conf" / "stage" / f"{name}.yaml").read_text()


def test_the_docs_menu_lists_exactly_the_registered_stages():
    text = (REPO / "docs" / "stages.md").read_text()
    menu = text.split("## The menu", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in menu.splitlines() if line.startswith("| `")]
    documented = [name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])]
    assert sorted(documented) == sorted(stage_names())


def test_each_stage_module_registers_its_stages():
    modules = {p.stem for p in (REPO / "rlhf" / "stages").glob("*.py")} - {"__init__", "common"}
    assert {stage.run.__module__.rpartition(".")[2] for stage in all_stages()} == modules
    assert names_where(lambda stage: stage.family == "rl")[:2] == ["grpo", "dr_grpo"]


@pytest.mark.parametrize("name", stage_names())
def test_every_stage_checks_model_paths_first(name, tmp_path):
    """A stage's validate starts with the shared input checks (rlhf.stages.common.check_inputs)."""
    cfg = RLHFConfig(stage=name)
    cfg.model.path = str(tmp_path / "no_such_model")
    with pytest.raises(ConfigError, match="model.path"):
        validate(cfg)


def test_an_unknown_stage_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"stage='grpoo' is not one of grpo, dr_grpo, .*report"):
        get_stage("grpoo")
    with pytest.raises(ConfigError, match="stage='grpoo' is not one of"):
        validate(RLHFConfig(stage="grpoo"))


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="'sft' is already registered"):
        register_stage(Stage(names=("sft",), summary="", family="offline", validate=print, run=dict))
    with pytest.raises(ValueError, match="family"):
        Stage(names=("x",), summary="", family="misc", validate=print, run=dict)


def test_the_cli_runs_a_newly_registered_stage(monkeypatch, tmp_path):
    """What `rlhf stage=<new>` does once a module registers the stage: validate, run, then the plots of a
    training stage; nothing in rlhf.cli names it."""
    from rlhf.cli import train

    calls = []
    stage = Stage(
        names=("noop",),
        summary="records its calls",
        family="utility",
        validate=lambda cfg, produced: calls.append(("validate", cfg.stage)),
        run=lambda cfg: calls.append(("run", cfg.stage)) or {"noop/ran": 1.0},
        trains=False,
    )
    monkeypatch.setattr(registry, "_STAGES", {**registry._STAGES})
    register_stage(stage)
    cfg = RLHFConfig(stage="noop")
    cfg.run.output_dir = str(tmp_path)
    validate(cfg)
    assert train(cfg) == {"noop/ran": 1.0}
    assert calls == [("validate", "noop"), ("run", "noop")]


def test_the_docs_example_is_the_real_report_stage():
    """docs/stages.md "Adding a stage" shows rlhf/stages/report.py and conf/stage/report.yaml as they are."""
    section = (REPO / "docs" / "stages.md").read_text().split("## Adding a stage", 1)[1].split("\n## ", 1)[0]
    python, yaml = re.findall(r"```(?:python|yaml)\n(.*?)```", section, flags=re.S)
    module = (REPO / "rlhf" / "stages" / "report.py").read_text()
    assert module[module.index("from rlhf.config import") :] == python
    assert (REPO / "conf" / "stage" / "report.yaml").read_text() == yaml
