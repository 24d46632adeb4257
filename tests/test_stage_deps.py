"""``dvc.yaml`` declares exactly what each stage runs and reads, so that ``dvc repro`` never leaves a stale result.

For each stage: its code deps (``stages/*.py``, ``src/cellseg/**.py``) are the import closure of its script
within cellseg, found with ``ast`` (every ``import`` in a module counts, those inside functions too, and
importing ``cellseg.a.b`` runs ``cellseg/__init__.py`` and ``cellseg/a/__init__.py``); the params sections it
declares are those its script validates (``config.section(raw, "name")``, ``config.load("name")``, or names
looped over in a comprehension); a section named in any other way fails the test, which could not tell it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _module_file(name: str) -> Path | None:
    """The file of module ``name`` (``cellseg.a.b``) under ``src/``, or None if it is not one."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    """The cellseg module files that ``path`` imports directly, with the packages they run on the way."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # submodules imported by name
    files = set()
    for name in names:
        if not name.startswith("cellseg"):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            if found := _module_file(".".join(parts[:k])):
                files.add(found)
    return files


def import_closure(script: Path) -> set[Path]:
    """Every cellseg module file that running ``script`` imports, directly or not."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for found in _imports(todo.pop()) - seen:
            seen.add(found)
            todo.append(found)
    return seen


def sections_read(script: Path) -> set[str]:
    """The params sections a stage script validates (see the module docstring)."""
    tree = ast.parse(script.read_text())
    looped = {  # names a comprehension takes from a tuple of strings: (section(raw, n) for n in ("data", "unet"))
        loop.target.id: {item.value for item in loop.iter.elts}
        for node in ast.walk(tree) if isinstance(node, (ast.GeneratorExp, ast.ListComp))
        for loop in node.generators
        if isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Tuple)
        and all(isinstance(item, ast.Constant) for item in loop.iter.elts)
    }
    read = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("section", "load"):
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "config":
                arg = node.args[1] if node.func.attr == "section" else node.args[0]
                if isinstance(arg, ast.Constant):
                    read.add(arg.value)
                elif isinstance(arg, ast.Name) and arg.id in looped:
                    read |= looped[arg.id]
                else:
                    raise AssertionError(f"{script}:{node.lineno}: a params section the test cannot name")
    return read


def stage_problems(name: str, stage: dict) -> list[str]:
    """What the ``dvc.yaml`` entry ``stage`` gets wrong about the stage it runs (empty: nothing)."""
    script = REPO / next(word for word in stage["cmd"].split() if word.startswith("stages/"))
    code = {str(p.relative_to(REPO)) for p in import_closure(script)} | {str(script.relative_to(REPO))}
    declared = {d for d in stage.get("deps", []) if d.startswith(("src/", "stages/"))}
    params = {(p if isinstance(p, str) else next(iter(p))).split(".")[0] for p in stage.get("params", [])}
    problems = [f"{name}: code dep missing: {d}" for d in sorted(code - declared)]
    problems += [f"{name}: code dep declared but not run: {d}" for d in sorted(declared - code)]
    problems += [f"{name}: params section read but not declared: {s}" for s in sorted(sections_read(script) - params)]
    problems += [f"{name}: params section declared but not read: {s}" for s in sorted(params - sections_read(script))]
    return problems


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(_stages()))
def test_dvc_yaml_declares_what_the_stage_runs_and_reads(name: str) -> None:
    assert stage_problems(name, _stages()[name]) == []


def test_a_removed_dep_is_caught() -> None:
    """The check can fail: removing a code dep, or a params section, from a stage is reported."""
    stage = _stages()["train_maskrcnn"]
    without = {**stage, "deps": [d for d in stage["deps"] if d != "src/cellseg/rle.py"]}
    assert stage_problems("train_maskrcnn", without) == ["train_maskrcnn: code dep missing: src/cellseg/rle.py"]
    stage = _stages()["evaluate"]
    without = {**stage, "params": [p for p in stage["params"] if p != "postprocess"]}
    assert stage_problems("evaluate", without) == ["evaluate: params section read but not declared: postprocess"]
