"""The command table, the shared options and the waiting that every marsadm command uses."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ... import __version__
from .. import model
from ..errors import MarsError, UsageError
from ..tree import Tree, actual, check_name, default_host, mars_dir_from, require_cluster, require_node
from ..trigger import marsd_running, poke


@dataclass(frozen=True)
class Command:
    name: str
    func: Callable[["Ctx"], None]
    help: str
    args: tuple[tuple[str, dict], ...]
    per_resource: bool  # first positional is a resource list or 'all'
    node: bool = True  # acts as a node of the cluster: --host must be one (all but creating and reading)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *args: tuple[str, dict], per_resource: bool = False, aliases: tuple[str, ...] = (),
            node: bool = True):
    def deco(func: Callable[["Ctx"], None]) -> Callable[["Ctx"], None]:
        COMMANDS[name] = Command(name, func, help + (f" (alias: {', '.join(aliases)})" if aliases else ""), args,
                                 per_resource, node)
        for alias in aliases:
            COMMANDS[alias] = Command(alias, func, f"the same as {name}: {help}", args, per_resource, node)
        return func
    return deco


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, f"see 'marsadm {self.prog.split()[-1]} --help'"
                         if " " in self.prog else "see 'marsadm --help'")


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--mars-dir", default=d(None), help="state tree (default: $MARS_DIR or /mars)")
    p.add_argument("--host", default=d(None),
                   help="act as this node (default: the host the tree was made for, else uname -n)")
    p.add_argument("--ip", default=d(None), help="this node's address for peer links")
    p.add_argument("--timeout", type=_seconds, default=d(60.0), help="seconds to wait for marsd (default 60)")
    p.add_argument("--force", "-f", action="store_true", default=d(False), help="skip safety checks (read the message first)")
    p.add_argument("--no-wait", action="store_true", default=d(False),
                   help="record the desired state and return without waiting for marsd")
    p.add_argument("--window", type=float, default=d(None), metavar="S",
                   help="for view: a node counts as alive if it reported within S seconds (default 30)")


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not zero or a positive number of seconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="marsadm", description="Operate MARS: write desired state into the tree, wait for marsd.")
    p.add_argument("--version", action="version", version=f"marsadm {__version__}")
    _global_options(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for name, cmd in sorted(COMMANDS.items()):
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        _global_options(sp, suppress=True)
        for arg, kw in cmd.args:
            sp.add_argument(arg, **kw)
    return p


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # The original's 'force-<command>' spelling means '<command> --force'.
    force_prefix = False
    for i, a in enumerate(argv):
        if a.startswith("force-") and a[len("force-"):] in COMMANDS:
            argv[i] = a[len("force-"):]
            force_prefix = True
            break
    # The original's 'view-<macro>' spelling means 'view --macro <macro>'.
    i = _command_at(parser, argv)
    if i is not None and argv[i].startswith("view-") and argv[i] not in COMMANDS and "view" in COMMANDS:
        argv[i:i + 1] = ["view", "--macro", argv[i][len("view-"):]]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        raise UsageError("no command given", "see 'marsadm --help' for the list of commands")
    args.force = args.force or force_prefix
    cmd = COMMANDS[args.command]
    mars_dir = mars_dir_from(args.mars_dir)
    host, note = default_host(mars_dir, args.host)
    ctx = Ctx(Tree(mars_dir, host), args, cmd.name)
    if note:
        ctx.say(note)
    if cmd.node:
        require_node(ctx.tree)
    try:
        if cmd.per_resource:
            for res in ctx.resource_list(args.resource):
                ctx.res = res
                cmd.func(ctx)
        else:
            cmd.func(ctx)
    finally:
        if ctx.tree.wrote:
            # marsd indexes what others write when poked (and every few seconds regardless): a
            # command that wrote, even one that failed half-way or did not wait, says so at once.
            ctx.poke()
    return 0


def _command_at(parser: argparse.ArgumentParser, argv: list[str]) -> int | None:
    """Where the command word is: the first word that is neither an option nor an option's value."""
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-"):
            return i
        i += 2 if a in takes_value else 1
    return None


class Ctx:
    """What a command works with: the tree, the parsed arguments, and helpers to wait for marsd."""

    def __init__(self, tree: Tree, args: argparse.Namespace, command: str) -> None:
        self.tree = tree
        self.args = args
        self.command = command
        self.host = tree.host
        self.res = ""

    @property
    def force(self) -> bool:
        return bool(self.args.force)

    def fail(self, what: str, remedy: str = "") -> MarsError:
        subject = f"{self.command} {self.res}" if self.res else self.command
        return MarsError(what, remedy, subject=subject)

    def say(self, text: str) -> None:
        print(f"marsadm: {text}", file=sys.stderr)

    def refuse_in_emergency(self, host: str | None, doing: str) -> None:
        """Refuse ``doing`` while ``host`` (this resource's primary, or this node) is in emergency
        mode, as the original does: a join, an invalidate or a handover then would have to start
        over once space is back, and a handover would leave the written-through blocks behind."""
        if not host:
            return
        node = model.build(self.tree.root, self.host).nodes.get(host)
        if node is not None and node.emergency and not self.force:
            raise self.fail(f"{host} is in emergency mode (its MARS directory is full), so {doing} cannot be done now",
                            f"free space on {host} ('marsadm log-delete-all all --host {host}' deletes the logs "
                            f"every member has replayed); {host} leaves emergency mode by itself, then run this again")

    def resource_list(self, spec: str) -> list[str]:
        """``all`` (every resource this host is a member of) or a comma-separated list."""
        require_cluster(self.tree)
        if spec == "all":
            out = [r for r in self.tree.resources() if self.host in self.tree.members(r)]
            if not out:
                raise MarsError(f"host {self.host} is a member of no resource", "nothing to do for 'all'",
                                subject=self.command)
            return out
        names = [check_name("resource", r) for r in spec.split(",") if r]
        if not names:
            raise UsageError("no resource given", "name a resource or 'all'")
        for r in names:
            if r not in self.tree.resources():
                known = ", ".join(self.tree.resources()) or "none"
                raise MarsError(f"resource {r} does not exist in {self.tree.root}",
                                f"the resources are: {known}; create one with 'marsadm create-resource'",
                                subject=f"{self.command} {r}")
            if self.host not in self.tree.members(r):
                raise MarsError(f"host {self.host} is not a member of resource {r}",
                                "run the command on a member host, or use --host", subject=f"{self.command} {r}")
        return names

    # -- talking to marsd ------------------------------------------------------------------------

    def marsd_pid(self) -> int | None:
        return marsd_running(self.tree.root, self.host)

    def poke(self) -> None:
        poke(self.tree.root)

    def wait(self, what: str, done: Callable[[], bool], failed: Callable[[], str | None] = lambda: None) -> None:
        """Wait until marsd made ``done()`` true, with a deadline and a progress line.

        This polls the tree, which is fine for a command-line tool (the original's LOOP phases
        did the same every second); marsd itself never polls for marsadm.
        """
        self.poke()
        if self.args.no_wait:
            return
        if done():
            return
        if self.marsd_pid() is None:
            raise self.fail(
                f"the desired state is recorded, but marsd is not running on host {self.host} to {what}",
                f"start it ('marsd --mars-dir {self.tree.root} --host {self.host}') and it will act; "
                "or pass --no-wait to only record the state")
        timeout = self.args.timeout
        start = time.monotonic()
        tty = sys.stderr.isatty()
        shown = False
        while True:
            if done():
                break
            msg = failed()
            if msg:
                if shown and tty:
                    sys.stderr.write("\n")
                raise self.fail(msg)
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                if shown and tty:
                    sys.stderr.write("\n")
                raise self.fail(f"marsd did not {what} within {timeout:g} s",
                                "look at marsd's log; raise --timeout if the host is just slow")
            if tty:
                sys.stderr.write(f"\rmarsadm: waiting for marsd to {what} ({elapsed:4.1f} s of {timeout:g} s)")
                sys.stderr.flush()
                shown = True
            elif not shown and elapsed > 1.0:
                self.say(f"waiting for marsd to {what} (up to {timeout:g} s)")
                shown = True
            time.sleep(0.05)  # a polling interval of a waiting CLI, see above
        if shown and tty:
            sys.stderr.write(f"\rmarsadm: marsd did {what} after {time.monotonic() - start:.1f} s\n")

    def actual(self, key: str, res: str | None = None) -> str | None:
        return self.tree.get(actual(res or self.res, self.host, key))

    def attach_error(self) -> str | None:
        return self.actual("msg-err-attach")


RES_ARG = ("resource", {"help": "resource name, comma-separated names, or 'all'"})

__all__ = ["command", "Ctx", "COMMANDS", "RES_ARG"]
