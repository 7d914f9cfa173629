"""Every shipped config file and every documented command line composes and validates (no Ray).

Checked for each is what `rlhf` / `rlhf-pipeline` do before Ray starts: rlhf.cli.check_group_overrides,
Hydra's compose with the hydra node (so sweep and launcher overrides are checked too),
rlhf.cli.to_config, rlhf.config.validate (types, ranges, batch arithmetic, model and dataset paths;
machine-independent, so GPU presets validate here), the lookup of the reward functions that the
run's preparation does (rlhf.rewards.pipeline.function_term) and, with run.plan=true, the sizing plan
(rlhf.plan.build_plan, which refuses layouts that cannot fit). Pipelines go through
rlhf.pipeline.load_pipeline and compose_step, as `rlhf-pipeline` does.

Documented commands come from the fenced code blocks of README.md and docs/*.md and from launch/
(shell lines; the module docstring of launch/*.py), so a new example is tested without editing this
file. Recognised forms, anywhere on a line (after env assignments, `docker run ... <image>`):
`rlhf ARGS`, `... -m rlhf ARGS` (python -m, python -m pdb -m), `rlhf-pipeline RECIPE ARGS`,
`launch/submit.{py,sh} ARGS` and the images' `submit ARGS` (split by launch/submit.py's own parser),
`sbatch ... launch/slurm.sbatch ARGS` (passed to submit.sh after `--`), `ray job submit ... -- python -m
rlhf ARGS`. `-m` sweeps are expanded by Hydra's basic sweeper and every point is validated; a bare
`...` ("your other overrides") is dropped; any other flag fails the test until it is taught here.

Placeholder values (paths on someone's cluster, Hub names, a plugin module) are replaced by
PLACEHOLDERS, which point at existing tiny files, so the path checks of validate() run on them. After
that every model and dataset field must be a tiny-world name or an existing path: an example with a
new placeholder fails until it is added to PLACEHOLDERS (and an entry no example uses fails too).
"""

from __future__ import annotations

import ast
import collections
import functools
import importlib.util
import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from rlhf.cli import CONF_DIR, check_group_overrides, to_config
from rlhf.config import RLHFConfig, validate
from rlhf.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LAUNCH_FILES = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch", ".py"))
HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p")
"""Hydra app flags that take a value (`rlhf --cfg job ...` prints the config); checked like a run."""
HYDRA_FLAGS = ("--resolve",)
SHELL_OPERATORS = ("|", "||", "&&", ";", "&")
SYNOPSES = {"launch/submit.py": 2, "launch/slurm.sbatch": 1}  # the usage lines; submit.sh ... -- "$@"
"""Usage synopses per file: lines whose arguments are templates (`<overrides>`, `[options]`, `"$@"`), which
show the grammar rather than a runnable example. They cannot be validated, so each file's count is
acknowledged here: a new one fails the test until it is counted (or written as a runnable example)."""


def placeholders(model_dir: str, jsonl: str, parquet: str) -> dict[str, str]:
    """Documented value -> what the test validates instead (an existing tiny file of the same kind)."""
    return {
        "Qwen/Qwen2.5-0.5B-Instruct": model_dir,  # a Hub model: the tiny checkpoint stands in
        "/ckpts/sft": model_dir,
        "runs/calc/final": model_dir,  # docs/agents.md: an agentic run's final model
        "runs/tool-sft/final": model_dir,  # docs/agents.md's worked example: the SFT warm-up, then GRPO
        "runs/tool-grpo/final": model_dir,
        "/ckpt/sft": model_dir,
        "/shared/ckpt/sft": model_dir,
        "data/prompts.jsonl": jsonl,
        "/data/prompts.jsonl": jsonl,
        "/shared/data/prompts.jsonl": jsonl,
        "data/prompts.parquet": parquet,
        "my_project.rewards:score": "tests.fixtures.my_reward:score",  # docs/rewards.md's plugin example
        "my_pkg.envs:Guess": "tests.fixtures.two_turn_env:TwoTurns",  # docs/agents.md's environment example
    }


# ------------------------------------------------------------------------------ extraction


@dataclass(frozen=True)
class DocCommand:
    where: str
    """file:line of the command's first line."""
    kind: str
    """rlhf (Hydra app arguments), pipeline (recipe + overrides) or submit (launch/submit.py arguments)."""
    args: tuple[str, ...]
    text: str


def logical_lines(text: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, line) with backslash continuations joined."""
    out: list[tuple[int, str]] = []
    pending, start = "", first_line
    for offset, line in enumerate(text.splitlines()):
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def command_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(kind, arguments) of the first recognised command on a tokenised line, or None."""
    for i, token in enumerate(tokens):
        rest = list(itertools.takewhile(lambda t: t not in SHELL_OPERATORS, tokens[i + 1 :]))
        if token == "rlhf":
            return "rlhf", rest
        if token == "-m" and rest[:1] == ["rlhf"]:
            return "rlhf", rest[1:]
        if token == "rlhf-pipeline":
            return "pipeline", rest
        if token.endswith(("launch/submit.py", "launch/submit.sh")):
            return "submit", rest
        if token.endswith("launch/slurm.sbatch"):
            return "submit", ["--", *rest]  # slurm.sbatch: launch/submit.sh ... -- "$@"
        if re.fullmatch(r"rlhf:[\w.-]+", token) and rest[:1] == ["submit"]:
            return "submit", rest[1:]  # docker/entrypoint.sh: <image> submit [launch/submit.py args]
    return None


COMMAND_HINT = re.compile(r"(^|\s)(rlhf|rlhf-pipeline)(\s|$)|-m rlhf(\s|$)|launch/(submit\.(py|sh)|slurm\.sbatch)")
"""A line that may hold a command: one that matches and cannot be tokenised fails the test (kind "unparseable")."""


def commands_in(text: str, where: str, first_line: int = 1) -> list[DocCommand]:
    found = []
    for line_no, line in logical_lines(text, first_line):
        try:
            command = command_of(shlex.split(line, comments=True))
        except ValueError:  # unbalanced quotes: prose (an apostrophe), unless it looks like a command
            command = ("unparseable", []) if COMMAND_HINT.search(line) else None
        if command is not None:
            found.append(DocCommand(f"{where}:{line_no}", command[0], tuple(command[1]), line.strip()))
    return found


def fenced_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line number of the block's first line, text) of every ``` block."""
    return [
        (markdown[: m.start(1)].count("\n") + 1, m.group(1))
        for m in re.finditer(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M)
    ]


def documented_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for path in DOC_FILES:
        for first_line, block in fenced_blocks(path.read_text()):
            found += commands_in(block, path.relative_to(REPO).as_posix(), first_line)
    for path in LAUNCH_FILES:
        source, first_line = path.read_text(), 1
        if path.suffix == ".py":  # the module docstring's indented lines are its examples; the rest is prose
            module = ast.parse(source)
            docstring = (ast.get_docstring(module) or "").splitlines()
            source = "\n".join(line if line.startswith("    ") else "" for line in docstring)
            first_line = module.body[0].lineno if docstring else 1
        found += commands_in(source, path.relative_to(REPO).as_posix(), first_line)
    return found


DOC_COMMANDS = documented_commands()


def is_synopsis(command: DocCommand) -> bool:
    """Arguments with template tokens: <name>, [optional], or a shell expansion ("$@")."""
    return any(
        a.startswith(("<", "$")) or a.endswith(">") or (a.startswith("[") and a.endswith("]")) for a in command.args
    )


# ------------------------------------------------------------------------------ checking


def load_submit():
    spec = importlib.util.spec_from_file_location("launch_submit", REPO / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def hydra_app_arguments(args: list[str]) -> tuple[list[str], bool]:
    """(overrides, multirun) of `rlhf ARGS`, as hydra.main reads them."""
    overrides, multirun, i = [], False, 0
    while i < len(args):
        arg = args[i]
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            i += 1
        elif arg.startswith("-") and arg not in HYDRA_FLAGS:
            raise AssertionError(f"unknown flag {arg!r}: teach tests/unit/test_shipped_configs.py what it does")
        elif arg != "...":
            overrides.append(arg)
        i += 1
    return overrides, multirun


def sweep_points(overrides: list[str], multirun: bool) -> list[list[str]]:
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


def compose_checked(overrides: list[str]) -> RLHFConfig:
    """The config `rlhf <overrides>` runs, after every check it makes before Ray starts."""
    return _compose_checked(tuple(overrides))


@functools.cache  # Hydra's compose is ~0.1 s; the same overrides (a recipe in conf/ and in README) compose once
def _compose_checked(overrides: tuple[str, ...]) -> RLHFConfig:
    check_group_overrides(list(overrides))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            raw = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(raw):
        del raw["hydra"]
    cfg = to_config(raw)
    validate(cfg)
    check_reward_functions(cfg)
    if cfg.run.plan:  # `rlhf run.plan=true ...` builds the sizing plan (and may refuse the layout) instead of starting
        from rlhf.plan import build_plan

        build_plan(cfg)
    return cfg


def check_reward_functions(cfg: RLHFConfig) -> None:
    """The registered names and plugin import paths of the rule reward terms resolve (the run's preparation)."""
    from rlhf.rewards.pipeline import function_term

    max_len = cfg.rollout.sampling.max_new_tokens
    reward = cfg.reward
    if reward.fn:
        function_term(reward.fn, reward.kwargs, reward.weight, None, max_len, "reward.fn")
    for i, term in enumerate(reward.components):
        function_term(term.fn or "", term.kwargs, term.weight, term.name, max_len, f"reward.components[{i}]")


def assert_inputs_exist(cfg: RLHFConfig, produced: list[Path] = ()) -> None:
    """Every model and dataset field is unset, a tiny-world name or an existing path (or an earlier pipeline step's)."""
    from rlhf.data.sources import DATASET_FIELDS, is_produced
    from rlhf.models.paths import MODEL_PATH_FIELDS

    fields = [(f, _get(cfg, f)) for f in (*MODEL_PATH_FIELDS, *DATASET_FIELDS)]
    fields += [(f"data.mixture[{i}].path", s.path) for i, s in enumerate(cfg.data.mixture)]
    for field, value in fields:
        ok = not value or str(value).startswith("tiny") or Path(value).exists() or is_produced(value, produced)
        assert ok, f"{field}={value!r} is no tiny name and no existing path: add it to PLACEHOLDERS"


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.fixture(scope="module")
def substitutes(tmp_path_factory, tiny_model_path) -> dict[str, str]:
    data = tmp_path_factory.mktemp("doc-data")
    rows = [{"prompt": "1 + 1 =", "answer": "2"}]
    (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), data / "prompts.parquet")
    return placeholders(tiny_model_path, str(data / "prompts.jsonl"), str(data / "prompts.parquet"))


@pytest.fixture
def plugins(monkeypatch):
    """tests.fixtures.my_reward importable, as a plugin is for a run started from the repository root."""
    monkeypatch.syspath_prepend(str(REPO))


def substitute(args: list[str], table: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        out.append(f"{key}={table[value]}" if sep and value in table else arg)
    return out


def check_command(command: DocCommand, table: dict[str, str]) -> int:
    """Validate one documented command; returns how many configs (sweep points, pipeline steps) it made."""
    assert command.kind != "unparseable", "shlex cannot split this line (unbalanced quotes?)"
    args = substitute(list(command.args), table)
    if command.kind == "pipeline":
        return check_pipeline(tuple(args))
    if command.kind == "submit":
        args = load_submit().parse_args(args).overrides
    overrides, multirun = hydra_app_arguments(args)
    points = sweep_points(overrides, multirun)
    for point in points:
        assert_inputs_exist(compose_checked(point))
    return len(points)


@functools.cache
def check_pipeline(args: tuple[str, ...]) -> int:
    """`rlhf-pipeline ARGS` up to the point where it starts the first step: every step composed and validated."""
    from rlhf.pipeline import compose_step, load_pipeline

    pipeline = load_pipeline(args[0], args[1:])
    for step in pipeline.steps:
        earlier = pipeline.steps[: pipeline.steps.index(step)]
        cfg = compose_step(pipeline, step)
        check_reward_functions(cfg)
        assert_inputs_exist(cfg, [pipeline.step_dir(s.name).resolve() for s in earlier])
    return len(pipeline.steps)


# ------------------------------------------------------------------------------ tests


def yaml_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("cluster", yaml_names("cluster"))
def test_every_cluster_preset_validates(cluster):
    cfg = compose_checked(["stage=grpo", f"cluster={cluster}"])  # the default stage, spelled as the grid does
    assert cfg.cluster.name == cluster


@pytest.mark.parametrize("cluster", ["cpu_debug", "multi_node"])
@pytest.mark.parametrize("stage", yaml_names("stage"))
def test_every_stage_validates_on_the_cluster_presets(stage, cluster):
    """single_gpu is left out of the grid: it only lowers the ranks to 1 (every size valid on 2 ranks stays
    valid) and changes placement, dtype and sleep, which no stage's checks depend on."""
    cfg = compose_checked([f"stage={stage}", f"cluster={cluster}"])
    assert (cfg.stage, cfg.cluster.name) == (stage, cluster)


def test_multi_node_preset_fills_eight_policy_ranks():
    """The preset's own sizes: 8 ranks × micro 4 divide the optimizer batch, which divides the step's sequences."""
    cfg = compose_checked(["stage=grpo", "cluster=multi_node"])
    policy, critic = cfg.policy, cfg.critic
    sequences = cfg.run.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    assert policy.num_workers == 8 and policy.train_batch_size % (policy.micro_batch_size * 8) == 0
    assert critic.train_batch_size % (critic.micro_batch_size * critic.num_workers) == 0
    assert sequences % policy.train_batch_size == 0 and sequences % critic.train_batch_size == 0
    ppo = compose_checked(["stage=ppo", "cluster=multi_node"])  # the critic's arithmetic is checked with gae
    assert ppo.algorithm.advantage == "gae" and ppo.policy.num_workers == 8


def test_a_stage_file_keeps_its_own_batch_sizes_on_a_cluster_preset():
    """The stage comes after the cluster in conf/config.yaml: DPO's 32 pairs stay 32 pairs on multi_node."""
    dpo = compose_checked(["stage=dpo", "cluster=multi_node"])
    assert (dpo.policy.train_batch_size, dpo.policy.micro_batch_size, dpo.policy.num_workers) == (32, 4, 8)


@pytest.mark.parametrize("experiment", yaml_names("experiment"))
def test_every_experiment_validates(experiment):
    compose_checked([f"+experiment={experiment}"])


@pytest.mark.parametrize("recipe", yaml_names("pipeline"))
def test_every_pipeline_step_validates(recipe, substitutes):
    assert check_command(DocCommand("conf/pipeline", "pipeline", (recipe,), f"rlhf-pipeline {recipe}"), substitutes)


EXAMPLES = [c for c in DOC_COMMANDS if not is_synopsis(c)]


@pytest.mark.parametrize("command", EXAMPLES, ids=[c.where for c in EXAMPLES])
def test_documented_command_validates(command, substitutes, plugins):
    try:
        assert check_command(command, substitutes) >= 1
    except ConfigError as error:
        pytest.fail(f"{command.where}: `{command.text}` fails validation: {error}")


def test_synopses_are_acknowledged():
    counts = collections.Counter(c.where.partition(":")[0] for c in DOC_COMMANDS if is_synopsis(c))
    assert dict(counts) == SYNOPSES, "a usage synopsis that is no runnable example: count it in SYNOPSES"


def test_every_placeholder_is_used_and_the_extractor_finds_each_form(substitutes):
    values = {arg.partition("=")[2] for c in EXAMPLES for arg in c.args}
    unused = sorted(set(substitutes) - values)
    assert not unused, f"PLACEHOLDERS entries no documented command uses: {unused}"
    wheres = {c.where.partition(":")[0] for c in EXAMPLES}
    assert {"README.md", "docs/launch.md", "docs/debugging.md", "docs/rewards.md", "launch/submit.py"} <= wheres
    kinds = {(c.kind, c.args[:1]) for c in EXAMPLES}
    assert ("pipeline", ("sft_dpo",)) in kinds
    multi_node = [c for c in EXAMPLES if "cluster=multi_node" in c.args]
    assert len(multi_node) >= 5  # README, submit.sh, sbatch, docker submit, the ray-launcher sweep


def test_extractor_reads_every_command_form():
    text = "\n".join(
        [
            "PYTHONPATH=. rlhf stage=sft \\",
            "    run.seed=1   # a comment",
            "python -m pdb -m rlhf run.seed=2",
            "docker run --rm rlhf:cpu rlhf run.seed=3",
            "docker run --rm rlhf:gpu submit --address http://h:8265 -- run.seed=4",
            "sbatch --nodes=2 launch/slurm.sbatch run.seed=5",
            "ray job submit --address http://h:8265 -- python -m rlhf run.seed=6",
            "launch/submit.py --no-wait run.seed=7",
            "rlhf-pipeline sft_dpo run.seed=8",
            "python -m rlhf.rewards.serve --fn math   # not a run",
            "docker build -t rlhf:gpu .",
        ]
    )
    found = [(c.where, c.kind, c.args) for c in commands_in(text, "x.md")]
    assert found == [
        ("x.md:1", "rlhf", ("stage=sft", "run.seed=1")),
        ("x.md:3", "rlhf", ("run.seed=2",)),
        ("x.md:4", "rlhf", ("run.seed=3",)),
        ("x.md:5", "submit", ("--address", "http://h:8265", "--", "run.seed=4")),
        ("x.md:6", "submit", ("--", "run.seed=5")),
        ("x.md:7", "rlhf", ("run.seed=6",)),
        ("x.md:8", "submit", ("--no-wait", "run.seed=7")),
        ("x.md:9", "pipeline", ("sft_dpo", "run.seed=8")),
    ]
    assert hydra_app_arguments(["-m", "a=1,2", "...", "--cfg", "job"]) == (["a=1,2"], True)
    assert sweep_points(["a=1,2", "b=x"], True) == [["a=1", "b=x"], ["a=2", "b=x"]]
    with pytest.raises(AssertionError, match="unknown flag '--frobnicate'"):
        hydra_app_arguments(["--frobnicate"])


def test_a_missing_local_path_in_a_command_fails_validation(substitutes):
    bad = DocCommand("x.md:1", "rlhf", ("model.path=/no/such/ckpt",), "rlhf model.path=/no/such/ckpt")
    with pytest.raises(ConfigError, match="model.path '/no/such/ckpt' does not exist"):
        check_command(bad, substitutes)
    bad = DocCommand("x.md:1", "rlhf", ("data.train=/no/such.jsonl",), "rlhf data.train=/no/such.jsonl")
    with pytest.raises(ConfigError, match="data.train='/no/such.jsonl': no dataset file"):
        check_command(bad, substitutes)
    hub = DocCommand("x.md:1", "rlhf", ("model.path=org/unlisted",), "rlhf model.path=org/unlisted")
    with pytest.raises(AssertionError, match="add it to PLACEHOLDERS"):
        check_command(hub, substitutes)
