"""Makes this interpreter look like a GPU image that lacks some packages: the modules named in
DSL_MISSING_MODULES (comma-separated top-level names) are not found, as if not installed.

With this directory first on PYTHONPATH, Python imports this file at start-up, in every process
that inherits the environment (pytest, torchrun ranks, the GPU check's child steps), so that a
rehearsal on a full CPU environment fails where the image would.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import PathFinder

MISSING = frozenset(filter(None, os.environ.get("DSL_MISSING_MODULES", "").split(",")))


class _Hiding:
    """The path finder, blind to the missing packages (so that `import` fails and
    `importlib.util.find_spec` answers None, as for a package that is not installed)."""

    @staticmethod
    def find_spec(name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name.partition(".")[0] in MISSING:
            return None
        return PathFinder.find_spec(name, path, target)

    @staticmethod
    def invalidate_caches() -> None:
        PathFinder.invalidate_caches()

    @staticmethod
    def find_distributions(*args, **kwargs):  # type: ignore[no-untyped-def]
        """importlib.metadata's view: the installed distributions' metadata, unchanged."""
        return PathFinder.find_distributions(*args, **kwargs)


if MISSING:
    sys.meta_path[:] = [_Hiding if f is PathFinder else f for f in sys.meta_path]
