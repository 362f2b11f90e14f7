"""The build: the engine's hot path runs compiled (setup.py), and never stale."""

from __future__ import annotations

import ast
import os
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

import pytest

import troth.engine.engine  # noqa: F401  (imports the engine's compiled modules)
from troth.core import compiled

PURE = bool(os.environ.get("TROTH_PURE_PYTHON"))


@pytest.mark.skipif(PURE, reason="installed without compiling (TROTH_PURE_PYTHON)")
def test_the_install_compiled_the_hot_path() -> None:
    hot = {"troth.core.checkpoint", "troth.core.transaction", "troth.engine.cell"}
    assert hot <= set(compiled.compiled()), "installed without compiling (TROTH_PURE_PYTHON=1?)"
    assert "troth.core.batcher" not in compiled.compiled()


def test_no_compiled_module_runs_older_code_than_its_source() -> None:
    """Otherwise the tests would pass or fail on code nobody is looking at."""
    assert compiled.stale() == [], "edited since the install: pip install -e . again"


def _module(directory: Path, name: str, suffix: str) -> ModuleType:
    module = ModuleType(name)
    module.__file__ = str(directory / (name.rpartition(".")[2] + suffix))
    Path(module.__file__).write_bytes(b"")
    return module


@pytest.mark.parametrize(
    ("source_after_build", "stale"),
    [(-60.0, False), (60.0, True), (1.0, False)],  # 1 s: a wheel writes both at once
)
def test_a_source_edited_after_the_build_is_stale(
    tmp_path: Path, source_after_build: float, stale: bool
) -> None:
    built = _module(tmp_path, "troth.core.built", EXTENSION_SUFFIXES[0])
    pure = _module(tmp_path, "troth.core.pure", ".py")
    other = _module(tmp_path, "elsewhere", EXTENSION_SUFFIXES[0])
    source = tmp_path / "built.py"
    source.write_text("")
    at = Path(built.__file__ or "").stat().st_mtime + source_after_build
    os.utime(source, (at, at))
    modules = {m.__name__: m for m in (built, pure, other)}
    assert compiled.compiled(modules) == ["troth.core.built"]
    assert compiled.stale(modules) == (["troth.core.built"] if stale else [])


def test_coverage_leaves_out_exactly_the_compiled_modules() -> None:
    """``HOT`` in setup.py and coverage's ``omit`` in pyproject.toml name the same
    modules: one added to the build without the other would be counted as untested,
    or one dropped from it would go unmeasured."""
    root = Path(__file__).resolve().parent.parent
    tree = ast.parse((root / "setup.py").read_text())
    hot = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HOT"
    )
    omit = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["coverage"]["run"]["omit"]
    assert sorted("*/" + path.split("/", 1)[1] for path in hot) == sorted(omit)
