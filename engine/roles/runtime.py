"""The runtime of a resource attached on this node: one class per role, one interface for both.

marsd keeps one runtime per attached resource and drives it the same way whatever its role:
start, follow the switches every round, publish what it does, stop. The peer services ask it
the one thing they need (how much of a log file may be served from here). Nobody probes a
runtime's class or attributes to find out what it can do; what differs between the roles is
inside :class:`~mars.engine.roles.primary.PrimaryRuntime` and
:class:`~mars.engine.roles.secondary.SecondaryRuntime`. This is also the seam a role switch
(``marsadm primary``) turns on: stop one runtime, start the other.

A runtime gets everything it uses from its daemon explicitly (:class:`RuntimeDeps`): the tree,
the disk executor, how to reach a peer, the host's sync limit, and the resource's
:class:`LogPulse`, which it fires whenever its log grows here, so a peer's long-polling fetch
wakes at once instead of polling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from ..device import DataDevice
from ..ratelimit import RateLimit
from ..stats import ResourceStats
from ..tree import Tree

if TYPE_CHECKING:
    from ..nbd.server import Export
    from ..peer.link import PeerClient

log = logging.getLogger("mars.resource")

__all__ = ["Attached", "Limits", "LogPulse", "Runtime", "RuntimeDeps", "Wanted", "stop_if_stopping"]


def stop_if_stopping() -> None:
    """Raise CancelledError if the current task was asked to stop, for retry loops.

    A task that retries a failed peer link catches the link's errors. In Python 3.11 a
    cancellation that meets an operation finishing at the same moment (a connect refused at
    once, a reply arriving) can come out as that operation's result or error instead
    (``asyncio.wait_for``), and the loop would retry forever after SIGTERM. So every retry
    first asks whether a stop is pending.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class LogPulse:
    """Wakes every waiter when a resource's log grows on this node (appended or fetched).

    One per resource, owned by the daemon, so it outlives a runtime that stops and starts: a
    peer's fetch waiting for more log wakes when a runtime that started meanwhile appends. A
    fire with no waiter costs nothing; a waiter never waits past its own deadline.
    """

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def fire(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Until the next fire (True) or ``timeout`` seconds (False)."""
        if timeout <= 0:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)


@dataclass
class Limits:
    """The node's tunables as the roles use them, set anew by the daemon every round.

    One object shared by every runtime of the node and changed in place, so a value the
    operator sets is in force in the next round without a restart; the roles read the
    figures and never the tree's tunable entries (that table is the model's, a layer above).
    """

    logrot_auto: int = 0  # rotate the primary's log file past this many bytes (0: never)
    io: RateLimit = field(default_factory=RateLimit)  # replay and sync writes to the data device
    fetch_held: str | None = None  # why this node does not fetch now (the load limit), None: it may
    buffers: int = 256 << 20  # bytes of fetch replies in flight plus replay read-ahead, per resource
    fetch_floor: int = 0  # free bytes of the MARS directory a fetch must leave (below the level-4 limit)


@dataclass(frozen=True)
class RuntimeDeps:
    """What a runtime uses of its daemon: explicit, so a runtime can be built in a test without one."""

    tree: Tree
    executor: Executor
    log_pulse: LogPulse
    connect: Callable[[str], PeerClient]  # a new link to a peer host (fetch and sync sources)
    may_sync: Callable[[], bool] = lambda: True  # the host's sync limit allows one more
    checkpoint_interval: float = 1.0  # minimum seconds between device syncs that advance replay-<host>
    limits: Limits = field(default_factory=Limits)  # the node's tunables, live
    stats: ResourceStats = field(default_factory=ResourceStats)  # the resource's counters, kept across runtimes
    ended: Callable[[], None] = lambda: None  # a task of the runtime ended: the next round looks at it


@dataclass(frozen=True)
class Wanted:
    """What the operator's switches ask of a secondary this round (``todo-<host>/…``)."""

    sync: bool
    fetch: bool
    replay: bool
    level: int = 0  # this node's emergency level (0..4): how short of space its MARS directory is


class Runtime(Protocol):
    """A resource attached on this node, in one role."""

    role: ClassVar[str]  # "primary" or "secondary": the role the tree must ask for to keep it
    res: str
    device: DataDevice | None  # open while attached

    @property
    def export(self) -> Export | None:
        """What the NBD server serves for this resource now (the primary while it serves)."""

    @property
    def open_count(self) -> int:
        """NBD clients connected to this resource's export here."""

    @property
    def syncing(self) -> bool:
        """A full sync runs here now (it counts against the host's sync limit)."""

    async def start(self) -> None:
        """Open the device and start working; MarsError (and stays closed) when it cannot."""

    async def stop(self, finish: bool = False) -> None:
        """Stop working, make what was done durable, close the device. ``finish``: the role ends
        here (a primary that is no longer the designated one finishes its log)."""

    def follow(self, wanted: Wanted) -> None:
        """One reconcile round: act on the switches and on requests in the tree (log-rotate)."""

    def grow(self, size: int) -> bool:
        """The resource grew to ``size`` bytes (``marsadm resize``): work with it from now on,
        without a restart; False while this node's device is smaller than that. Never called with
        a smaller size: a resource only grows."""

    def publish(self) -> None:
        """Write this role's actual state into the tree (``actual-<host>/…``)."""

    def servable(self, name: str) -> int | None:
        """Bytes of the local log file ``name`` that peers may fetch now (durable, complete);
        None when this runtime does not write or fetch that file."""

    @property
    def writing_through(self) -> bool:
        """Emergency mode on a primary: writes go to its device, not into its log."""

    def dirty_bits(self) -> tuple[int, int, bytes] | None:
        """The dirty-region map a resync after an emergency copies (region, device size, bits);
        None where there is none (every secondary, a primary without an emergency)."""


class Attached:
    """What a runtime of either role is made of: its resource, its data device, its daemon's parts."""

    def __init__(self, deps: RuntimeDeps, res: str, data_path: str, size: int) -> None:
        self.deps = deps
        self.tree = deps.tree
        self.executor = deps.executor
        self.res = res
        self.data_path = data_path
        self.size = size
        self.device: DataDevice | None = None
        self._grow_refused = 0  # the size a grow was refused for (logged once)

    def grow(self, size: int) -> bool:
        """What both roles do when the resource grew: the new size bounds everything from now on.

        Only once this node's device has that size, though: past its end a write would silently
        extend an image file, or fail on a block device. marsadm resize checks every member's
        device first, so a refusal here means a device shrank or the size was set by hand; it is
        logged once per size, and the next round tries again (the device may grow meanwhile).
        """
        have = self.device.size() if self.device is not None else 0
        if have < size:
            if self._grow_refused != size:
                log.error("resource %s: the resource grew to %d bytes, but the data device %s has only %d; "
                          "staying at %d bytes until it is grown (lvresize, truncate -s)",
                          self.res, size, self.data_path, have, self.size)
                self._grow_refused = size
            return False
        log.info("resource %s: grown from %d to %d bytes", self.res, self.size, size)
        self.size = size
        return True

    def dirty_bits(self) -> tuple[int, int, bytes] | None:
        return None

    @property
    def writing_through(self) -> bool:
        """A primary in emergency mode: its writes go to the device, not into the log."""
        return False
