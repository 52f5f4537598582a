"""`dsl-dist COMMAND ...`: training on this machine (`dsl-dist train --nproc N`) and the tools
around a run. torchrun, Ray and Kubernetes launch `dsl_dist.train` / `dsl_dist.ray_train`
directly.

Each command lives in its own module, imported only when it runs, with a
`main(argv: list[str]) -> None` that parses its own arguments.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dsl_dist.launch", "train with --nproc N ranks on this machine (Hydra overrides)"),
    "export": ("dsl_dist.serving.export", "write a trained run's model as a compact artifact"),
    "serve": ("dsl_dist.serving.serve",
              "serve an exported artifact's top-K recommendations over HTTP"),
    "report": ("dsl_dist.report.index", "plot one or more runs (learning curves, densities, masks)"),
}


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: dsl-dist COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines),
              file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
