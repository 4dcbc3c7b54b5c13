"""marsadm help [command]: the original's spelling of ``--help``, with the very same text.

The text comes from the same parser ``marsadm --help`` and ``marsadm <command> --help`` print,
so there is one help and it cannot drift.
"""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .base import COMMANDS, Ctx, build_parser, command


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@command("help", "print the help: of marsadm (the same as --help), or of one command (as 'marsadm <command> --help')",
         ("topic", {"nargs": "?", "default": None, "metavar": "command", "help": "the command to explain"}),
         node=False)
def help_cmd(ctx: Ctx) -> None:
    parser = build_parser()
    name = ctx.args.topic
    if name is None:
        parser.print_help()
        return
    # The original's spellings, as marsadm itself reads them: force-<command>, view-<macro>.
    if name.startswith("force-") and name[len("force-"):] in COMMANDS:
        name = name[len("force-"):]
    elif name.startswith("view-") and name not in COMMANDS:
        name = "view"
    sub = _subparsers(parser).get(name)
    if sub is None:
        raise UsageError(f"unknown command {name!r}", "see 'marsadm help' for the list of commands")
    sub.print_help()


__all__ = ["help_cmd"]
