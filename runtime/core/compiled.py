"""Which of troth's modules run compiled, and which run older code than their source.

troth's build compiles the engine's hot path with mypyc (``setup.py``), and a
compiled module is imported in place of the ``.py`` file beside it. In an editable
install those ``.py`` files are the ones being edited: a compiled module then runs the
code as it was at install time, silently. :func:`stale` finds such modules, so that
a node can say so when it starts.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

#: How much newer than its extension a ``.py`` file must be to count as edited
#: (installing from a wheel writes both within moments, in any order).
SLACK_SECONDS = 2.0


def compiled(modules: Mapping[str, ModuleType] | None = None) -> list[str]:
    """The troth modules imported so far that run compiled, sorted."""
    found = sys.modules if modules is None else modules
    return sorted(
        name
        for name, module in list(found.items())
        if name.startswith("troth.") and _extension(module) is not None
    )


def stale(modules: Mapping[str, ModuleType] | None = None) -> list[str]:
    """The compiled modules whose ``.py`` file was changed after they were built: their
    edits do not run until troth is installed again."""
    found = sys.modules if modules is None else modules
    out = []
    for name in compiled(found):
        extension = _extension(found[name])
        assert extension is not None
        source = extension.with_name(name.rpartition(".")[2] + ".py")
        if source.exists() and source.stat().st_mtime > extension.stat().st_mtime + SLACK_SECONDS:
            out.append(name)
    return out


def _extension(module: ModuleType) -> Path | None:
    path = getattr(module, "__file__", None)
    if path and path.endswith(tuple(EXTENSION_SUFFIXES)):
        return Path(path)
    return None
