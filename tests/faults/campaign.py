"""Sizes of the fault campaign: the short version runs in `make test`, the full one in `make torture`.

Each campaign (power loss, crashes across the cluster, partitions, fuzzing) is a pytest module in
this folder. It asks ``size(short, full)`` how many rounds, cuts or inputs to run, so the same code
is the quick check of every commit and the long campaign whose figures go in bench/README.md; an
environment variable of the campaign's own overrides both, to rerun one case at any size.

Every campaign prints one line of figures starting with ``campaign:`` (what ran, what was found,
how long it took), which `make torture` collects into its summary.
"""

from __future__ import annotations

import os

#: `make torture` sets MARS_TORTURE=1.
FULL = os.environ.get("MARS_TORTURE", "0") == "1"


def size(short: int, full: int, env: str | None = None) -> int:
    """``env`` if set, else ``full`` under `make torture`, else ``short``."""
    if env and os.environ.get(env):
        return int(os.environ[env])
    return full if FULL else short


def seconds(short: float, full: float, env: str | None = None) -> float:
    if env and os.environ.get(env):
        return float(os.environ[env])
    return full if FULL else short


def report(name: str, **figures: object) -> str:
    """The one ``campaign:`` line of a campaign's figures, printed (pytest -s shows it) and returned."""
    line = f"campaign: {name}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items())
    print("\n" + line, flush=True)
    return line
