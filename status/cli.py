"""``mars-status``: the status display, its plain-text face and the monitor function.

Exit codes are an API (the original's monitor function, seed §4.2, with Nagios semantics so a
cron job, a mail report and ``check_mars``-style callers all read the same verdict):

* 0 OK — no TODO and no HINT finding;
* 1 WARNING — HINT findings only;
* 2 CRITICAL — at least one TODO finding;
* 3 UNKNOWN — the state cannot be read (no tree, no cluster, permission denied, unknown resource,
  a wrong command line). The reason and its remedy are printed as ``MARS UNKNOWN - <what>; <remedy>``.

Three ways to run, one rendering (:mod:`.render`):

* ``--check``: only the one-line verdict, then exit with its code;
* not a terminal, or ``--once``: the whole display as plain text, once, exit code as above;
* a terminal: the Textual app, refreshed every ``--interval`` seconds.

Only :func:`main` prints errors and chooses exit codes; it never shows a traceback for an
operator's or the environment's failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .. import __version__
from ..engine import model
from ..engine.model import Finding, MarsError, UsageError, check_name, findings, mars_dir_from
from .render import VIEWS, Options, check, plain, relevant, render

EXIT_UNKNOWN = 3


class _Parser(argparse.ArgumentParser):
    """A wrong command line is UNKNOWN (3) for a monitor, not argparse's 2 (which reads CRITICAL)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, "see 'mars-status --help'")


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mars-status",
                description="Show the state of the MARS cluster as every node reported it, with WORK/TODO/HINT "
                            "verdicts. Read-only. Exit code: 0 OK, 1 hints, 2 something to do, 3 state unreadable.")
    p.add_argument("--version", action="version", version=f"mars-status {__version__}")
    p.add_argument("--mars-dir", default=None, help="state tree (default: $MARS_DIR or /mars)")
    p.add_argument("--host", default=None,
                   help="show the view of this node (default: the host the tree was made for, else uname -n)")
    p.add_argument("--resource", default=None, metavar="R", help="limit the display to one resource")
    p.add_argument("--interval", type=_positive, default=2.0, metavar="S",
                   help="refresh every S seconds on a terminal (default 2)")
    for view, text in (("history", "log files, their versions per node, replay and verify state"),
                       ("system", "per node: tunables set and in use, clock difference, free space, peer port"),
                       ("status", "progress bars for resize, sync, fetch and replay"),
                       ("debug", "marsd's debug lines and every node's messages per resource")):
        p.add_argument(f"--{view}", action="store_true", help=f"add the {view} block: {text}")
    p.add_argument("--ascii", action="store_true", help="no box-drawing or block characters")
    p.add_argument("--once", action="store_true", help="print the display once as plain text, even on a terminal")
    p.add_argument("--check", action="store_true",
                   help="print only the one-line verdict (Nagios style, perfdata after '|') and exit with its code")
    p.add_argument("--window", type=_positive, default=None, metavar="S",
                   help=f"a node counts as alive if it reported within S seconds (default {model.ALIVE_WINDOW_S:g})")
    return p


def options_from(args: argparse.Namespace, width: int = 100) -> Options:
    return Options(views=frozenset(v for v in VIEWS if getattr(args, v)), resource=args.resource,
                   ascii=args.ascii, width=width)


def _run_app(mars_dir: Path, host: str, opts: Options, interval: float, window_s: float | None) -> int:
    """The Textual app on a terminal (imported here: ``--check`` and plain text need no Textual)."""
    from .app import MarsStatusApp

    app = MarsStatusApp(mars_dir, host, options=opts, interval=interval, window_s=window_s)
    app.run()
    code = getattr(app, "return_code", 0)
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        mars_dir = mars_dir_from(args.mars_dir)
        host, note = model.default_host(mars_dir, args.host)
        if note:
            print(f"mars-status: {note}", file=sys.stderr)
        if args.resource is not None:
            check_name("resource", args.resource)
        tty = sys.stdout.isatty()
        # Read once before anything else: an unreadable state is UNKNOWN on a terminal too.
        snap, _answered = model.read_snapshot(mars_dir, host, args.window)
        if args.resource is not None:
            snap.require_resource(args.resource)
        if tty and not (args.once or args.check):
            width = shutil.get_terminal_size((100, 24)).columns
            return _run_app(mars_dir, host, options_from(args, width), args.interval, args.window)
        fs: list[Finding] = relevant(findings(snap), args.resource)
        code, line = check(snap, fs)
        if args.check:
            print(line)
            return code
        width = shutil.get_terminal_size((100, 24)).columns if tty else 100
        sys.stdout.write(plain(render(snap, fs, options_from(args, width))))
        print(line)  # the monitor's verdict last (seed §4.2): a mail report or cron log ends with it
        return code
    except MarsError as e:
        code, line = check(None, [], str(e))
        print(line)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mars-status | head`: the reader has all it wanted; no traceback, no second error on exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


__all__ = ["EXIT_UNKNOWN", "build_parser", "main", "options_from"]
