"""Errors an operator can act on.

Every failure that is the operator's or the environment's doing (a wrong argument, a missing
device, a damaged log, marsd not running) is a ``MarsError`` carrying *what* is wrong and the
*remedy*. Only the command-line entry points turn it into text and an exit code; everything
below them raises. Any other exception is a bug and may show its traceback.
"""

from __future__ import annotations


class MarsError(Exception):
    """A failure with a remedy: printed as ``<prog>: <subject>: <what>; <remedy>``."""

    exit_code = 1

    def __init__(self, what: str, remedy: str = "", subject: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.remedy = remedy
        self.subject = subject

    def __str__(self) -> str:
        text = f"{self.subject}: {self.what}" if self.subject else self.what
        return f"{text}; {self.remedy}" if self.remedy else text


class UsageError(MarsError):
    """The command line itself is wrong; exit code 2 as for any Unix tool (the original exited 0)."""

    exit_code = 2
