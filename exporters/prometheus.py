"""mars-exporter: the Prometheus face of the status model, one process per node (like node_exporter).

Every scrape builds one snapshot (:func:`mars.engine.model.read_snapshot`: this node's tree, with
marsd's live counters when it answers) and its findings, and turns both into metric families in
:func:`families`. Nothing is kept between scrapes: there is no background loop setting gauges, so
a deleted resource or a departed node has no series on the very next scrape, and what Prometheus
stores is what ``marsadm view`` and mars-status show at the same moment. The exporter computes
no verdict: ``mars_finding`` is :func:`findings`'s output, one series per finding, and the states
are :class:`Member`'s.

:data:`METRICS` is the catalogue: every family the exporter can emit, with its type, labels and
meaning. :func:`families` can only emit what is in it (``_Out`` refuses anything else), and
``exporters/README.md``'s metric table is generated from it (``--metrics-doc``; a test compares),
so the documentation cannot drift from the code.

A scrape that cannot read the state (no tree, permission denied, a bug) still answers 200 with
``mars_snapshot_ok 0`` and the reason in ``mars_snapshot_error_info``: a target that answers is
the exporter's health (``up``), a target that says "I cannot see MARS" is the node's.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily,
                                    Metric, StateSetMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .. import __version__
from ..engine import model
from ..engine.model import DISKSTATES, REPLSTATES, ROLES, Finding, Member, MarsError, Snapshot

log = logging.getLogger("mars.exporter")

DEFAULT_PORT = 9777  # the Prometheus exporter range 9100-9999 is fully allocated; documented in the README
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"

TRANSFERS = ("sync", "fetch", "replay")
SWITCHES = ("attach", "sync", "fetch", "replay")
ACTIVITIES = ("attached", "primary", "syncing", "fetching", "replaying")


@dataclass(frozen=True)
class Spec:
    """One metric family: its name as exposed (counters with ``_total``), type, labels, meaning."""

    name: str
    type: str  # gauge, counter, info, stateset, histogram
    labels: tuple[str, ...]
    help: str


def _specs() -> list[Spec]:
    m: list[Spec] = []

    def add(name: str, typ: str, labels: str, text: str) -> None:
        m.append(Spec(name, typ, tuple(labels.split()) if labels else (), text))

    # the scrape itself
    add("mars_snapshot_ok", "gauge", "", "1 when this scrape read the node's MARS state; 0 when it could not "
        "(the reason is in mars_snapshot_error_info, every other family is then absent)")
    add("mars_snapshot_error_info", "info", "reason", "Why the state could not be read, with the remedy; present "
        "only when mars_snapshot_ok is 0")
    add("mars_snapshot_build_seconds", "gauge", "", "Seconds this scrape took to read the state and judge it")
    add("mars_exporter_build_info", "info", "version", "The version of mars-exporter")
    # this node and its marsd
    add("mars_marsd_up", "gauge", "host", "1 when this node's marsd answers on its control socket; 0 when the "
        "figures come from the state tree alone")
    add("mars_marsd_start_time_seconds", "gauge", "host", "When this node's marsd started (Unix time); its counters "
        "count from then")
    add("mars_cluster_info", "info", "host cluster_uuid", "The cluster this node's tree belongs to")
    add("mars_clock_slip_seconds", "gauge", "host", "This node's Lamport clock minus its wall clock (a peer whose "
        "clock runs ahead drags it forward)")
    # every node, as this node's tree knows it
    add("mars_node_alive", "gauge", "host", "1 when the node reported within the alive window and is reachable")
    add("mars_node_unreachable", "gauge", "host", "1 when every other live node reports it cannot reach this node")
    add("mars_node_report_age_seconds", "gauge", "host", "Seconds since the node's last report reached this node")
    add("mars_node_info", "info", "host ip version", "A node of the cluster: its address and MARS version")
    add("mars_node_dir_free_bytes", "gauge", "host", "Free bytes of the node's MARS directory (its file system)")
    add("mars_node_dir_size_bytes", "gauge", "host", "Total bytes of the file system holding the node's MARS "
        "directory")
    add("mars_node_emergency", "gauge", "host", "1 when the node is in emergency mode (its MARS directory ran full)")
    add("mars_node_emergency_level", "gauge", "host",
        "Emergency level of the node: 0 normal, 1..3 short of space, 4 full (primaries write through)")
    add("mars_node_link_up", "gauge", "host peer", "0 when host reports it cannot reach peer, 1 otherwise")
    add("mars_node_tunable_info", "info", "host tunable set_value actual_value", "A tunable: what the tree asks "
        "for (set_value, empty when unset) and what the node's marsd runs with (actual_value)")
    add("mars_node_tunable_value", "gauge", "host tunable unit", "A tunable's value in force in the node's marsd, in its "
        "unit (bytes, bytes/s, load, count, bool; 0 = off for a limit)")
    add("mars_node_tunable_set_value", "gauge", "host tunable unit", "A tunable's value set in the tree for the node "
        "(absent: not set, the default holds)")
    # resources
    add("mars_resource_size_bytes", "gauge", "resource", "Size of the resource (its replicated device)")
    add("mars_resource_info", "info", "resource primary", "A resource and its designated primary (empty when none)")
    add("mars_resource_members", "gauge", "resource", "Number of member nodes of the resource")
    add("mars_resource_log_files", "gauge", "resource host", "Log files of the resource that host (the exporter's "
        "node) holds a copy of")
    add("mars_resource_log_bytes", "gauge", "resource host", "Bytes of the resource's log files on host (the "
        "exporter's node)")
    add("mars_resource_deletable_log_files", "gauge", "resource", "Log files replayed by every member: "
        "'marsadm log-delete-all' may remove them")
    add("mars_resource_deletable_bytes", "gauge", "resource", "Bytes of the deletable log files")
    add("mars_resource_deletion_held_back", "gauge", "resource host", "1 for each member whose replay position "
        "keeps older log files from being deletable")
    add("mars_resource_split_brain", "gauge", "resource", "1 when members hold different versions of a log file, "
        "or a member's marsd reports that its history diverges from the primary's (split brain)")
    # a member: one node's part in one resource
    add("mars_member_role", "stateset", "resource host", "The member's role as marsadm view names it: " + ", ".join(ROLES))
    add("mars_member_disk_state", "stateset", "resource host",
        "The member's disk state as marsadm view names it (without the [...] detail): " + ", ".join(DISKSTATES))
    add("mars_member_repl_state", "stateset", "resource host",
        "The member's replication state as marsadm view names it: " + ", ".join(REPLSTATES))
    add("mars_member_switch", "gauge", "resource host switch",
        "1 when the operator's switch is on (attach, sync, fetch, replay; 'marsadm up/down/pause-*/resume-*')")
    add("mars_member_active", "gauge", "resource host activity",
        "1 when the member actually does it now (attached, primary, syncing, fetching, replaying)")
    add("mars_member_nbd_clients", "gauge", "resource host", "NBD clients connected to the member's export")
    add("mars_member_disk_size_bytes", "gauge", "resource host", "Size of the member's data device as it last "
        "reported")
    add("mars_member_consistent", "gauge", "resource host", "1 when the member's data device is a consistent copy")
    add("mars_member_replay_stopped", "gauge", "resource host", "1 when the member's replay stopped on a damaged log "
        "record or a failed attach")
    for t, what in (("sync", "the full sync"), ("fetch", "the log fetch"), ("replay", "the log replay")):
        add(f"mars_member_{t}_position_bytes", "gauge", "resource host", f"Bytes done of {what} (marsadm view-{t}-pos)")
        add(f"mars_member_{t}_size_bytes", "gauge", "resource host", f"Bytes to do for {what} (marsadm view-{t}-size)")
        add(f"mars_member_{t}_remaining_bytes", "gauge", "resource host", f"Bytes left of {what} "
            f"(marsadm view-{t}-rest)")
        add(f"mars_member_{t}_progress_ratio", "gauge", "resource host", f"Done part of {what}, 0 to 1; below 1 "
            "while any byte is left")
        add(f"mars_member_{t}_rate_bytes_per_second", "gauge", "resource host",
            f"Current rate of {what}; absent while it does not run or is too slow to be a rate")
        add(f"mars_member_{t}_remaining_seconds", "gauge", "resource host",
            f"Time left of {what} at the current rate; absent when unknown")
        add(f"mars_member_{t}_stalled", "gauge", "resource host", f"1 when {what} runs with bytes left but has not "
            "moved for a while")
    add("mars_member_fetch_lag_seconds", "gauge", "resource host", "How much older the member's fetch position is "
        "than the primary's log end (0 when nothing is left)")
    add("mars_member_replay_lag_seconds", "gauge", "resource host", "How much older the member's replay position is "
        "than the primary's log end: the age of its copy (0 when nothing is left)")
    add("mars_member_fetch_age_seconds", "gauge", "resource host", "Seconds since the member's fetch position last "
        "moved")
    add("mars_member_replay_age_seconds", "gauge", "resource host", "Seconds since the member's replay position last "
        "moved")
    # the verdict
    add("mars_finding", "gauge", "code level resource host remedy", "1 for every current finding of the status "
        "model (level WORK, TODO or HINT; resource and host empty when the finding is not about one; remedy: what "
        "to do, the exact command, empty for WORK)")
    # marsd's counters (this node only; they restart at zero with marsd)
    add("mars_nbd_requests_total", "counter", "resource host command", "NBD requests served, by command (read, "
        "write, flush, trim, write_zeroes, block_status)")
    add("mars_nbd_request_bytes_total", "counter", "resource host command", "Bytes the NBD requests asked for, by "
        "command")
    add("mars_log_records_total", "counter", "resource host", "Records appended to the resource's log")
    add("mars_log_appended_bytes_total", "counter", "resource host", "Bytes appended to the resource's log, headers "
        "included")
    add("mars_log_group_commits_total", "counter", "resource host", "Group commits: appends made durable by one "
        "fdatasync each (records / group commits = the mean group size)")
    add("mars_write_latency_seconds", "histogram", "resource host", "From an NBD write's arrival to its "
        "acknowledgement (durable in the log and written back)")
    add("mars_fetched_bytes_total", "counter", "resource host", "Log bytes fetched from peers")
    add("mars_replayed_bytes_total", "counter", "resource host", "Bytes of log records replayed onto the data device")
    add("mars_synced_bytes_total", "counter", "resource host", "Bytes copied by the full sync")
    add("mars_nbd_device_read_bytes_total", "counter", "resource host", "Bytes NBD reads took from the data "
        "device: holes of a sparse device are answered without reading them, so a copy of a sparse export "
        "adds far less here than to mars_nbd_request_bytes_total{command=\"read\"}")
    add("mars_tree_pulls_total", "counter", "host", "Answered pulls of the peers' tree changes (at start, after a "
        "gap in a peer's feed or its silence, after a command here; a quiet cluster makes almost none)")
    add("mars_tree_full_pulls_total", "counter", "host", "Pulls answered with a peer's whole tree: its first, "
        "after a restart of either side, and repairs")
    add("mars_tree_repairs_total", "counter", "host", "Whole-tree pulls asked for because this tree and a peer's "
        "differed without a change to explain it (stays 0 in a healthy cluster)")
    add("mars_tree_entries_sent_total", "counter", "host", "Tree entries sent to peers (answers and feeds)")
    add("mars_tree_entries_received_total", "counter", "host", "Tree entries received from peers")
    add("mars_tree_entries_taken_total", "counter", "host", "Received tree entries newer than this node's, written")
    return m


METRICS: tuple[Spec, ...] = tuple(_specs())
BY_NAME = {s.name: s for s in METRICS}


# --- the families of one snapshot (pure) ------------------------------------------------------------

def _family_name(spec: Spec) -> str:
    """The name prometheus_client wants: counters without ``_total``, info without ``_info``."""
    if spec.type == "counter":
        return spec.name.removesuffix("_total")
    if spec.type == "info":
        return spec.name.removesuffix("_info")
    return spec.name


def _unit(spec: Spec) -> str:
    base = _family_name(spec)
    for unit in ("bytes_per_second", "bytes", "seconds", "ratio"):
        if base.endswith("_" + unit):
            return unit
    return ""


class _Out:
    """The families of one scrape, created on first use, in catalogue order."""

    def __init__(self) -> None:
        self._fams: dict[str, Metric] = {}

    def fam(self, name: str) -> Any:
        f = self._fams.get(name)
        if f is None:
            spec = BY_NAME[name]  # KeyError: a family that is not in the catalogue is a bug
            base, unit = _family_name(spec), _unit(spec)
            if spec.type == "gauge":
                f = GaugeMetricFamily(base, spec.help, labels=spec.labels, unit=unit)
            elif spec.type == "counter":
                f = CounterMetricFamily(base, spec.help, labels=spec.labels, unit=unit)
            elif spec.type == "info":
                f = InfoMetricFamily(base, spec.help, labels=())
            elif spec.type == "stateset":
                f = StateSetMetricFamily(base, spec.help, labels=spec.labels)
            else:
                f = HistogramMetricFamily(base, spec.help, labels=spec.labels, unit=unit)
            self._fams[name] = f
        return f

    def gauge(self, name: str, value: float | bool | None, *labels: str) -> None:
        """A sample, or none when the value is unknown (None, NaN): absent beats a made-up number."""
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return
        self.fam(name).add_metric(list(labels), float(value))

    def info(self, name: str, **labels: str) -> None:
        self.fam(name).add_metric([], {k: v for k, v in labels.items()})

    def families(self) -> list[Metric]:
        order = {s.name: i for i, s in enumerate(METRICS)}
        return [f for n, f in sorted(self._fams.items(), key=lambda kv: order[kv[0]])]


def families(snap: Snapshot, found: Iterable[Finding], build_s: float | None = None,
             members: str = "local", answered: bool | None = None) -> list[Metric]:
    """Every family for one snapshot and its findings, in catalogue order.

    ``members="local"`` (the default) gives the ``mars_member_*`` series of this node's own
    members only: every node runs an exporter, so Prometheus gets each member once, from the node
    that knows it first-hand, and a scrape costs what this node holds (about 60 series per member)
    rather than nodes x resources of them (27,000 series at 8 nodes x 50 resources, most of them
    the one-hot states). ``"all"`` gives every member this node's tree knows, for a single
    exporter watching a cluster. Nodes, resources and findings are always this node's whole view.
    ``answered``: whether this node's marsd answered the read (:func:`mars.engine.model.read_snapshot`
    says); None for a snapshot that did not come from a read, where a running marsd counts.
    """
    o = _Out()
    here = snap.local_host
    o.gauge("mars_snapshot_ok", 1)
    o.gauge("mars_snapshot_build_seconds", build_s)
    o.info("mars_exporter_build_info", version=__version__)
    o.gauge("mars_marsd_up", snap.marsd_running if answered is None else answered, here)
    if snap.counters is not None:
        o.gauge("mars_marsd_start_time_seconds", snap.counters.started_at_s, here)
    o.info("mars_cluster_info", host=here, cluster_uuid=snap.cluster_uuid or "")
    o.gauge("mars_clock_slip_seconds", snap.clock_slip_s, here)

    for h, ns in sorted(snap.nodes.items()):
        o.gauge("mars_node_alive", ns.alive, h)
        o.gauge("mars_node_unreachable", ns.unreachable, h)
        o.gauge("mars_node_report_age_seconds", ns.seen_age_s, h)
        o.info("mars_node_info", host=h, ip=ns.ip or "", version=ns.version or "")
        o.gauge("mars_node_dir_free_bytes", ns.rest_space_bytes, h)
        o.gauge("mars_node_dir_size_bytes", ns.total_space_bytes, h)
        o.gauge("mars_node_emergency", ns.emergency, h)
        o.gauge("mars_node_emergency_level", ns.emergency_level, h)
        for peer in sorted(snap.nodes):
            if peer != h:
                o.gauge("mars_node_link_up", peer not in ns.link_errors, h, peer)
        for t in ns.tunables:
            o.info("mars_node_tunable_info", host=h, tunable=t.name, set_value=t.set_value or "",
                   actual_value=t.actual_value or "")
            o.gauge("mars_node_tunable_value", t.actual_number, h, t.name, t.unit or "")
            o.gauge("mars_node_tunable_set_value", t.set_number, h, t.name, t.unit or "")

    for name, r in sorted(snap.resources.items()):
        o.gauge("mars_resource_size_bytes", r.size_bytes, name)
        o.info("mars_resource_info", resource=name, primary=r.primary or "")
        o.gauge("mars_resource_members", len(r.members), name)
        local = [lf for lf in r.logs if lf.local_bytes is not None]
        o.gauge("mars_resource_log_files", len(local), name, here)
        o.gauge("mars_resource_log_bytes", sum(lf.local_bytes or 0 for lf in local), name, here)
        o.gauge("mars_resource_deletable_log_files", len(r.deletable_logs), name)
        o.gauge("mars_resource_deletable_bytes", r.deletable_bytes, name)
        for h in sorted(set(r.held_back_by)):
            o.gauge("mars_resource_deletion_held_back", 1, name, h)
        o.gauge("mars_resource_split_brain", r.is_split_brain, name)
        for h in r.members:
            if members == "all" or h == here:
                _member(o, Member(snap, r, h))

    for f in found:
        o.gauge("mars_finding", 1, f.code, f.level, f.res or "", f.node or "", f.remedy)

    if snap.counters is not None:
        for name, c in sorted(snap.counters.resources.items()):
            lab = (name, here)
            for cmd, n in sorted(c.nbd_requests.items()):
                o.fam("mars_nbd_requests_total").add_metric([*lab, cmd], n)
            for cmd, n in sorted(c.nbd_bytes.items()):
                o.fam("mars_nbd_request_bytes_total").add_metric([*lab, cmd], n)
            o.fam("mars_log_records_total").add_metric(list(lab), c.log_records)
            o.fam("mars_log_appended_bytes_total").add_metric(list(lab), c.log_bytes)
            o.fam("mars_log_group_commits_total").add_metric(list(lab), c.group_commits)
            hist = c.write_latency
            buckets = [("+Inf" if math.isinf(b) else repr(float(b)), n) for b, n in hist.cumulative()]
            o.fam("mars_write_latency_seconds").add_metric(list(lab), buckets, hist.sum_s)
            o.fam("mars_fetched_bytes_total").add_metric(list(lab), c.fetched_bytes)
            o.fam("mars_replayed_bytes_total").add_metric(list(lab), c.replayed_bytes)
            o.fam("mars_synced_bytes_total").add_metric(list(lab), c.synced_bytes)
            o.fam("mars_nbd_device_read_bytes_total").add_metric(list(lab), c.device_read_bytes)
        x = snap.counters.exchange
        if x is not None:
            for metric, value in (("pulls", x.pulls), ("full_pulls", x.full_pulls), ("repairs", x.repairs),
                                  ("entries_sent", x.entries_sent), ("entries_received", x.entries_received),
                                  ("entries_taken", x.entries_taken)):
                o.fam(f"mars_tree_{metric}_total").add_metric([here], value)
    return o.families()


def _member(o: _Out, m: Member) -> None:
    n = m.n
    assert n is not None
    lab = (m.r.name, m.host)
    role, disk, repl = m.role(), model.state_name(m.diskstate()), m.replstate()
    o.fam("mars_member_role").add_metric(list(lab), {s: s == role for s in ROLES})
    o.fam("mars_member_disk_state").add_metric(list(lab), {s: s == disk for s in DISKSTATES})
    o.fam("mars_member_repl_state").add_metric(list(lab), {s: s == repl for s in REPLSTATES})
    sw, act = n.switches, n.actual
    for name, on in zip(SWITCHES, (sw.attach, sw.sync, sw.fetch, sw.replay)):
        o.gauge("mars_member_switch", on, *lab, name)
    for name, on in zip(ACTIVITIES, (act.attached, act.primary, act.syncing, act.fetching, act.replaying)):
        o.gauge("mars_member_active", on, *lab, name)
    o.gauge("mars_member_nbd_clients", act.open_count, *lab)
    o.gauge("mars_member_disk_size_bytes", n.disk_bytes, *lab)
    o.gauge("mars_member_consistent", n.consistent, *lab)
    o.gauge("mars_member_replay_stopped", n.replay_stopped, *lab)
    for t in TRANSFERS:
        p = m.progress(t)
        o.gauge(f"mars_member_{t}_position_bytes", m.pos(t), *lab)
        o.gauge(f"mars_member_{t}_size_bytes", m.size(t), *lab)
        o.gauge(f"mars_member_{t}_remaining_bytes", m.rest(t), *lab)
        o.gauge(f"mars_member_{t}_progress_ratio", m.percent(t) / 100, *lab)
        held = model.held_back(m.snap, n, t)
        o.gauge(f"mars_member_{t}_rate_bytes_per_second", None if held else m.rate(t), *lab)
        o.gauge(f"mars_member_{t}_remaining_seconds", None if held else m.remain(t), *lab)
        o.gauge(f"mars_member_{t}_stalled", p.stalled and not held, *lab)
    o.gauge("mars_member_fetch_lag_seconds", n.fetch_lag_s, *lab)
    o.gauge("mars_member_replay_lag_seconds", n.replay_lag_s, *lab)
    o.gauge("mars_member_fetch_age_seconds", n.fetch_age_s, *lab)
    o.gauge("mars_member_replay_age_seconds", n.replay_age_s, *lab)


def failure_families(reason: str) -> list[Metric]:
    """What a scrape that could not read the state says: that, and why."""
    o = _Out()
    o.gauge("mars_snapshot_ok", 0)
    o.info("mars_snapshot_error_info", reason=reason)
    o.info("mars_exporter_build_info", version=__version__)
    return o.families()


# --- the collector and the HTTP server --------------------------------------------------------------

Source = Callable[[], tuple[Snapshot, bool]]


class MarsCollector(Collector):
    """A custom collector: one snapshot per scrape, never a stale series, never an exception."""

    def __init__(self, source: Source, members: str = "local") -> None:
        self.source = source
        self.members = members

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        try:
            snap, answered = self.source()
            fams = families(snap, model.findings(snap), time.perf_counter() - t0, self.members, answered)
        except MarsError as e:
            fams = failure_families(str(e))  # the text and its remedy
        except Exception as e:  # a bug must cost one scrape's figures, not the exporter
            log.exception("scrape failed")
            fams = failure_families(f"the exporter failed to read the state: {e!r}; see its log")
        yield from fams


class _Registry:
    """The one collector, as prometheus_client's encoders expect a registry."""

    def __init__(self, collector: MarsCollector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        return self.collector.collect()


def wsgi_app(collector: MarsCollector) -> Callable[..., Iterable[bytes]]:
    """``/metrics`` in the format the scraper's Accept header asks for (text 0.0.4 or
    OpenMetrics); every other path is a 404 that says where the metrics are."""
    registry = _Registry(collector)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path != "/metrics":
            body = b"mars-exporter: the metrics are at /metrics\n"
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        body = encoder(registry)  # type: ignore[arg-type]
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body] if environ.get("REQUEST_METHOD") != "HEAD" else [b""]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape is noise
        log.debug("%s - %s", self.address_string(), format % args)


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` too; ``:PORT`` for every address), or UsageError naming the remedy."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise model.UsageError(f"--listen {text!r} is not ADDR:PORT", f"for example --listen 127.0.0.1:{DEFAULT_PORT}")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(collector: MarsCollector, listen: tuple[str, int]) -> _Server:
    server = make_server(listen[0], listen[1], wsgi_app(collector), server_class=_Server, handler_class=_QuietHandler)
    return server  # type: ignore[return-value]


# --- the command ----------------------------------------------------------------------------------

def metrics_doc() -> str:
    """The metric table of exporters/README.md, from the catalogue."""
    rows = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for s in METRICS:
        labels = ", ".join(f"`{x}`" for x in s.labels) or "—"
        rows.append(f"| `{s.name}` | {s.type} | {labels} | {s.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mars-exporter",
        description="Serve this node's MARS status to Prometheus at /metrics, one snapshot per scrape. It keeps "
                    "answering while marsd is down (mars_marsd_up 0; the figures then come from the state tree).")
    p.add_argument("--mars-dir", default=None, help="the MARS state tree (default $MARS_DIR or /mars)")
    p.add_argument("--host", default=None, help="this node's name (default: the node the tree belongs to)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                   help=f"where to serve /metrics (default {DEFAULT_LISTEN})")
    p.add_argument("--window", type=float, default=None, metavar="S",
                   help=f"seconds after which a silent node counts as not alive (default {model.ALIVE_WINDOW_S:g})")
    p.add_argument("--members", choices=("local", "all"), default="local",
                   help="whose mars_member_* series to serve: this node's own members (default; every node runs "
                        "an exporter), or every member this node's tree knows (one exporter for a cluster)")
    p.add_argument("--once", action="store_true", help="print one scrape in the text format and exit")
    p.add_argument("--metrics-doc", action="store_true", help="print the metric table (Markdown) and exit")
    p.add_argument("--version", action="version", version=f"mars-exporter {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.metrics_doc:
        sys.stdout.write(metrics_doc())
        return 0
    logging.basicConfig(level=logging.INFO, format="mars-exporter: %(message)s")
    try:
        if args.window is not None and not args.window > 0:
            raise model.UsageError(f"--window {args.window:g} is not a positive number of seconds",
                                   "for example --window 10")
        listen = parse_listen(args.listen)
        mars_dir = model.mars_dir_from(args.mars_dir)
        host, note = model.default_host(mars_dir, args.host)
    except MarsError as e:
        print(f"mars-exporter: {e}", file=sys.stderr)
        return e.exit_code
    if note:
        log.info("%s", note)
    # lines=False: marsd's debug lines are no metric; ask it for its counters only, not its whole snapshot.
    # One TreeCache for every scrape: a directory of the tree that did not change is not read again.
    cache = model.TreeCache()
    collector = MarsCollector(lambda: model.read_snapshot(mars_dir, host, window_s=args.window, lines=False,
                                                          cache=cache), args.members)
    if args.once:
        from prometheus_client.exposition import generate_latest
        sys.stdout.write(generate_latest(_Registry(collector)).decode())  # type: ignore[arg-type]
        return 0
    try:
        server = serve(collector, listen)
    except OSError as e:
        print(f"mars-exporter: cannot listen on {args.listen}: {e.strerror or e}\n"
              f"  remedy: choose a free address with --listen ADDR:PORT", file=sys.stderr)
        return 1
    log.info("serving %s (host %s) at http://%s:%d/metrics", mars_dir, host, *server.server_address[:2])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="mars-exporter http", daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
