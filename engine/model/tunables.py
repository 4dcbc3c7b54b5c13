"""The operating parameters of a node (the original's /proc/sys/mars, seed chapter 5), in one table.

Why a table: marsadm parses and refuses values, marsd applies them, and every face shows them;
each must read the same name, unit, default and range, or an operator sets one figure and another
is in force. The set value lives in the tree per node (``defaults-<host>/<name>``), so it survives
a restart and every node can show it; marsd reports what it runs with as
``actual-<host>/tunable-<name>``. Unlike the original's sysctls they are persistent: an operator
who throttled a WAN link does not want the limit gone after a reboot.

Values are integers in their unit (bytes, bytes/s, a count) except the load limit (a float).
0 means "off" (no limit) wherever a limit can be off. The free-space limits default to "auto":
the original's 2 GiB each, scaled down to 5 % of the filesystem each for a small MARS directory,
so a test's few hundred MiB behave as a production /mars does, only smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError
from ..tree import Tree
from .units import human_bytes, parse_size

GiB = 1 << 30
MiB = 1 << 20

#: The original's required_free_space_{1..4}_gb default: 2 GiB each.
SPACE_STEP = 2 * GiB
#: On a small filesystem each step is at most this share of its size.
SPACE_STEP_SHARE = 0.05


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    unit: str  # "count", "bytes", "bytes/s", "load", "bool"
    default: float | int | None  # None: "auto" (computed, see space_limits)
    low: float
    high: float
    help: str
    original: str  # the original's /proc/sys/mars name, for operators who know it

    def parse(self, text: str) -> int | float:
        """The value of ``text`` in this tunable's unit, or a UsageError that gives the range."""
        t = text.strip()
        if t.startswith("-"):
            raise UsageError(f"{self.name}: {text!r} is negative", f"give {self.range_text()}")
        try:
            if self.unit == "load":
                v: int | float = float(t)
                if not math.isfinite(v):
                    raise ValueError
            elif self.unit in ("bytes", "bytes/s"):
                v = _bytes(t.removesuffix("/s"))
            elif self.unit == "bool":
                v = {"0": 0, "1": 1, "off": 0, "on": 1, "no": 0, "yes": 1}[t.lower()]
            else:
                v = int(t)
        except (ValueError, KeyError):
            raise UsageError(f"{self.name}: {text!r} is not {_what(self)}", f"give {self.range_text()}") from None
        if not self.low <= v <= self.high:
            raise UsageError(f"{self.name}: {text!r} is out of range", f"give {self.range_text()}")
        return v

    def range_text(self) -> str:
        if self.unit == "bool":
            return "0 (off) or 1 (on)"
        lo = self.show(self.low)
        span = f"{lo} or more" if self.high >= _BIG else f"{lo} .. {self.show(self.high)}"
        off = " (0: off)" if self.low == 0 else ""
        units = "; sizes as 20M, 4G (binary multiples)" if self.unit in ("bytes", "bytes/s") else ""
        return f"{span}{off}{units}"

    def show(self, v: float | int | None) -> str:
        if v is None:
            return "auto"
        if self.unit == "bytes":
            return human_bytes(v) if v else "0"
        if self.unit == "bytes/s":
            return f"{human_bytes(v)}/s" if v else "0"
        if self.unit == "load":
            return f"{v:g}"
        return str(int(v))


def _what(spec: Spec) -> str:
    return {"load": "a number", "bytes": "a size", "bytes/s": "a rate", "bool": "0 or 1"}.get(spec.unit, "a whole number")


def _bytes(t: str) -> int:
    if t == "0":
        return 0
    try:
        return parse_size(t)
    except UsageError:
        raise ValueError(t) from None


_BIG = float(1 << 60)

SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("sync-limit", "count", 0, 0, 1 << 20, "how many full syncs run at once on this node", "sync_limit"),
    Spec("logrot-auto", "bytes", 4 * GiB, 0, _BIG, "rotate the primary's log file past this size", "logrot_auto_gb"),
    Spec("logdel-auto", "bool", 0, 0, 1, "the primary's marsd deletes log files every member has replayed",
         "(marsadm cron's log-delete-all)"),
    Spec("loadavg-limit", "load", 0, 0, 1e6, "above this 1-minute load average the node stops fetching",
         "loadavg_limit"),
    Spec("traffic-out-limit", "bytes/s", 0, 0, _BIG, "bytes/s this node sends on peer links (fetch, sync, serving)",
         "traffic_tuning/server_role_traffic_ratelimit_kb"),
    Spec("traffic-in-limit", "bytes/s", 0, 0, _BIG, "bytes/s this node receives on peer links",
         "traffic_tuning/client_role_traffic_ratelimit_kb"),
    Spec("io-limit", "bytes/s", 0, 0, _BIG, "bytes/s of replay and sync writes to the data devices",
         "io_tuning/writeback_ratelimit_kb"),
    Spec("mem-limit", "bytes", 256 * MiB, 16 * MiB, _BIG, "memory for fetch, sync and replay buffers",
         "mem_limit_gb"),
    *(Spec(f"required-free-space-{i}", "bytes", None, 0, _BIG,
           f"emergency step {i} of the MARS directory's free space (auto: 2 GiB, at most 5 % of the filesystem)",
           f"required_free_space_{i}_gb") for i in (1, 2, 3, 4)),
)}


def spec(name: str) -> Spec:
    try:
        return SPECS[name]
    except KeyError:
        raise UsageError(f"no tunable {name!r}", f"the tunables are: {', '.join(SPECS)}") from None


def key(host: str, name: str) -> str:
    """Where the set value lives: per node, as the original's sync limit (``defaults-<host>/sync-limit``)."""
    return f"defaults-{host}/{name}"


def set_value(tree: Tree, host: str, name: str) -> int | float | None:
    """The value the tree sets for ``host``, None when unset (or unreadable: then the default holds)."""
    s = spec(name)
    raw = tree.get(key(host, name))
    if raw is None or raw == "":
        return None
    try:
        return s.parse(str(raw))
    except UsageError:
        return None


def value(tree: Tree, host: str, name: str) -> int | float | None:
    """The value in force for ``host``: the set one, else the default (None: auto)."""
    v = set_value(tree, host, name)
    return v if v is not None else SPECS[name].default


def number(name: str, raw: str | None) -> float | None:
    """A tunable's tree or report text as a number in its unit (None: unset, auto or unreadable)."""
    s = SPECS.get(name)
    if raw is None or raw in ("", "None", "auto"):
        return None
    if s is None:
        try:
            return float(raw)
        except ValueError:
            return None
    try:
        return float(s.parse(raw))
    except UsageError:
        return None


def show_text(name: str, raw: str | None) -> str | None:
    """A tunable's tree or report text with its unit ("20.0 MiB/s"), as every face shows it."""
    s = SPECS.get(name)
    if raw is None or s is None:
        return raw
    v = number(name, raw)
    return raw if v is None else s.show(v)


def space_limits(tree: Tree, host: str, total: int) -> tuple[int, int, int, int]:
    """The four free-space steps of ``host``'s MARS directory of ``total`` bytes, in bytes (L1..L4).

    Cumulative as the original: level 1 below L1+L2+L3+L4 free, level 4 below L4.
    """
    auto = int(min(SPACE_STEP, SPACE_STEP_SHARE * total))
    out: list[int] = []
    for i in (1, 2, 3, 4):
        v = value(tree, host, f"required-free-space-{i}")
        out.append(auto if v is None else int(v))
    return out[0], out[1], out[2], out[3]


def writethrough_margin(total: int) -> int:
    """Free bytes a primary that met ENOSPC needs before it logs again, whatever the limits say
    (all four 0: an operator turned the levels off): else it would leave emergency mode and run
    into ENOSPC again at once, a new log file each time."""
    return int(min(64 * MiB, SPACE_STEP_SHARE * total))


def space_level(rest: int, limits: tuple[int, int, int, int]) -> int:
    """The emergency level (0..4) for ``rest`` free bytes, without hysteresis."""
    l1, l2, l3, l4 = limits
    if rest < l4:
        return 4
    if rest < l4 + l3:
        return 3
    if rest < l4 + l3 + l2:
        return 2
    if rest < l4 + l3 + l2 + l1:
        return 1
    return 0
