"""Dependencies point one way (DESIGN.md §2): no module of rlhf/ imports from a layer above its own.

Every `import rlhf...` / `from rlhf... import` counts: at module level, inside functions, and under
`if TYPE_CHECKING:` (a type-only import still ties the layers together for readers, type checkers and
refactors, so it obeys the same order). Read with ast, nothing imported. The one way up is by name:
rlhf.config.stages imports the modules of rlhf.stages by listing the package (pkgutil), which is how
a stage registers without the schema naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rlhf

ROOT = Path(rlhf.__file__).resolve().parent

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("schema", ("rlhf.errors", "rlhf.config")),
    ("utils", ("rlhf.utils",)),
    ("algorithms", ("rlhf.algorithms",)),
    ("data", ("rlhf.data",)),
    ("models", ("rlhf.models",)),
    ("engines", ("rlhf.engines",)),
    ("workers", ("rlhf.workers",)),
    ("rewards", ("rlhf.rewards",)),
    ("environments", ("rlhf.environments",)),
    ("trainers", ("rlhf.trainers",)),
    ("plan", ("rlhf.plan",)),
    ("stages", ("rlhf.stages",)),
    ("entry points", ("rlhf.cli", "rlhf.pipeline", "rlhf.__main__", "rlhf")),
]
"""Lowest first. A module belongs to the entry with the longest prefix of its dotted name."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> tuple[int, str]:
    """(layer index, the LAYERS prefix) of a module: its longest matching prefix."""
    matches = [
        (len(prefix), index, prefix)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer of LAYERS; add it"
    _, index, prefix = max(matches)
    return index, prefix


def rlhf_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every rlhf import in the file, wherever it sits."""
    module = module_name(path)
    return imports_of(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def imports_of(source: str, package: str, top: str = "rlhf") -> list[tuple[int, str]]:
    """(line, absolute module) of every import of `top` or its modules in `source`, a module of `package` (for
    relative imports)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, target) for line, target in found if target == top or target.startswith(top + ".")]


def all_modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_import_points_to_the_same_or_a_lower_layer():
    problems = []
    for path in all_modules():
        module = module_name(path)
        layer, _ = unit(module)
        for line, target in rlhf_imports(path):
            target_layer, _ = unit(target)
            if target_layer > layer:
                problems.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {module} ({LAYERS[layer][0]}) imports {target} "
                    f"({LAYERS[target_layer][0]})"
                )
    assert not problems, "imports that point up a layer:\n" + "\n".join(problems)


def test_no_import_cycle_between_units():
    """Between the LAYERS entries (packages such as rlhf.data, rlhf.models): no cycle, even within one layer."""
    edges: dict[str, set[str]] = {}
    for path in all_modules():
        _, source = unit(module_name(path))
        for _, target in rlhf_imports(path):
            _, destination = unit(target)
            if destination != source:
                edges.setdefault(source, set()).add(destination)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    return trail + [start]
                if nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in (cycle_from(u) for u in sorted(edges)) if c]
    assert not cycles, "import cycles between units:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_schema_imports_nothing_above_it():
    """rlhf.config and rlhf.errors: only each other (the stage modules are found by name, not imported)."""
    for path in sorted((ROOT / "config").rglob("*.py")) + [ROOT / "errors.py"]:
        for line, target in rlhf_imports(path):
            assert unit(target)[0] == 0, f"{path.relative_to(ROOT.parent)}:{line} imports {target}"


def test_deepspeed_is_imported_only_through_import_deepspeed():
    """rlhf.utils.distributed.import_deepspeed leaves out its autotuner's mlflow import (1.1 s per actor process);
    an `import deepspeed...` anywhere else would bring it back in the first process to reach that line."""
    for path in all_modules():
        if path != ROOT / "utils" / "distributed.py":
            found = imports_of(path.read_text(), "rlhf", top="deepspeed")
            assert not found, (
                f"{path.relative_to(ROOT.parent)}: use rlhf.utils.distributed.import_deepspeed, not {found}"
            )


def test_the_checker_sees_imports_inside_functions_and_under_type_checking():
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rlhf.trainers.rl import RLTrainer\n"
        "def f():\n    import rlhf.cli\n    from . import loading\n"
    )
    found = [target for _, target in imports_of(source, "rlhf.models")]
    assert found == ["rlhf.trainers.rl", "rlhf.cli", "rlhf.models"]
    assert imports_of("def f():\n    from deepspeed.ops import adam\n", "rlhf", top="deepspeed") == [
        (2, "deepspeed.ops")
    ]
    assert [unit(t)[1] for t in found] == ["rlhf.trainers", "rlhf.cli", "rlhf.models"]
