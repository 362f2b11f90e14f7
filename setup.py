"""troth's build: the package as ``pyproject.toml`` declares it, with the engine's hot
path compiled to C extensions by mypyc (``HOT``), as black and mypy ship theirs.

Why: a message's way through the engine is about 180 Python calls of small
functions; compiled, the same code runs each message in about four fifths of the
time (README, *Compiled hot path*). The ``.py`` files ship beside the extensions and
stay the source of truth; the extensions only run them faster.

The compiled modules are imported in place of their ``.py`` files. An editable
install therefore runs the code as it was at install time: reinstall after editing
one of them, or install with ``TROTH_PURE_PYTHON=1`` (no compiling at all; also the
way out where no C compiler is). ``troth.core.compiled`` tells which modules run
compiled, and which are older than their source (a node warns of those at start).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from setuptools import setup

ROOT = Path(__file__).resolve().parent

#: The modules compiled: those every message, timer and delivery runs through.
#: (Coverage leaves them out, ``pyproject.toml``: it cannot trace compiled code; a
#: test keeps the two lists the same.)
#: Left out: the batcher (compiled, it crashed the process when a Redis Cluster
#: master was killed under load), duequeue and aio (mypyc names their ``_thread``
#: ``__thread``, which C reserves), the sessions (pydantic models fail in C), and
#: what third-party code subclasses (plugins, ``CA``).
HOT = (
    "troth/caas/delivery.py",
    "troth/core/access.py",
    "troth/core/checkpoint.py",
    "troth/core/clock.py",
    "troth/core/codec.py",
    "troth/core/frames.py",
    "troth/core/jsonsafe.py",
    "troth/core/logcontext.py",
    "troth/core/metrics.py",
    "troth/core/names.py",
    "troth/core/records.py",
    "troth/core/sync_workers.py",
    "troth/core/tracing.py",
    "troth/core/transaction.py",
    "troth/engine/cell.py",
    "troth/engine/engine.py",
    "troth/engine/outbox.py",
    "troth/engine/scheduler.py",
)

#: Strict mypy flags turned off for the compile only: the build's environment has
#: none of the dependencies but pydantic, so their types are Any. (``mypy -p troth``
#: in CI checks the code strictly, with every dependency installed.)
LENIENT = (
    "--allow-subclassing-any",
    "--allow-untyped-calls",
    "--allow-untyped-decorators",
    "--no-warn-return-any",
    "--no-warn-unused-ignores",
    "--no-warn-redundant-casts",
)

#: The commands that build extensions; metadata-only runs (egg_info, dist_info) skip
#: the compile, which takes half a minute.
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def compiled_extensions() -> list[Any]:
    """The C extensions of ``HOT``; none for a metadata run or with TROTH_PURE_PYTHON."""
    if os.environ.get("TROTH_PURE_PYTHON") or not BUILDS & set(sys.argv[1:]):
        return []
    from mypyc.build import mypycify

    # mypyc names a module after its path: compile a copy laid out as the package is
    # imported (``troth/``), not as the repository keeps it (``runtime/``).
    stage = ROOT / "build" / "mypyc"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(ROOT / "runtime", stage / "troth", ignore=shutil.ignore_patterns("*.so"))
    cwd = os.getcwd()
    os.chdir(stage)
    try:
        return mypycify(
            ["--config-file", str(ROOT / "pyproject.toml"), *LENIENT, *HOT],
            opt_level="3",
            multi_file=True,
            group_name="troth",
            target_dir=str(stage / "c"),
        )
    finally:
        os.chdir(cwd)


setup(ext_modules=compiled_extensions())
