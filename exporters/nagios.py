"""check_mars: the Nagios / Icinga / monitoring-plugins face of the status model.

One run reads one snapshot (:func:`mars.engine.model.read_snapshot`: this node's tree, with
marsd's counters when it answers) and its findings, and prints what a monitoring server reads:
the exit code, ``MARS <STATE> - <summary>`` and perfdata. The verdict on the findings is the
model's :func:`~mars.engine.model.verdict`, the very function ``mars-status --check`` renders, so
without thresholds both give the same exit code for the same cluster. What this face adds is what
only a monitoring plugin has: thresholds in the standard range syntax on two figures an operator
tunes per site, the replication lag of each member and the free space of each node's MARS
directory, and the plugin conventions (exit 3 for anything that is not a check result, a time
budget, perfdata with units from the guidelines' set).

Built on nagiosplugin (Resource, Context, Summary, Check, ``guarded``, its timeout), with three
departures from its defaults, each for the plugin guidelines:

* the ranges are parsed here first (:func:`threshold`), into nagiosplugin's :class:`Range`:
  sizes may carry suffixes (``10G:``), and the range is written back into the perfdata as plain
  decimals, where nagiosplugin would write ``1e-06``;
* every value is written by :func:`~mars.engine.model.number_text` (no scientific notation, ``U``
  for a value the tree does not know);
* every failure that is not a bug (no tree, permission denied, unknown resource, a wrong option,
  the time budget spent) is an UNKNOWN verdict of the model with its remedy, printed as
  ``MARS UNKNOWN - <why>; <remedy>``, never a traceback. ``guarded`` stays for real bugs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NoReturn

import nagiosplugin

from .. import __version__
from ..engine import model
from ..engine.model import (
    CHECK_LISTED,
    CHECK_UNKNOWN,
    Finding,
    MarsError,
    PerfFigure,
    Snapshot,
    UsageError,
    Verdict,
    human_bytes,
    number_text,
)

PROG = "check_mars"
DEFAULT_TIMEOUT_S = 10
# The share of the time budget marsd may take to answer: when it hangs, the tree alone is read
# and judged (MARSD_DOWN says so) well inside the budget, instead of the whole check timing out.
MARSD_SHARE = 0.4
MARSD_REPLY_MAX_S = 2.0

_STATES = (nagiosplugin.Ok, nagiosplugin.Warn, nagiosplugin.Critical, nagiosplugin.Unknown)  # by exit code
# The figure kinds (nagiosplugin contexts); only lag and free have thresholds.
VERDICT, COUNT, LAG, REST, FREE = "verdict", "count", "lag", "rest", "free"
RANGE_HELP = "60 (above 60 alerts), 10: (below 10), ~:60 (above 60), 10:20 (outside), @10:20 (inside)"
RANGE_REMEDY = f"see '{PROG} --help' for ranges: 60, 10:, ~:60, 10:20, @10:20"


# --- thresholds ------------------------------------------------------------------------------------

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_ATOMS = {"s": re.compile(rf"({_NUMBER})"), "B": re.compile(rf"({_NUMBER})\s*([kmgtp]?)(?:i?b)?", re.IGNORECASE)}
_SIZE_FACTOR = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_UNIT_WORD = {"s": "seconds", "B": "bytes"}


@dataclass(frozen=True)
class Threshold:
    """A range of the monitoring-plugins syntax, ``[@][start:][end]``, in base units.

    ``spec`` is the range as the perfdata writes it (plain decimals, sizes in bytes); ``range`` is
    nagiosplugin's, which decides. Without ``@`` a value outside [start, end] alerts, with ``@``
    one inside; a missing start is 0, ``~`` is minus infinity, a missing end plus infinity.
    """

    spec: str
    range: nagiosplugin.Range
    unit: str  # "s" or "B"

    def alerts(self, value: float) -> bool:
        return not self.range.match(value)

    def _end(self, v: float) -> str:
        return human_bytes(v) if self.unit == "B" else f"{number_text(v)}{self.unit}"

    def violation(self) -> str:
        """What the value did, for the status line: ``above 60s``, ``below 1.0 GiB``,
        ``outside 10s..20s``, ``inside 10s..20s``."""
        r = self.range
        lo, hi = r.start, r.end
        if r.invert:
            if lo == -math.inf:
                return f"at most {self._end(hi)}"
            return f"at least {self._end(lo)}" if hi == math.inf else f"inside {self._end(lo)}..{self._end(hi)}"
        if lo == -math.inf or (lo == 0 and ":" not in self.spec):
            return f"above {self._end(hi)}"
        return f"below {self._end(lo)}" if hi == math.inf else f"outside {self._end(lo)}..{self._end(hi)}"


def _atom(text: str, unit: str, what: str) -> str:
    """One end of a range as plain decimals in the base unit (sizes: whole bytes)."""
    m = _ATOMS[unit].fullmatch(text.strip())
    if m is None:
        suffix = " (or with a size suffix: 10G, 512M, 1T)" if unit == "B" else ""
        raise UsageError(f"{what}: {text!r} is not a number of {_UNIT_WORD[unit]}{suffix}",
                         RANGE_REMEDY)
    value = Decimal(m.group(1))
    if unit == "B":
        return str(int(value * _SIZE_FACTOR[m.group(2).lower()]))
    return str(int(value)) if value == value.to_integral_value() else format(value, "f")


def threshold(text: str | None, unit: str, option: str) -> Threshold | None:
    """The range an option gives (``unit`` "s" or "B"); None for none. An empty text is none
    too: a service definition that passes an empty macro (``-w $ARG1$``) means no threshold."""
    if text is None or not text.strip():
        return None
    what = f"{option} {text}"
    body = text.strip()
    invert = body.startswith("@")
    if invert:
        body = body[1:]
    if body.count(":") > 1:
        raise UsageError(f"{what}: a range has at most one ':'", RANGE_REMEDY)
    start, colon, end = body.rpartition(":") if ":" in body else ("", "", body)
    if not colon and not end.strip():
        raise UsageError(f"{what}: the range is empty", RANGE_REMEDY)
    parts = []
    if colon:
        parts.append(("~" if start.strip() == "~" else _atom(start, unit, what) if start.strip() else "0") + ":")
    if end.strip():
        parts.append(_atom(end, unit, what))
    spec = ("@" if invert else "") + "".join(parts)
    try:
        rng = nagiosplugin.Range(spec)
    except ValueError as e:
        raise UsageError(f"{what}: {e}", f"give the smaller value first; {RANGE_REMEDY}") from None
    return Threshold(spec, rng, unit)


# --- the figures of one snapshot (pure) ---------------------------------------------------------------

def _seconds(v: float | None) -> float | None:
    x = model.figure(v)
    return None if x is None else round(x, 3)


def figures(snap: Snapshot, resource: str | None) -> Iterator[tuple[str, PerfFigure]]:
    """(kind, figure) of every member of every resource (or only ``resource``) and every node.

    The labels name what they are about as the findings do (``r@b``, ``b``): a graph per label
    stays the same member's graph across role switches. The primary is a member too: its lag is
    0 by definition, and a figure that does not appear and vanish with the role is easier to graph.
    """
    for res, rs in sorted(snap.resources.items()):
        if resource is not None and res != resource:
            continue
        for h, n in sorted(rs.nodes.items()):
            where = f"{res}@{h}"
            yield LAG, PerfFigure(f"{where} lag", _seconds(n.replay_lag_s), "s", min=0)
            yield REST, PerfFigure(f"{where} sync rest", n.sync.rest_bytes, "B", min=0, max=n.sync.size_bytes)
            yield REST, PerfFigure(f"{where} fetch rest", n.fetch.rest_bytes if n.fetch else None, "B", min=0)
            yield REST, PerfFigure(f"{where} replay rest", n.replay.rest_bytes if n.replay else None, "B", min=0)
    for h, ns in sorted(snap.nodes.items()):
        yield FREE, PerfFigure(f"{h} free", ns.rest_space_bytes, "B", min=0, max=ns.total_space_bytes)


def _shown(f: PerfFigure) -> str:
    """A figure for the status line: ``r@c lag 12.5s``, ``b free 1.0 GiB``."""
    if f.value is None:
        return f"{f.name} unknown"
    return f"{f.name} {human_bytes(f.value)}" if f.unit == "B" else f"{f.name} {f.value_text}"


# --- nagiosplugin's parts ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What the command line asks for, checked."""

    mars_dir: str
    host: str
    resource: str | None = None
    window_s: float | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S
    lag_warning: Threshold | None = None
    lag_critical: Threshold | None = None
    free_warning: Threshold | None = None
    free_critical: Threshold | None = None
    verbose: int = 0
    note: str | None = None  # how the host was chosen, shown with -v


class Mars(nagiosplugin.Resource):  # type: ignore[misc]
    """The cluster as this node's tree knows it: the model's verdict, its counts, and the
    figures the thresholds judge. ``error`` makes it report only UNKNOWN with that reason."""

    def __init__(self, settings: Settings | None, error: str | None = None) -> None:
        self.settings = settings
        self.error = error
        self.findings: list[Finding] = []

    @property
    def name(self) -> str:
        return "MARS"

    def _read(self, s: Settings) -> tuple[Snapshot, list[Finding]]:
        reply_s = min(MARSD_REPLY_MAX_S, MARSD_SHARE * s.timeout_s)
        snap, _answered = model.read_snapshot(s.mars_dir, s.host, s.window_s, timeout=reply_s, lines=False)
        if s.resource is not None:
            snap.require_resource(s.resource)
        return snap, model.relevant(model.findings(snap), s.resource)

    def probe(self) -> Iterator[nagiosplugin.Metric]:
        s = self.settings
        if s is None or self.error is not None:
            yield nagiosplugin.Metric(VERDICT, model.verdict(None, [], self.error or "no settings"), context=VERDICT)
            return
        try:
            snap, self.findings = self._read(s)
        except MarsError as e:
            yield nagiosplugin.Metric(VERDICT, model.verdict(None, [], str(e)), context=VERDICT)
            return
        v = model.verdict(snap, self.findings)
        yield nagiosplugin.Metric(VERDICT, v, context=VERDICT)
        for f in v.figures:
            yield nagiosplugin.Metric(f.name, f, context=COUNT)
        for kind, f in figures(snap, s.resource):
            yield nagiosplugin.Metric(f.name, f, context=kind)


class VerdictContext(nagiosplugin.Context):  # type: ignore[misc]
    """The model's verdict as a result: its state, its summary; no perfdata of its own."""

    def __init__(self) -> None:
        super().__init__(VERDICT)

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        v: Verdict = metric.value
        return nagiosplugin.Result(_STATES[v.code], v.summary, metric)


class FigureContext(nagiosplugin.Context):  # type: ignore[misc]
    """A kind of figure: its perfdata, and its thresholds if it has any. An unknown value (``U``)
    never alerts, as in the findings: an unknown figure triggers no rule."""

    def __init__(self, name: str, warning: Threshold | None = None, critical: Threshold | None = None) -> None:
        super().__init__(name)
        self.warning = warning
        self.critical = critical

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        f: PerfFigure = metric.value
        if f.value is not None:
            for state, t in ((nagiosplugin.Critical, self.critical), (nagiosplugin.Warn, self.warning)):
                if t is not None and t.alerts(f.value):
                    return nagiosplugin.Result(state, f"{_shown(f)} {t.violation()} ({state})", metric)
        return nagiosplugin.Result(nagiosplugin.Ok, None, metric)

    def performance(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Performance:
        f: PerfFigure = metric.value
        return nagiosplugin.Performance(
            f.name, "U" if f.value is None else number_text(f.value), f.unit if f.value is not None else "",
            self.warning.spec if self.warning else None, self.critical.spec if self.critical else None,
            None if f.min is None else number_text(f.min), None if f.max is None else number_text(f.max))


class MarsSummary(nagiosplugin.Summary):  # type: ignore[misc]
    """The status line: the model's summary, then the thresholds a figure broke (the first few).
    With ``-v``, every finding with its remedy and every broken threshold, one per line."""

    @staticmethod
    def _broken(results: nagiosplugin.Results) -> list[nagiosplugin.Result]:
        return [r for r in results if r.state != nagiosplugin.Ok and r.metric is not None
                and r.metric.context in (LAG, FREE)]

    def _line(self, results: nagiosplugin.Results) -> str:
        if VERDICT not in results:
            return str(results.first_significant)  # a result nagiosplugin made itself
        text = str(results[VERDICT])
        broken = self._broken(results)
        if broken:
            more = len(broken) - CHECK_LISTED
            text += "; " + ", ".join(str(r) for r in broken[:CHECK_LISTED]) + (f" (and {more} more)" if more > 0
                                                                                else "")
        return text

    def ok(self, results: nagiosplugin.Results) -> str:
        return self._line(results)

    def problem(self, results: nagiosplugin.Results) -> str:
        return self._line(results)

    def verbose(self, results: nagiosplugin.Results) -> list[str]:
        out = []
        if VERDICT in results:
            mars = results[VERDICT].resource
            if isinstance(mars, Mars):
                if mars.settings is not None and mars.settings.note:
                    out.append(mars.settings.note)
                out += [f.line() for f in mars.findings]
        return out + [str(r) for r in self._broken(results)]


def _check(mars: Mars, s: Settings | None) -> nagiosplugin.Check:
    return nagiosplugin.Check(
        mars, VerdictContext(), FigureContext(COUNT), FigureContext(REST),
        FigureContext(LAG, s.lag_warning if s else None, s.lag_critical if s else None),
        FigureContext(FREE, s.free_warning if s else None, s.free_critical if s else None),
        MarsSummary(), name="MARS")


# --- the command line ----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """A monitoring plugin exits 3 (UNKNOWN) for anything that is not a check result: a wrong
    option (argparse's 2 would read CRITICAL), and ``--help`` and ``--version`` too, as the
    monitoring-plugins do, so a service definition with a typo never shows OK."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, f"see '{PROG} --help'")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise SystemExit(CHECK_UNKNOWN)


def _positive(kind: str) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {kind}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{text} is not a positive number of {kind}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG,
                description="Nagios/Icinga plugin for MARS: the status model's verdict (TODO findings are "
                            "CRITICAL, HINTs WARNING, WORK is OK, as 'mars-status --check'), with thresholds on "
                            "each member's replication lag and each node's free space in its MARS directory. "
                            "Exit code 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
                epilog=f"Ranges (monitoring-plugins syntax, [@][start:][end]): {RANGE_HELP}; '~' is minus "
                       "infinity. Sizes may carry K, M, G, T, P (binary multiples: 10G = 10737418240 bytes). "
                       "Perfdata: 'R@N lag' (s), 'R@N sync rest', 'R@N fetch rest', 'R@N replay rest' (B) per "
                       "member N of resource R, 'N free' (B) per node, and the counts resources, nodes, "
                       "nodes_alive, todo, hint, work.")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--mars-dir", default=None, help="state tree (default: $MARS_DIR or /mars)")
    p.add_argument("-H", "--host", default=None,
                   help="judge the view of this node (default: the host the tree was made for, else uname -n)")
    p.add_argument("--resource", default=None, metavar="R",
                   help="only this resource's findings and figures (and the nodes' and the cluster's)")
    p.add_argument("-t", "--timeout", type=_positive("seconds"), default=float(DEFAULT_TIMEOUT_S), metavar="S",
                   help=f"give up with UNKNOWN after S seconds, rounded up to whole seconds "
                        f"(default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--window", type=_positive("seconds"), default=None, metavar="S",
                   help=f"a node counts as alive if it reported within S seconds (default {model.ALIVE_WINDOW_S:g})")
    p.add_argument("-w", "--warning", default=None, metavar="RANGE",
                   help="replication lag of any member, in seconds, that makes it WARNING (e.g. 60)")
    p.add_argument("-c", "--critical", default=None, metavar="RANGE",
                   help="replication lag of any member, in seconds, that makes it CRITICAL (e.g. 300)")
    p.add_argument("--free-warning", default=None, metavar="RANGE",
                   help="free bytes of any node's MARS directory that make it WARNING (e.g. 20G:)")
    p.add_argument("--free-critical", default=None, metavar="RANGE",
                   help="free bytes of any node's MARS directory that make it CRITICAL (e.g. 1073741824:)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="list every finding with its remedy after the status line (perfdata on the last line)")
    return p


def settings_from(argv: list[str]) -> Settings:
    """The checked settings, or UsageError/MarsError naming what to change."""
    args = build_parser().parse_args(argv)
    mars_dir = model.mars_dir_from(args.mars_dir)
    host, note = model.default_host(mars_dir, args.host)
    if args.resource is not None:
        model.check_name("resource", args.resource)
    return Settings(
        mars_dir=str(mars_dir), host=host, resource=args.resource, window_s=args.window,
        timeout_s=max(1, math.ceil(args.timeout)),
        lag_warning=threshold(args.warning, "s", "-w"), lag_critical=threshold(args.critical, "s", "-c"),
        free_warning=threshold(args.free_warning, "B", "--free-warning"),
        free_critical=threshold(args.free_critical, "B", "--free-critical"),
        verbose=args.verbose, note=note)


def _run(mars: Mars, s: Settings | None, timeout_s: int | None = None) -> NoReturn:
    """Print the result and exit with its code (nagiosplugin's Runtime does both)."""
    _check(mars, s).main(verbose=s.verbose if s else 0, timeout=timeout_s)
    raise SystemExit(CHECK_UNKNOWN)  # not reached: Check.main exits


@nagiosplugin.guarded(verbose=0)  # type: ignore[untyped-decorator]
def main(argv: list[str] | None = None) -> NoReturn:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        s = settings_from(argv)
    except MarsError as e:
        _run(Mars(None, str(e)), None)
    try:
        _run(Mars(s), s, s.timeout_s)
    except nagiosplugin.Timeout:
        reason = (f"no result within {s.timeout_s} s (--timeout): reading {s.mars_dir} or asking marsd took too "
                  f"long; check that the file system of {s.mars_dir} answers (ls {s.mars_dir}) and marsd on "
                  f"{s.host} ('systemctl status marsd'), or give a longer --timeout")
        _run(Mars(s, reason), s)


if __name__ == "__main__":
    main()
