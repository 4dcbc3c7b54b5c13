"""Where marsd's log goes, and why a message that repeats is written once.

Three destinations, chosen on marsd's command line:

* **stderr** (the default): under systemd that is the journal already.
* **a file** (``--log-file``): :class:`ReopeningFileHandler`, a ``WatchedFileHandler`` that also
  reopens on request. Before each line it compares the path's inode with the open file's, so
  after logrotate moves the file away (its default ``create`` mode) the next line goes to a new
  file at the path, without any signal. ``copytruncate`` needs nothing either: the file is opened
  for appending. A SIGHUP (what most logrotate ``postrotate`` scripts send) makes the next line
  reopen the path unconditionally; marsd installs that handler so a SIGHUP never kills it (the
  default action of SIGHUP is to terminate). The signal handler only sets a flag: reopening a
  stream from inside a signal handler could close it under a half-written line.
* **the local syslog** (``--syslog``): ``/dev/log``, ident ``marsd``, facility daemon.

Every handler marsd writes to, the bus's included (``mars-status --debug`` shows its lines),
gets a :class:`RepeatFilter`. While a peer is down the fetcher retries every second and logs
each failure; without the filter that is 86400 identical lines a day, and the line that says
what changed drowns in them. Like syslogd, the filter passes the first of a run of identical
messages, counts the rest, and writes one ``last message repeated N times`` line when a
different message comes, and at the latest every :data:`REPEAT_FLUSH_S` seconds while the
run goes on, so a reader of the log can tell the condition persists.

DEBUG records are never collapsed: ``--log-level debug`` is switched on for a while to trace
each event with its own time stamp (every control request logs a line, the same for each poll of
one reader), and a count would hide exactly that. They still end a run, as any different message.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading

from ..errors import MarsError

#: At the latest this many seconds after a run of repeats began, its count is written.
REPEAT_FLUSH_S = 60.0
#: Where the local syslog daemon (rsyslog, systemd-journald) listens.
SYSLOG_SOCKET = "/dev/log"
LINE_FORMAT = "%(asctime)s marsd[%(process)d] %(levelname)s %(message)s"
#: syslog adds the time and host itself; the ident ``marsd`` comes first (SysLogHandler.ident).
SYSLOG_FORMAT = "[%(process)d]: %(levelname)s %(message)s"

_SUMMARY = "_mars_repeat_summary"  # marks the filter's own summary records, which always pass


def _key(record: logging.LogRecord) -> tuple[str, int, str]:
    """What makes two records "the same message": logger, level and the formatted text."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += f"\n{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return record.name, record.levelno, text


class RepeatFilter(logging.Filter):
    """Pass the first of a run of identical records to ``handler``; count the rest; summarise.

    A filter rather than a wrapping handler, so it fits any handler as it is (the bus's, a
    file's, syslog's) and the handler keeps its own level and format. The summary is a record of
    the repeated message's logger and level, handed to the same handler, so it passes the same
    level check and reaches the same place. One filter serves one handler: each destination
    counts what it itself suppressed.

    Thread-safe: marsd's disk executor logs too, and the 60 s flush runs on a timer thread. The
    lock is re-entrant because the summary passes through this filter again on its way out.
    """

    def __init__(self, handler: logging.Handler, flush_after_s: float = REPEAT_FLUSH_S,
                 collapse_from: int = logging.INFO) -> None:
        super().__init__()
        self.handler = handler
        self.flush_after_s = flush_after_s
        self.collapse_from = collapse_from  # less severe records are never collapsed (see above)
        self._lock = threading.RLock()
        self._last: tuple[str, int, str] | None = None
        self._last_record: logging.LogRecord | None = None
        self._count = 0  # identical records suppressed since the last summary
        self._timer: threading.Timer | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        key = _key(record)
        with self._lock:
            if record.levelno < self.collapse_from:
                self._flush_locked()
                self._last = self._last_record = None
                return True
            if key == self._last:
                self._count += 1
                if self._timer is None:
                    self._timer = threading.Timer(self.flush_after_s, self.flush)
                    self._timer.daemon = True  # never keeps marsd from exiting
                    self._timer.start()
                return False
            self._flush_locked()
            self._last, self._last_record = key, record
            return True

    def flush(self) -> None:
        """Write the pending count now, if any; later repeats of the same message still count."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count, self._count = self._count, 0
        last = self._last_record
        if count and last is not None:
            summary = logging.LogRecord(last.name, last.levelno, __file__, 0,
                                        "last message repeated %d times", (count,), None)
            setattr(summary, _SUMMARY, True)
            self.handler.handle(summary)


def collapse_repeats(handler: logging.Handler, flush_after_s: float = REPEAT_FLUSH_S) -> RepeatFilter:
    """Attach a :class:`RepeatFilter` to ``handler`` and return it."""
    f = RepeatFilter(handler, flush_after_s)
    handler.addFilter(f)
    return f


def flush_repeats(handler: logging.Handler) -> None:
    """Write any pending "repeated" line of ``handler`` (before it is closed or detached)."""
    for f in handler.filters:
        if isinstance(f, RepeatFilter):
            f.flush()


class ReopeningFileHandler(logging.handlers.WatchedFileHandler):
    """Append to a file; reopen it when it was moved or deleted, or when asked (SIGHUP)."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename, mode="a", encoding="utf-8")
        self._reopen = False

    def request_reopen(self) -> None:
        """Reopen the path before the next line. Safe from a signal handler: it only sets a flag."""
        self._reopen = True

    def reopenIfNeeded(self) -> None:  # called by emit() under the handler's lock
        if self._reopen:
            self._reopen = False
            if self.stream is not None:
                self.stream.flush()
                self.stream.close()
                self.stream = None  # type: ignore[assignment]
            self.stream = self._open()
            self._statstream()
            return
        super().reopenIfNeeded()


def file_handler(path: str) -> ReopeningFileHandler:
    """The ``--log-file`` handler; a path that cannot be opened is a MarsError naming it."""
    try:
        h = ReopeningFileHandler(path)
    except OSError as e:
        raise MarsError(f"cannot open log file {path}: {e.strerror or e}",
                        "create its directory, make it writable by this user, or choose another --log-file") from None
    h.setFormatter(logging.Formatter(LINE_FORMAT))
    return h


def syslog_handler(address: str = SYSLOG_SOCKET) -> logging.handlers.SysLogHandler:
    """The ``--syslog`` handler: ident marsd, facility daemon; a MarsError when no syslog listens."""
    remedy = "start the system's syslog daemon (rsyslog or systemd-journald), or use --log-file PATH instead"
    if not os.path.exists(address):
        raise MarsError(f"cannot log to syslog: {address} does not exist", remedy)
    try:
        h = logging.handlers.SysLogHandler(address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError as e:
        raise MarsError(f"cannot log to syslog at {address}: {e.strerror or e}", remedy) from None
    h.ident = "marsd"
    h.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    return h


def stderr_handler() -> logging.Handler:
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter(LINE_FORMAT))
    return h


def setup(level: str, log_file: str | None, syslog: bool) -> list[logging.Handler]:
    """Configure the root logger for marsd: each chosen destination (stderr if none), repeats collapsed.

    Raises MarsError before anything is installed when a destination cannot be opened, so marsd
    refuses to start rather than run without the log the operator asked for.
    """
    handlers: list[logging.Handler] = []
    try:
        if log_file is not None:
            handlers.append(file_handler(log_file))
        if syslog:
            handlers.append(syslog_handler())
    except MarsError:
        for h in handlers:
            h.close()
        raise
    if not handlers:
        handlers.append(stderr_handler())
    root = logging.getLogger()
    root.setLevel(level.upper())
    for h in handlers:
        collapse_repeats(h)
        root.addHandler(h)
    return handlers
