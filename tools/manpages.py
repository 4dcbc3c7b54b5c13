"""Generate the man pages of marsd(8), marsadm(8), mars-status(1) and mars-exporter(8) from their parsers.

Why generated: the parsers are the truth about every option and command; a hand-written page
would drift from them. argparse-manpage (PyPI) turns a parser into roff, subcommands included;
this script adds what no parser knows (signals, exit codes, files, see also) and makes the
output reproducible, so the checked-in pages in man/ can be compared with a fresh run
(tests/test_manpages.py):

* the date is :data:`DATE`, not today's (bump it when releasing);
* help text is wrapped at 80 columns whatever the terminal (argparse reads ``$COLUMNS``);
* the pages depend on the Python that runs this: argparse's wording changed in 3.13, so use the
  project's venv (Debian 12's Python 3.11), as ``make`` does.

Usage: ``.venv/bin/python tools/manpages.py`` rewrites man/; ``--check`` only reports stale pages
(exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argparse_manpage.manpage import Manpage

from mars import __version__

ROOT = Path(__file__).resolve().parent.parent
MAN_DIR = ROOT / "man"
#: The pages' date (.TH): fixed, so a regeneration is byte-identical. Bump it with a release.
DATE = "2026-12-01"
COLUMNS = "80"


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line read as a request."""
    out = []
    for line in text.replace("\\", "\\\\").replace("-", "\\-").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def items(*pairs: tuple[str, str]) -> str:
    """A tagged list (.TP): each term in bold, its text below."""
    return "\n".join(f".TP\n\\fB{roff(term)}\\fR\n{roff(text)}" for term, text in pairs)


def _marsd_parser() -> argparse.ArgumentParser:
    from mars.engine.daemon.marsd import build_parser
    return build_parser()


def _marsadm_parser() -> argparse.ArgumentParser:
    """marsadm's parser, without the global options repeated under each of its ~40 commands.

    Every command accepts them (after the command word too), but listing seven options forty
    times would bury each command's own arguments; the page says so once instead.
    """
    from mars.engine.marsadm.base import build_parser
    p = build_parser()
    for group in p._action_groups:
        for action in group._group_actions:
            if isinstance(action, argparse._SubParsersAction):
                group.title = "commands"  # the only positional is the command word
                for sub in action.choices.values():
                    sub.description = None  # the same text as its help, which the page shows
                    for a in sub._actions:
                        if a.option_strings and "--help" not in a.option_strings:
                            a.help = argparse.SUPPRESS
    return p


def _status_parser() -> argparse.ArgumentParser:
    from mars.status.cli import build_parser
    return build_parser()


def _exporter_parser() -> argparse.ArgumentParser:
    from mars.exporters.prometheus import parser
    return parser()


PAGE_NAMES = (("marsd", 8), ("marsadm", 8), ("mars-status", 1), ("mars-exporter", 8))


def see_also(prog: str) -> str:
    return ",\n".join(f".BR {roff(p)} ({n})" for p, n in PAGE_NAMES if p != prog)


@dataclass(frozen=True)
class Page:
    prog: str
    section: int
    summary: str  # the NAME line's "prog - summary"
    parser: Callable[[], argparse.ArgumentParser]
    sections: tuple[tuple[str, str], ...]  # (heading, roff content), after the options

    @property
    def filename(self) -> str:
        return f"{self.prog}.{self.section}"


PAGES = (
    Page("marsd", 8, "the MARS replication daemon", _marsd_parser, (
        ("signals", items(
            ("SIGTERM, SIGINT", "stop in order: drain in-flight writes, sync the data devices, record the "
                                "replay positions, then exit 0"),
            ("SIGHUP", "reopen the --log-file path (for logrotate's postrotate); otherwise ignored"),
            ("SIGUSR1", "write every task of the event loop and where it waits into the log"))),
        ("logging", roff(
            "Without --log-file or --syslog the log goes to stderr (under systemd: the journal). "
            "A --log-file is reopened by itself when logrotate moved it away, and on SIGHUP. "
            "A message at level info or above that repeats (same logger, level and text) is written "
            "once; while it repeats "
            "nothing more, and when a different message comes, or at the latest every 60 seconds, one "
            "line 'last message repeated N times'. The same holds for the lines mars-status --debug "
            "shows.")),
        ("files", items(
            ("/mars", "the state tree (--mars-dir, $MARS_DIR): a tree of symlinks, one per entry"),
            ("<mars-dir>/nbd.sock", "the NBD export of every attached resource, as a unix socket"),
            ("/etc/systemd/system/marsd.service", "the unit that runs marsd on boot"))),
        ("environment", items(("MARS_DIR", "the state tree when --mars-dir is not given"))),
    )),
    Page("marsadm", 8, "operate MARS block replication", _marsadm_parser, (
        ("global options", roff(
            "The options above (--mars-dir, --host, --ip, --timeout, --force, --no-wait, --window) "
            "are accepted after the command word too. 'force-<command>' is '<command> --force'; "
            "'view-<macro>' is 'view --macro <macro>'.")),
        ("exit status", items(("0", "done"), ("1", "refused or failed; the one-line message names the remedy"),
                              ("2", "a wrong command line"))),
        ("environment", items(("MARS_DIR", "the state tree when --mars-dir is not given"))),
    )),
    Page("mars-status", 1, "show the state of a MARS cluster", _status_parser, (
        ("exit status", items(("0", "OK: nothing to do"), ("1", "hints only"), ("2", "something to do (TODO)"),
                              ("3", "the state cannot be read, or a wrong command line"))),
        ("environment", items(("MARS_DIR", "the state tree when --mars-dir is not given"))),
    )),
    Page("mars-exporter", 8, "serve MARS status to Prometheus", _exporter_parser, (
        ("http", roff(
            "GET /metrics answers in the Prometheus text format 0.0.4, or in OpenMetrics 1.0.0 when the "
            "Accept header asks for it (Prometheus does). Every other path answers 404. Each scrape reads "
            "the state once; a state that cannot be read still answers 200, with mars_snapshot_ok 0 and the "
            "reason in mars_snapshot_error_info. The metrics are listed in exporters/README.md.")),
        ("exit status", items(("0", "stopped by SIGTERM or SIGINT, or --once/--metrics-doc done"),
                              ("1", "cannot listen on the address"), ("2", "a wrong command line"))),
        ("files", items(("/etc/systemd/system/mars-exporter.service", "the unit that runs it on boot"))),
        ("environment", items(("MARS_DIR", "the state tree when --mars-dir is not given"))),
    )),
)


def render(page: Page) -> str:
    """One page as roff text."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        parser = page.parser()
        m = Manpage(parser, format="single-commands-section" if page.prog == "marsadm" else "pretty")
        m.section = page.section
        m.date = DATE
        m.source = f"mars-replication {__version__}"
        m.manual = "MARS"
        m.description = page.summary
        for heading, content in page.sections:
            m.add_section(heading, ">", content)
        m.add_section("see also", ">", see_also(page.prog))
        return str(m)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def stale(man_dir: Path = MAN_DIR) -> list[str]:
    """The pages in ``man_dir`` that differ from a fresh rendering (or are missing)."""
    out = []
    for page in PAGES:
        f = man_dir / page.filename
        if not f.exists() or f.read_text() != render(page):
            out.append(page.filename)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="manpages.py", description="Generate MARS's man pages into man/.")
    ap.add_argument("--check", action="store_true", help="only report stale pages (exit 1 if any)")
    ap.add_argument("--out", type=Path, default=MAN_DIR, help="where the pages go (default: man/)")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale(args.out)
        for name in bad:
            print(f"manpages.py: {args.out / name} is stale; run '.venv/bin/python tools/manpages.py'",
                  file=sys.stderr)
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for page in PAGES:
        (args.out / page.filename).write_text(render(page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
