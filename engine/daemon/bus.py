"""The event bus inside marsd: state changes, findings and log lines, fanned out to local readers.

Rules, and why:

* ``publish`` never blocks and never waits for a reader. marsd's event loop also serves NBD and
  peer links; a status reader (a TUI, an exporter) must never slow a write acknowledgement.
* Every subscriber has its own bounded queue. A reader that falls ``maxsize`` events behind is
  dropped (``lagged``), and its queue gets a final ``None`` so its pump ends. Dropping one slow
  reader is better than buffering without bound or holding back the others; the reader can
  reconnect and start from a fresh snapshot.
* Events carry a ``seq`` that only grows, assigned on the event-loop thread, so a reader can tell
  order and gaps.
* Log records come from any thread (the disk executor logs too). They reach the bus through
  ``loop.call_soon_threadsafe``; the ring buffer of recent lines has its own lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections import deque
from typing import Any

from .logs import collapse_repeats, flush_repeats

RECENT_LINES = 200
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Subscription:
    """One reader's view of the bus: a queue of event dicts, ``None`` at its end."""

    def __init__(self, bus: "Bus", maxsize: int) -> None:
        self._bus = bus
        self.maxsize = maxsize
        # Unbounded on purpose: the bound is enforced in ``offer`` so the end marker always fits.
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.lagged = False
        self.closed = False

    def offer(self, event: dict[str, Any]) -> bool:
        """Queue ``event``; False (and the subscription ended) when the reader is ``maxsize`` behind."""
        if self.closed:
            return False
        if self.queue.qsize() >= self.maxsize:
            self.lagged = True
            self._end()
            return False
        self.queue.put_nowait(event)
        return True

    async def get(self) -> dict[str, Any] | None:
        """The next event, or None once the subscription ended (lagged or closed)."""
        if self.closed and self.queue.empty():
            return None
        return await self.queue.get()

    def close(self) -> None:
        """Stop receiving; pending events stay readable, then ``get`` returns None."""
        self._bus.unsubscribe(self)
        self._end()

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


class Bus:
    """Fan-out of marsd's events to any number of local subscribers, plus the recent log lines."""

    def __init__(self, recent: int = RECENT_LINES) -> None:
        self._seq = 0
        self._subs: list[Subscription] = []
        self._lines: deque[str] = deque(maxlen=recent)
        self._lines_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: BusLogHandler | None = None
        self._logger: logging.Logger | None = None

    @property
    def seq(self) -> int:
        """The seq of the newest published event (0 before the first)."""
        return self._seq

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that owns the bus: ``publish_threadsafe`` hands events to it."""
        self._loop = loop

    # -- events ---------------------------------------------------------------------------------

    def publish(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Deliver one event to every subscriber now. Event-loop thread only; never blocks."""
        self._seq += 1
        event = {"seq": self._seq, "kind": kind, **fields}
        for sub in list(self._subs):
            if not sub.offer(event):
                self.unsubscribe(sub)
        return event

    def publish_threadsafe(self, kind: str, **fields: Any) -> None:
        """``publish`` from any thread; silently nothing when no loop runs (start-up, shutdown)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(functools.partial(self.publish, kind, **fields))
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        try:
            self._subs.remove(sub)
        except ValueError:
            pass

    # -- log lines ------------------------------------------------------------------------------

    def remember(self, line: str) -> None:
        with self._lines_lock:
            self._lines.append(line)

    def recent_lines(self) -> list[str]:
        """The last log lines, oldest first: the snapshot's ``debug_lines``."""
        with self._lines_lock:
            return list(self._lines)

    def attach_logging(self, logger: logging.Logger) -> None:
        """Feed ``logger``'s records (and its children's) into the bus."""
        self.detach_logging()
        self._handler = BusLogHandler(self)
        # The same collapsing of repeats as marsd's own log: a peer down for an hour is one line
        # and a count in mars-status --debug, not the ring buffer full of one message.
        collapse_repeats(self._handler)
        self._logger = logger
        logger.addHandler(self._handler)

    def detach_logging(self) -> None:
        if self._handler is not None and self._logger is not None:
            flush_repeats(self._handler)
            self._logger.removeHandler(self._handler)
        self._handler = self._logger = None


class BusLogHandler(logging.Handler):
    """A logging handler that keeps each line in the bus's ring buffer and publishes a ``log`` event.

    It always goes through ``publish_threadsafe``, even on the loop thread: a record logged while
    the bus is delivering an event then cannot re-enter ``publish``.
    """

    def __init__(self, bus: Bus, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.bus = bus
        self.setFormatter(logging.Formatter(LINE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.bus.remember(self.format(record))
            self.bus.publish_threadsafe("log", level=record.levelname, logger=record.name,
                                        text=record.getMessage(), time_s=record.created)
        except Exception:
            self.handleError(record)
