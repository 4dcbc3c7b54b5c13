"""marsd: the per-host daemon. Reconciles the tree's desired state into running resources.

The loop is level-triggered, like the original's main round: every round (on a trigger from
marsadm, or every ``--interval`` seconds) it compares what ``todo-<host>/*`` and ``primary`` ask for
with what runs, starts or stops resource runtimes accordingly, and writes what it actually does
back into ``actual-<host>/*``. Being level-triggered, a lost trigger or a crash in the middle of a
change costs one round, never a wrong state.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ... import __version__
from ..credentials import client_context, cluster_fingerprint, ensure_node_cert, nbd_server_context, server_context
from ..errors import MarsError, UsageError
from ..log.files import deletable_logs, delete_logs, list_logs, read_replay
from ..log.recovery import LogDamage
from ..log.values import ReplayCode
from ..model import tunables as tun
from ..model.units import human_bytes
from ..nbd.protocol import TLS_MODES
from ..nbd.psk import add_psk, load_psk_file
from ..nbd.server import Export, NbdSession
from ..peer import protocol as P
from ..peer.link import DEFAULT_PORT, PeerClient, PeerError, PeerServer
from ..peer.services import PeerServices
from ..ratelimit import Traffic
from ..roles.primary import PrimaryRuntime
from ..roles.runtime import Limits, LogPulse, Runtime, RuntimeDeps, Wanted
from ..roles.secondary import SecondaryRuntime
from ..stats import Stats
from ..tree import Tree, actual, default_host, mars_dir_from, node_actual, nodes_of, res_dir, todo
from ..trigger import TRIGGER_NAME, take_lock
from . import logs
from .bus import Bus
from .control import ControlServer
from .exchange import Exchange

log = logging.getLogger("mars.marsd")

NBD_SOCKET = "nbd.sock"
#: How often a node reports (actual-<host>/time): every REPORT_ROUNDS rounds, at most every
#: REPORT_MAX_S. The report is how every node tells that this one is alive; the faces' alive
#: window (30 s by default, ALIVE_WINDOW_S) holds ten of them at the default --interval 1 (a
#: report every 3 s). A report costs each peer one entry in one feed frame, never relayed to a
#: node that reaches this one. Tests run --interval 0.2 (a report every 0.6 s) with faces of
#: --window 2: a report each second left live nodes down now and then on a loaded machine.
REPORT_ROUNDS = 3
REPORT_MAX_S = 5.0
#: A peer not heard from in order for this many of our report periods is pulled (exchange.py).
SILENT_REPORTS = 3
#: A round with nothing new (no trigger, no change of the tree but reports, no I/O of any resource)
#: skips the resources; one in this many seconds goes through them all the same.
QUIET_FULL_S = 5.0
#: The runtime for each role a member can have; ``reconcile`` starts the one the tree asks for.
#: logdel-auto deletes a resource's replayed logs at most this often (a file rotated meanwhile
#: waits for every member's replay anyway; every round would only re-read the replay entries).
LOGDEL_S = 10.0
#: A fetch held by the load limit resumes once the load is below this share of the limit: a
#: load hovering at the limit would otherwise connect and disconnect every round.
LOAD_RESUME = 0.9
RUNTIMES: dict[str, type[PrimaryRuntime] | type[SecondaryRuntime]] = {"primary": PrimaryRuntime,
                                                                      "secondary": SecondaryRuntime}


class Daemon:
    """One host's marsd: the reconcile loop over every resource of the tree, and the sockets.

    It owns the runtimes (one per attached resource, in the role the tree asks for), the peer
    links, the NBD server and the control socket, and it is the only one that starts or stops a
    runtime. Everything a runtime or the peer services need from it is passed explicitly
    (:class:`~mars.engine.roles.runtime.RuntimeDeps`, the services' callbacks).
    """

    def __init__(self, tree: Tree, nbd_listen: list[tuple[str, int]], interval: float,
                 checkpoint_interval: float, port: int = DEFAULT_PORT, ip: str | None = None,
                 logrot_auto: int = 0, nbd_tls: str = "off", nbd_tls_names: tuple[str, ...] = (),
                 nbd_psk: dict[str, bytes] | None = None) -> None:
        self.tree = tree
        self.host = tree.host
        self.port = port
        self.ip = ip or tree.get(f"ips/ip-{tree.host}") or "127.0.0.1"
        self.peer_server: PeerServer | None = None
        self._triggered = False  # marsadm changed the tree since the last round
        self._reported = 0.0  # monotonic time of the last report (actual-<host>/time)
        self._status_digest = -1  # the tree's digest as of the last status refresh
        self._quiet: tuple[int, tuple, float] = (-1, (), 0.0)  # digest, activity, time of the last full round
        self._ended = False  # a runtime's task ended since the last full round
        self._waiting_noted = False
        self.logrot_default = logrot_auto  # --logrot-auto: in force while the tree sets none
        self.limits = Limits(logrot_auto=logrot_auto)  # the tunables the runtimes read, set every round
        self.traffic = Traffic()  # the node's peer-link limits, shared by every fetch, sync and serving link
        self._logdel_at: dict[str, float] = {}  # resource -> monotonic time of its last logdel-auto look
        self._total_space = 0
        self.nbd_listen = nbd_listen
        self.nbd_tls = nbd_tls  # for the TCP exports only; the unix socket is local and root only
        self.nbd_tls_names = nbd_tls_names
        self.nbd_psk = nbd_psk  # identity -> key, accepted beside the X.509 client certificates
        self.interval = interval
        self.checkpoint_interval = checkpoint_interval
        self.report_s = report_period(interval)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="marsd-io")
        self.runtimes: dict[str, Runtime] = {}
        self.pulses: dict[str, LogPulse] = {}  # per resource; outlives its runtimes (see LogPulse)
        # A resource whose start failed is not retried until its attach entry changes (a new
        # 'marsadm attach/up'): retrying a damaged log every round would only repeat the error.
        self.failed: dict[str, tuple[int, str]] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self.exchange = Exchange(tree, self.executor, self.client_for, self._wake.set, self.report,
                                 silent_s=SILENT_REPORTS * self.report_s)
        self.services = PeerServices(tree, self.executor, self.runtimes.get, self.log_pulse, self.exchange)
        self.emergency = 0  # the emergency level, 0..4 (see _space_level)
        self.bus = Bus()
        self.stats = Stats()  # counters since this marsd started, served beside the snapshot
        self.control = ControlServer(tree.root, self.host, self.bus, self.executor, counters=self.counters,
                                     version=lambda: self.exchange.index.seq)

    def counters(self) -> dict:
        """What the control socket serves as counters: the resources' and the tree exchange's."""
        return {**self.stats.to_json(), "exchange": self.exchange.counters.to_json()}

    def exports(self) -> dict[str, Export]:
        return {name: export for name, rt in self.runtimes.items() if (export := rt.export) is not None}

    def log_pulse(self, res: str) -> LogPulse:
        return self.pulses.setdefault(res, LogPulse())

    def hello(self) -> P.Hello:
        return P.Hello(host=self.host, cluster=self.tree.get("uuid") or "", proto=P.PROTO_VERSION,
                       lamport_ns=self.tree.clock.now())

    def client_for(self, host: str, bulk: bool = False) -> PeerClient:
        """A new link to ``host`` at the address the tree knows for it; ``bulk``: a fetch or sync
        link, whose incoming bytes count against the traffic-in-limit (the tree exchange's do not)."""
        ip = self.tree.get(f"ips/ip-{host}")
        if ip is None:
            raise PeerError(f"no address known for host {host}", "it has not joined the cluster")
        return PeerClient(ip, self.port, self.hello(), client_context(self.tree.root, self.host),
                          self.tree.get("uuid"), local_ip=self.ip, traffic=self.traffic if bulk else None)

    def bulk_client_for(self, host: str) -> PeerClient:
        return self.client_for(host, bulk=True)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._log_tasks)
        await self.exchange.load()
        # What the tree says about this node is stale after a crash: nothing runs yet. Say so
        # before the sockets appear, so nobody acts on the last life's state.
        for res in self.tree.resources():
            if self.tree.get(f"{res_dir(res)}/data-{self.host}") is not None:
                self._publish(res)
        self.bus.bind(loop)
        self.bus.attach_logging(logging.getLogger("mars"))
        self._open_trigger(loop)
        await self.control.start()
        # Peers first: the NBD socket is what tells a waiting operator (or test) that marsd is up,
        # so when it appears a 'join-cluster' against this node must already connect.
        await self._open_peers()
        await self._open_nbd(loop)
        self.tree.set(node_actual(self.host, "alive"), 1, durable=False)
        log.info("marsd %s on host %s started, tree %s", __version__, self.host, self.tree.root)
        try:
            while not self._stop.is_set():
                # Cleared first: whatever wakes it during this round (a trigger, a peer's change)
                # makes the next round start at once instead of being lost.
                woken = self._wake.is_set()
                self._wake.clear()
                triggered, self._triggered = self._triggered, False
                due = self.exchange.scan_due()
                if triggered or due is not None:
                    await self.exchange.scan(full=triggered or bool(due))  # others' writes, pushed with ours
                if triggered:
                    # After a command every node reports afresh, this one and (asked by the pulls)
                    # the peers: 'wait-cluster' and a handover wait for that.
                    self.report()
                self.exchange.start_pulls(fresh=triggered)
                if time.monotonic() - self._reported >= self.report_s * 0.9:
                    self.report()
                self.exchange.feed()  # the report and what the scan found, before the resources' work
                self.apply_tunables()  # what the operator set, in force this round
                await self.reconcile(full=triggered or woken or self._moved())
                self.exchange.feed()  # what the round changed
                digest = self.exchange.index.digest
                await self.control.refresh(changed=digest != self._status_digest)
                self._status_digest = digest
                waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._stop.wait())]
                await asyncio.wait(waits, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            await self.shutdown()

    def _log_tasks(self) -> None:
        """SIGUSR1: every asyncio task and where it waits, into the log (for a marsd that hangs)."""
        lines = []
        for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
            out = io.StringIO()
            task.print_stack(limit=8, file=out)
            lines.append(out.getvalue().rstrip())
        log.warning("SIGUSR1: %d tasks\n%s", len(lines), "\n".join(lines))

    async def shutdown(self) -> None:
        await self.control.close()
        for s in self._servers:
            s.close()
        if self.peer_server is not None:
            await self.peer_server.close()
        await self.exchange.close()
        for name in list(self.runtimes):
            await self._stop_resource(name)
        self.services.close()
        self.tree.set(node_actual(self.host, "alive"), 0, durable=False)
        for n in (NBD_SOCKET, TRIGGER_NAME):
            try:
                os.unlink(self.tree.root / n)
            except FileNotFoundError:
                pass
        self.executor.shutdown(wait=True)
        log.info("marsd on host %s stopped", self.host)
        self.bus.detach_logging()

    # -- sockets -------------------------------------------------------------------------------

    def _open_trigger(self, loop: asyncio.AbstractEventLoop) -> None:
        path = self.tree.root / TRIGGER_NAME
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.setblocking(False)

        def readable() -> None:
            try:
                while sock.recv(64):
                    pass
            except BlockingIOError:
                pass
            self._triggered = True
            self._wake.set()

        loop.add_reader(sock.fileno(), readable)

    async def _open_nbd(self, loop: asyncio.AbstractEventLoop) -> None:
        path = self.tree.root / NBD_SOCKET
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._servers.append(await loop.create_unix_server(
            lambda: NbdSession(self.exports, f"unix:{path}"), str(path)))
        os.chmod(path, 0o600)
        tls = None
        if self.nbd_tls != "off" and not self.nbd_listen:
            log.warning("--nbd-tls %s without --nbd-listen: the unix socket is always plain, so TLS is not used",
                        self.nbd_tls)
        if self.nbd_tls != "off" and self.nbd_listen:
            names = self.nbd_cert_names()
            tls = nbd_server_context(self.tree.root, self.host, names)
            if self.nbd_psk:
                add_psk(tls, self.nbd_psk)
        for host, port in self.nbd_listen:
            self._servers.append(await loop.create_server(
                lambda: NbdSession(self.exports, "tcp", tls, self.nbd_tls if tls else "off"), host, port,
                reuse_address=True))
            how = {"off": "plain text", "on": "TLS offered, plain text allowed",
                   "require": "TLS required"}[self.nbd_tls if tls else "off"]
            log.info("NBD exports on tcp %s:%d (%s%s%s)", host, port, how,
                     f", certificate for {', '.join(names)}" if tls else "",
                     f", PSK for {len(self.nbd_psk)} identities" if tls and self.nbd_psk else "")

    def nbd_cert_names(self) -> list[str]:
        """What the NBD certificate names: this node, the addresses it listens on (a wildcard
        stands for none in particular, so this node's peer address instead), --nbd-tls-name."""
        names = [self.host, self.ip]
        for host, _ in self.nbd_listen:
            try:
                if ipaddress.ip_address(host).is_unspecified:
                    continue
            except ValueError:
                pass
            names.append(host)
        return list(dict.fromkeys([*names, *self.nbd_tls_names]))

    # -- reconciliation ------------------------------------------------------------------------

    async def _open_peers(self) -> None:
        ensure_node_cert(self.tree.root, self.host)
        self.peer_server = PeerServer(self.hello, server_context(self.tree.root, self.host),
                                      self.tree.get("uuid") or "", self.services.handle, traffic=self.traffic)
        try:
            await self.peer_server.start(self.ip, self.port)
        except OSError as e:
            raise MarsError(f"cannot listen for peers on {self.ip}:{self.port}: {e.strerror}",
                            "another process holds that address; stop it or use another --ip/--port") from None
        log.info("peer links on %s:%d (TLS, cluster CA %s)", self.ip, self.port,
                 cluster_fingerprint(self.tree.root))

    def _task_ended(self) -> None:
        self._ended = True

    def _moved(self) -> bool:
        """Whether anything happened since the last full round: the tree changed (more than the
        reports and the figures for the faces: ``round_digest``), a resource did I/O, or
        QUIET_FULL_S passed. An idle node then costs a round
        of its pulls, not a pass over every resource, and what the resources publish (positions,
        rates) is as fresh as ever while they move."""
        digest, activity, at = self._quiet
        return (self._ended or self.exchange.index.round_digest != digest or self.stats.activity() != activity
                or time.monotonic() - at >= QUIET_FULL_S)

    async def reconcile(self, full: bool = True) -> None:
        tree = self.tree
        if not full:
            return
        self._ended = False
        level = self._space_level(*self._publish_node())
        wanted: dict[str, tuple[str, int, str]] = {}
        for res in tree.resources():
            d = res_dir(res)
            data = tree.get(f"{d}/data-{self.host}")
            if data is None:
                continue
            attach = tree.entry(todo(res, self.host, "attach"))
            if attach is None or attach.deleted or attach.value != "1":
                continue
            if res in self.failed and self.failed[res][0] == attach.stamp_ns:
                continue
            role = "primary" if tree.get(f"{d}/primary") == self.host else "secondary"
            wanted[res] = (data, tree.get_int(f"{d}/size"), role)
        members = {res for res in tree.resources() if tree.get(f"{res_dir(res)}/data-{self.host}") is not None}
        self.stats.keep(members | set(self.runtimes))
        for res in list(self.runtimes):
            w = wanted.get(res)
            rt = self.runtimes[res]
            if w is None or w[2] != rt.role:
                # A primary that is no longer the designated one finishes its history here; one
                # that is only detached goes on with it when attached again.
                demoted = rt.role == "primary" and tree.get(f"{res_dir(res)}/primary") != self.host
                await self._stop_resource(res, finish=demoted, switching=w is not None)
        for res, (data, size, role) in wanted.items():
            rt = self.runtimes.get(res)
            if rt is None:
                if role == "primary" and not self._peers_heard():
                    continue
                await self._start_resource(res, data, size, role)
                rt = self.runtimes.get(res)
            if rt is not None and size > rt.size:
                rt.grow(size)  # marsadm resize: no restart, the runtime takes the new size
            if rt is not None:
                on = {s: tree.get(todo(res, self.host, s)) == "1" for s in ("sync", "connect", "allow-replay")}
                # Emergency levels (the original's order): 3 stops syncs, 4 stops fetching here.
                rt.follow(Wanted(sync=on["sync"] and level < 3, fetch=on["connect"] and level < 4,
                                 replay=on["allow-replay"], level=level))
        for res in tree.resources():
            if tree.get(f"{res_dir(res)}/data-{self.host}") is not None:
                self._publish(res)
                self._delete_replayed_logs(res)
                self._logdel_auto(res)
        self._quiet = (self.exchange.index.round_digest, self.stats.activity(), time.monotonic())

    def _space_level(self, rest: int, total: int) -> int:
        """This node's emergency level (0..4) from the free space of its MARS directory against
        its four free-space limits, published as ``actual-<host>/emergency``.

        Up at once, down one level per round (the original's mars_reset_emergency): a primary
        that writes through logs again only after the whole of the four steps is free, so it
        does not flap between the two at the edge. A primary that met ENOSPC itself (limits set
        too low) is at level 4 whatever statvfs says, until the space is back.
        """
        limits = tun.space_limits(self.tree, self.host, total)
        # A fetch may take the directory into level 4 (the round then stops it), not to ENOSPC.
        self.limits.fetch_floor = max(limits[3] // 8, 1 << 20) if limits[3] else 0
        raw = tun.space_level(rest, limits)
        if any(rt.writing_through for rt in self.runtimes.values()) and rest < tun.writethrough_margin(total):
            raw = 4  # writing through since an ENOSPC with limits too low to tell: stay until there is room
        level = raw if raw >= self.emergency else self.emergency - 1
        if level != self.emergency:
            texts = {0: "left emergency mode: free space is back", 1: "space in the MARS directory is becoming low",
                     2: "space is low: deleting replayed log files on secondaries",
                     3: "space is VERY low: syncs stop", 4: "DISK SPACE IS EXTREMELY LOW: primaries write through, "
                                                              "secondaries stop fetching"}
            (log.error if level >= 3 else log.warning if level else log.info)(
                "emergency level %d (%s free of %s in %s): %s", level, human_bytes(rest), human_bytes(total),
                self.tree.root, texts[level])
        self.emergency = level
        t, h = self.tree, self.host
        t.set(node_actual(h, "emergency"), level, durable=False)
        t.set(node_actual(h, "emergency-limits"), ",".join(str(x) for x in limits), durable=False)
        return level

    def _delete_replayed_logs(self, res: str) -> None:
        """Follow a cluster-wide log-delete: drop local logs below the mark that we have replayed."""
        below = self.tree.get_int(f"{res_dir(res)}/logs-deleted-below")
        if not below:
            return
        mine = read_replay(self.tree, res, self.host)
        if mine is None:
            return
        for f in list_logs(self.tree, res):
            if f.seq < below and f.seq < mine.seq:
                try:
                    f.path.unlink()
                    log.info("resource %s: deleted %s (replayed everywhere)", res, f.name)
                except FileNotFoundError:
                    pass

    def _logdel_auto(self, res: str) -> None:
        """logdel-auto: the serving primary deletes what every member has replayed, as
        'marsadm log-delete' would (the members follow the mark as after that command)."""
        rt = self.runtimes.get(res)
        if rt is None or rt.export is None or not tun.value(self.tree, self.host, "logdel-auto"):
            return
        now = time.monotonic()
        if now - self._logdel_at.get(res, 0.0) < LOGDEL_S:
            return
        self._logdel_at[res] = now
        files = deletable_logs(self.tree, res)
        if files:
            freed = delete_logs(self.tree, res, files)
            log.info("resource %s: logdel-auto deleted %s (%s; replayed by every member)", res,
                     ", ".join(f.name for f in files), human_bytes(freed))

    def apply_tunables(self) -> None:
        """The tree's tunables for this host into what runs, every round: no restart needed."""
        t, h = self.tree, self.host
        lim = self.limits
        rot = tun.set_value(t, h, "logrot-auto")
        lim.logrot_auto = int(rot if rot is not None else self.logrot_default)
        self.traffic.out.set_rate(tun.value(t, h, "traffic-out-limit") or 0)
        self.traffic.inn.set_rate(tun.value(t, h, "traffic-in-limit") or 0)
        lim.io.set_rate(tun.value(t, h, "io-limit") or 0)
        # The node's buffer budget is shared by the secondaries that fetch and replay here.
        fetching = sum(1 for rt in self.runtimes.values() if rt.role == "secondary")
        lim.buffers = int(tun.value(t, h, "mem-limit") or tun.SPECS["mem-limit"].default or 0) // max(1, fetching)
        lim.fetch_held = self._load_held(float(tun.value(t, h, "loadavg-limit") or 0))

    def _load_held(self, limit: float) -> str | None:
        """Why fetch is held by the load limit now, None when it is not (limit 0: never)."""
        if limit <= 0:
            return None
        load = os.getloadavg()[0]
        held = self.limits.fetch_held is not None
        if load > limit or (held and load > limit * LOAD_RESUME):
            return (f"fetch held: the 1-minute load average {load:.2f} is above loadavg-limit {limit:g}; "
                    f"it resumes below {limit * LOAD_RESUME:.3g}")
        return None

    async def _start_resource(self, res: str, data: str, size: int, role: str) -> None:
        deps = RuntimeDeps(tree=self.tree, executor=self.executor, log_pulse=self.log_pulse(res),
                           connect=self.bulk_client_for, may_sync=self._may_sync,
                           checkpoint_interval=self.checkpoint_interval, limits=self.limits,
                           stats=self.stats.resource(res), ended=self._task_ended)
        rt: Runtime = RUNTIMES[role](deps, res, data, size)
        attach = self.tree.entry(todo(res, self.host, "attach"))
        try:
            await rt.start()
        except MarsError as e:
            stamp = attach.stamp_ns if attach else 0
            self.failed[res] = (stamp, str(e))
            code = ReplayCode.damaged_at(e.damage.code, e.damage.offset) if isinstance(e, LogDamage) else ReplayCode(-1)
            self.tree.set(actual(res, self.host, "replay-code"), code, durable=False)
            self.tree.set(actual(res, self.host, "msg-err-attach"), str(e), durable=False)
            log.error("marsd: %s", e)
            return
        self.failed.pop(res, None)
        self.runtimes[res] = rt
        # A peer's fetch that came while no runtime was here (marsd starting, recovery running)
        # saw nothing servable and long-polls on the pulse; nothing else fires it if no write
        # follows, so without this it waited its whole poll (2 min) after a restart of the primary,
        # though recovery may have finished the file it asks for.
        self.log_pulse(res).fire()
        self.tree.delete(actual(res, self.host, "msg-err-attach"), durable=False)
        self.tree.set(actual(res, self.host, "replay-code"), ReplayCode(1), durable=False)
        if role == "primary":
            # Its history is the one that goes on now: a split it saw as a secondary is the others'.
            self.tree.delete(actual(res, self.host, "msg-err-split-brain"), durable=False)
            log.info("resource %s: attached %s, serving NBD export %r", res, data, res)
        else:
            log.info("resource %s: attached %s as secondary", res, data)

    def _peers_heard(self) -> bool:
        """Whether every peer's first tree pull since this marsd started has ended.

        A node that was primary before it went down may have been replaced meanwhile (a forced
        failover while it was dead): its own tree still names it. Serving before asking the
        peers could acknowledge writes on a node that is no longer the primary; so a primary
        starts only once each peer answered (and told it the newest ``primary``) or failed to
        (a partition: then nobody can tell it, and it serves as before, as the original does).
        """
        missing = [h for h in nodes_of(self.tree) if h != self.host and not self.exchange.heard(h)]
        if missing and not self._waiting_noted:
            log.info("waiting for the trees of %s before serving as primary", ", ".join(missing))
        self._waiting_noted = bool(missing)
        return not missing

    def _may_sync(self) -> bool:
        """The host's sync limit (defaults-<host>/sync-limit, 0 = none): how many syncs at once."""
        limit = int(tun.value(self.tree, self.host, "sync-limit") or 0)
        running = sum(1 for rt in self.runtimes.values() if rt.syncing)
        return limit <= 0 or running < limit

    async def _stop_resource(self, res: str, finish: bool = False, switching: bool = False) -> None:
        rt = self.runtimes.pop(res, None)
        if rt is None:
            return
        await rt.stop(finish=finish)
        if finish:
            log.info("resource %s: stopped serving: %s is the primary now", res,
                     self.tree.get(f"{res_dir(res)}/primary") or "nobody")
        elif switching:
            log.info("resource %s: stopped as %s to change roles", res, rt.role)
        else:
            log.info("resource %s: detached", res)
        if self.tree.get(f"{res_dir(res)}/size") is not None:
            self._publish(res)

    def report(self) -> None:
        """This node's report: its time, by which every node tells that it is alive (ALIVE_WINDOW_S)."""
        self._reported = time.monotonic()
        self.tree.set(node_actual(self.host, "time"), f"{self.tree.clock.now() / 1e9:.9f}", durable=False)

    def tunables(self) -> dict[str, str]:
        """What this marsd runs with, by tunable name (the --system view shows them beside the set values).

        Every tunable of the table as applied this round (a free-space limit on "auto" as the
        figure it comes to here), so an operator compares set and in force, never set and default.
        """
        t, h = self.tree, self.host
        out = {"interval": f"{self.interval:g}", "checkpoint-interval": f"{self.checkpoint_interval:g}",
               "port": str(self.port)}
        for name in tun.SPECS:
            out[name] = str(tun.value(t, h, name))
        out["logrot-auto"] = str(self.limits.logrot_auto)
        out["traffic-out-limit"] = f"{self.traffic.out.rate:.0f}"
        out["traffic-in-limit"] = f"{self.traffic.inn.rate:.0f}"
        out["io-limit"] = f"{self.limits.io.rate:.0f}"
        for i, v in enumerate(tun.space_limits(t, h, self._total_space), start=1):
            out[f"required-free-space-{i}"] = str(v)
        return out

    def _publish_node(self) -> tuple[int, int]:
        """This node's figures for every other node: version, space in /mars, tunables in use;
        returns the space (free, total bytes), which the emergency level is computed from."""
        t, h = self.tree, self.host
        t.set(node_actual(h, "version"), __version__, durable=False)
        st = os.statvfs(t.root)
        rest, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        # Free space moves with every write to the file system, also other programs' writes to a
        # /mars that is not a file system of its own: publish it when it moved by a thousandth of
        # the file system (at least 1 MiB), far below the steps of the emergency levels, not every
        # round. Each publication goes to every peer and makes every node's next round a full one.
        if abs(rest - t.get_int(node_actual(h, "rest-space"), -1)) >= max(1 << 20, total >> 10):
            t.set(node_actual(h, "rest-space"), rest, durable=False)
        t.set(node_actual(h, "total-space"), total, durable=False)
        self._total_space = total
        for name, value in self.tunables().items():
            t.set(node_actual(h, f"tunable-{name}"), value, durable=False)
        return rest, total

    def _publish(self, res: str) -> None:
        """What this node does with ``res``, for every node: the common entries, then the role's."""
        rt = self.runtimes.get(res)
        t = self.tree
        serving = rt is not None and rt.export is not None
        t.set(actual(res, self.host, "is-attached"), int(rt is not None and rt.device is not None), durable=False)
        t.set(actual(res, self.host, "is-primary"), int(serving), durable=False)
        t.set(actual(res, self.host, "if-on"), int(serving), durable=False)
        t.set(actual(res, self.host, "open-count"), rt.open_count if rt else 0, durable=False)
        if rt is not None and rt.device is not None:
            t.set(f"{res_dir(res)}/actsize-{self.host}", rt.device.size(), durable=False)  # for resize hints
            t.set(actual(res, self.host, "size"), rt.size, durable=False)  # the size it works with: resize waits
        if rt is None and res not in self.failed:
            t.delete(actual(res, self.host, "replay-code"), durable=False)
        if res in self.services.sync_read_bytes:
            t.set(actual(res, self.host, "sync-served-bytes"), self.services.sync_read_bytes[res], durable=False)
        if rt is not None:
            rt.publish()


def report_period(interval: float) -> float:
    """Seconds between two reports of a marsd running rounds every ``interval`` seconds."""
    return max(interval, min(REPORT_MAX_S, REPORT_ROUNDS * interval))


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:10809
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


def _is_loopback(host: str) -> bool:
    """Only addresses every one of whose resolutions is loopback count: 0.0.0.0 and :: are all
    interfaces, and a name that also resolves to a routable address is reachable from outside."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_nbd_listen(listen: list[tuple[str, int]], tls: str, insecure: bool) -> None:
    """Refuse a TCP export that strangers could use: without TLS required, whoever reaches the
    port reads and overwrites every served device, and nothing in the logs would say who."""
    if tls == "require" or insecure:
        return
    for host, port in listen:
        if not _is_loopback(host):
            why = "with --nbd-tls on, plain-text clients are still served" if tls == "on" else \
                "without TLS"
            raise MarsError(
                f"--nbd-listen {host}:{port} is not a loopback address, and {why}: anyone who reaches it "
                f"could read and overwrite every served device",
                "add '--nbd-tls require' (clients then need a certificate from 'marsadm export-client-cert'), "
                "or '--nbd-insecure' if only trusted hosts can reach that network")


def build_parser() -> argparse.ArgumentParser:
    """marsd's command line, apart from ``main`` so the man page is generated from it (tools/manpages.py)."""
    p = argparse.ArgumentParser(prog="marsd", description="MARS daemon: serves and replicates resources.")
    p.add_argument("--mars-dir", help="state tree (default: $MARS_DIR or /mars)")
    p.add_argument("--host", default=None,
                   help="this node's name (default: the host the tree was made for, else uname -n)")
    p.add_argument("--ip", default=None, help="this node's address for peer links (default: from ips/ip-<host>)")
    p.add_argument("--nbd-listen", action="append", type=parse_listen, default=[], metavar="HOST:PORT",
                   help="also serve NBD on TCP (repeatable); the unix socket <mars-dir>/nbd.sock is always on. "
                        "An address other than loopback needs --nbd-tls require or --nbd-insecure")
    p.add_argument("--nbd-tls", choices=TLS_MODES, default="off",
                   help="TLS on the TCP exports, as nbdkit's --tls: off (default), on (offered, plain text "
                        "still served), require (nothing but STARTTLS before TLS). Clients show a certificate "
                        "of the cluster CA ('marsadm export-client-cert'); the unix socket stays plain")
    p.add_argument("--nbd-tls-name", action="append", default=[], metavar="NAME",
                   help="a further DNS name or IP address clients dial, for the NBD certificate (repeatable; "
                        "it always names this host, its --ip and the --nbd-listen addresses)")
    p.add_argument("--nbd-tls-psk", default=None, metavar="FILE",
                   help="also admit TLS clients by pre-shared key: FILE as qemu's tls-creds-psk and nbdkit's "
                        "--tls-psk read it, one 'identity:hexkey' a line, mode 0600 (needs --nbd-tls on|require)")
    p.add_argument("--nbd-insecure", action="store_true",
                   help="serve --nbd-listen on addresses other than loopback without requiring TLS "
                        "(only for a network no untrusted host can reach)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"peer link port (default {DEFAULT_PORT})")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reconcile rounds (default 1)")
    p.add_argument("--checkpoint-interval", type=float, default=1.0,
                   help="minimum seconds between data-device syncs that advance the replay position")
    p.add_argument("--logrot-auto", default="4G", metavar="SIZE",
                   help="rotate a log file automatically once it is this large (default 4G; 0 = never); "
                        "the tree's logrot-auto ('marsadm set-logrot-auto-value') overrides it")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the least severe messages logged (default info)")
    p.add_argument("--log-file", default=None, metavar="PATH",
                   help="append the log to PATH instead of stderr; reopened when moved away (logrotate) "
                        "and on SIGHUP")
    p.add_argument("--syslog", action="store_true",
                   help=f"log to the local syslog ({logs.SYSLOG_SOCKET}, ident marsd, facility daemon) "
                        "instead of stderr")
    p.add_argument("--version", action="version", version=f"marsd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handlers = logs.setup(args.log_level, args.log_file, args.syslog)
    except MarsError as e:
        print(f"marsd: {e}", file=sys.stderr)
        return e.exit_code
    # logrotate's postrotate usually sends SIGHUP, whose default action would end marsd. The
    # file handler notices a moved file by itself; SIGHUP makes it reopen the path regardless.
    files = [h for h in handlers if isinstance(h, logs.ReopeningFileHandler)]

    def on_hup(signum: int, frame: object) -> None:
        for h in files:
            h.request_reopen()

    signal.signal(signal.SIGHUP, on_hup)
    try:
        return _run(args)
    finally:
        for h in handlers:
            logs.flush_repeats(h)


def _run(args: argparse.Namespace) -> int:
    mars_dir = mars_dir_from(args.mars_dir)
    try:
        check_nbd_listen(args.nbd_listen, args.nbd_tls, args.nbd_insecure)
        psk = None
        if args.nbd_tls_psk:
            if args.nbd_tls == "off":
                raise UsageError("--nbd-tls-psk without TLS", "add '--nbd-tls require' (or on)")
            psk = load_psk_file(args.nbd_tls_psk)
        host, note = default_host(mars_dir, args.host)
        if note:
            log.warning("%s", note)
        if not (mars_dir / "uuid").is_symlink():
            raise MarsError(f"{mars_dir} holds no cluster",
                            f"run 'marsadm --mars-dir {mars_dir} --host {host} create-cluster' first")
        lock = take_lock(mars_dir, host)
        if lock is None:
            raise MarsError(f"another marsd already runs on {mars_dir}", "stop it first, or use another --mars-dir")
        tree = Tree(mars_dir, host)
        logrot = int(tun.spec("logrot-auto").parse(args.logrot_auto or "0"))
        asyncio.run(Daemon(tree, args.nbd_listen, args.interval, args.checkpoint_interval, args.port, args.ip,
                           logrot, args.nbd_tls, tuple(args.nbd_tls_name), psk).run())
    except MarsError as e:
        print(f"marsd: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"marsd: {e.strerror or e}{where}; check that {mars_dir} is this host's MARS directory and writable "
              f"by this user, and that the --nbd-listen addresses are free", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
