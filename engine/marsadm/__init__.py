"""marsadm: the operator's tool. Writes desired state into the tree and waits for marsd.

Only ``main()`` prints errors and chooses exit codes: a MarsError becomes one line
``marsadm: <subject>: <what>; <remedy>`` and exit 1, a usage error exit 2 (the original exited 0,
which scripts could not tell from success). Commands raise; they never exit.
"""

from __future__ import annotations

import sys

from ..errors import MarsError
from .base import COMMANDS, build_parser, run

# Importing the command modules registers their commands.
from . import cluster, help, logs, resize, resource, roles, switches, tunables, wait  # noqa: F401,E402
from . import view  # noqa: F401,E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        return run(parser, argv)
    except MarsError as e:
        print(f"marsadm: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("marsadm: interrupted; the tree holds whatever was written before", file=sys.stderr)
        return 130


__all__ = ["main", "COMMANDS"]
