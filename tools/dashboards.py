"""Generate the Grafana dashboards in dashboards/grafana/ with Grafana's own grafana-foundation-sdk.

Why generated: a hand-edited dashboard JSON drifts from the exporter. Here every query is built
from the names the code defines (the state names of :mod:`mars.engine.model`, the finding levels,
the transfers of :mod:`mars.exporters.prometheus`), and tests/test_dashboards.py checks each query
against the exporter's catalogue, the dashboard-linter's rules and ``promtool``, so a renamed
metric or state fails a test instead of leaving a panel that silently shows nothing.

Why the SDK and not raw dicts: its builders know the panel schemas (options, field config, the
grid layout), so the output is what Grafana itself would save. Its quirks are handled in one place
(:func:`_dashboard`): it leaves panel ids unset, and a row given panels is forced collapsed, so the
rows here are section headers followed by their panels, which is how Grafana stores open rows.

Why deterministic: the checked-in files are compared byte for byte with a fresh run (sorted keys,
no timestamps, stable uids), so a change to this module without regenerating fails the tests.

Usage: ``.venv/bin/python tools/dashboards.py`` rewrites dashboards/grafana/; ``--check`` only
reports stale files (exit 1).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, text, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat
from grafana_foundation_sdk.models.text import TextMode

from mars.engine.model import ALIVE_WINDOW_S, DISKSTATES, LEVELS, REPLSTATES, ROLES
from mars.engine.model.findings import SPACE_LOW_FRACTION, SPACE_WARN_FRACTION
from mars.exporters.prometheus import TRANSFERS

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "dashboards" / "grafana"
TAG = "mars"  # every MARS dashboard carries it: the dashboard links list them by tag

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

# The variables' matchers. Findings and alerts about the whole cluster have an empty resource or
# host label; the "|" alternative keeps them visible whatever resource or host is selected.
RESOURCE = 'resource=~"$resource"'
HOST = 'host=~"$host"'
RESOURCE_OR_NONE = 'resource=~"$resource|"'
HOST_OR_NONE = 'host=~"$host|"'
MEMBER = "resource, host"  # the labels of one member (a resource on a host)
MEMBER_LEGEND = "{{resource}} on {{host}}"

# Colours of the state names: what is fine, what is on its way, what an operator switched off,
# what is broken. tests/test_dashboards.py checks every state name has exactly one.
_STATE_GROUPS = {
    "green": ("UpToDate", "Replicating", "Replaying", "Primary", "Secondary"),
    "blue": ("InConsistent", "WriteBack", "Recovery", "OutDated", "Syncing", "NotYetPrimary"),
    "orange": ("Detaching", "Detached", "NotStarted", "PausedSync", "PausedFetch", "PausedReplay", "RemainsPrimary",
               "ForcedPrimary"),
    "red": ("DefectiveLog", "NoAttach", "EmergencyMode", "MarsdNotRunning", "UnResponsive", "NoPrimaryDesignated",
            "PrimaryUnreachable"),
    "text": ("NotJoined", "None"),
}
STATE_COLORS = {state: color for color, states in _STATE_GROUPS.items() for state in states}
LEVEL_COLORS = {"TODO": "red", "HINT": "yellow", "WORK": "blue"}

_REF_IDS = "ABCDEFGHIJ"
_P = TypeVar("_P")


# --- PromQL ------------------------------------------------------------------------------------

def eq(label: str, value: str) -> str:
    return f'{label}="{value}"'


def sel(metric: str, *matchers: str) -> str:
    """A selector; the matchers are written out so every query reads the same in Grafana's editor."""
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def agg(labels: str, inner: str, how: str = "max") -> str:
    """One value per member or node: every node's exporter reports what its tree knows about all
    of them, so a cluster-wide series comes once per exporter. max (or min for "is it up") keeps
    the worst of those views, and the furthest position."""
    return f"{how} by ({labels}) ({inner})"


def member(metric: str) -> str:
    return agg(MEMBER, sel(metric, RESOURCE, HOST))


def rate(metric: str, labels: str) -> str:
    """Per second, summed: ``$__rate_interval`` so a panel never asks for fewer than two samples."""
    return agg(labels, f"rate({sel(metric, RESOURCE, HOST)}[$__rate_interval])", "sum")


def current_state(metric: str) -> str:
    """The state's name as a label: a stateset is one 0/1 series per possible state."""
    return agg(f"{MEMBER}, {metric}", sel(metric, RESOURCE, HOST) + " == 1")


def state_code(metric: str, states: Iterable[str]) -> str:
    """The state as its index in ``states``: a state timeline colours one row per member by its
    value, and a value mapping turns the index back into the name (PromQL cannot make a value of a
    label). The first matching state wins should two exporters disagree."""
    return " or ".join(f"{i} * {agg(MEMBER, sel(metric, RESOURCE, HOST, eq(metric, s)) + ' == 1')}"
                       for i, s in enumerate(states))


def substitute(expr: str, resource: str = ".*", host: str = ".*") -> str:
    """``expr`` as Prometheus gets it from Grafana: the dashboard variables replaced by values, so a
    query can be checked (``promtool``) or run against a real Prometheus. An unknown variable is an
    error: it would reach Prometheus verbatim and match nothing."""
    values = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "resource": resource, "host": host}

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# --- panels ------------------------------------------------------------------------------------

def target(expr: str, legend: str = "", *, table_format: bool = False) -> prometheus.Dataquery:
    """A Prometheus query on the dashboard's data source variable (dashboard-linter: a dashboard
    must work with whatever Prometheus it is imported into)."""
    q = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        q.legend_format(legend)
    return q.format(PromQueryFormat.TABLE).instant() if table_format else q.range()


def steps(base: str, *more: tuple[float, str]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=None, color=base), *(dm.Threshold(value=v, color=c) for v, c in more)])


def value_map(names: dict[str, tuple[str, str]]) -> list[dm.ValueMapping]:
    """Raw value (a number as text, or a label value) -> (text shown, colour)."""
    return [dm.ValueMap(options={raw: dm.ValueMappingResult(text=t, color=c, index=i)
                                 for i, (raw, (t, c)) in enumerate(names.items())})]


def _state_names(states: Iterable[str], coded: bool) -> dict[str, tuple[str, str]]:
    return {(str(i) if coded else s): (s, STATE_COLORS[s]) for i, s in enumerate(states)}


UP_DOWN = value_map({"0": ("down", "red"), "1": ("up", "green")})


def _panel(panel: _P, title: str, description: str, targets: Iterable[prometheus.Dataquery],
           w: int, h: int, unit: str | None) -> _P:
    """What every panel with queries has. The builders are one class per panel type with no common
    base (each has its own generated copy of these methods), hence ``Any``."""
    p: Any = panel
    p.title(title).description(description).datasource(DATASOURCE).span(w).height(h)
    for ref, t in zip(_REF_IDS, targets, strict=False):
        p.with_target(t.ref_id(ref))
    if unit:
        p.unit(unit)
    return panel


def graph(title: str, description: str, *targets: prometheus.Dataquery, unit: str, w: int = 12, h: int = 8,
          thresholds: db.ThresholdsConfig | None = None) -> timeseries.Panel:
    p = _panel(timeseries.Panel(), title, description, targets, w, h, unit)
    p.legend(cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.TABLE)
             .placement(cm.LegendPlacement.BOTTOM).calcs(["lastNotNull", "max"]))
    p.tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    p.fill_opacity(10).span_nulls(False)
    if thresholds is not None:
        p.thresholds(thresholds)
        p.thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.DASHED))
    return p


def single(title: str, description: str, *targets: prometheus.Dataquery, unit: str = "none",
           thresholds: db.ThresholdsConfig | None = None, mappings: list[dm.ValueMapping] | None = None,
           w: int = 4, h: int = 8) -> stat.Panel:
    """A stat: the last value of each series, coloured by the thresholds or the value mapping."""
    p = _panel(stat.Panel(), title, description, targets, w, h, unit)
    p.reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    p.color_mode(cm.BigValueColorMode.BACKGROUND).graph_mode(cm.BigValueGraphMode.NONE)
    p.text_mode(cm.BigValueTextMode.VALUE_AND_NAME).justify_mode(cm.BigValueJustifyMode.AUTO)
    p.thresholds(thresholds or steps("green"))
    if mappings:
        p.mappings(mappings)
    return p


def timeline(title: str, description: str, *targets: prometheus.Dataquery, mappings: list[dm.ValueMapping],
             w: int = 12, h: int = 8) -> statetimeline.Panel:
    p = _panel(statetimeline.Panel(), title, description, targets, w, h, None)
    p.show_value(cm.VisibilityMode.AUTO).merge_values(True).fill_opacity(80).line_width(0)
    p.legend(cb.VizLegendOptions().show_legend(False).display_mode(cm.LegendDisplayMode.HIDDEN)
             .placement(cm.LegendPlacement.BOTTOM))
    p.tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.SINGLE).sort(cm.SortOrder.NONE))
    return p.mappings(mappings).thresholds(steps("text"))


def grid(title: str, description: str, *targets: prometheus.Dataquery, columns: dict[str, str],
         sort: str, w: int = 24, h: int = 8) -> table.Panel:
    """A table of instant queries, merged into one row per key; ``columns`` maps the fields to keep
    (labels, ``Value #A``...) to their titles, in order, and every other field is hidden."""
    p = _panel(table.Panel(), title, description, targets, w, h, None)
    values = [f"Value #{r}" for r in _REF_IDS[:len(targets)]] if len(targets) > 1 else ["Value"]
    if len(targets) > 1:
        p.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    hidden = ["Time", "__name__", "job", "instance", *values]
    p.with_transformation(dm.DataTransformerConfig(id_val="organize", options={
        "excludeByName": {f: True for f in hidden if f not in columns},
        "indexByName": {f: i for i, f in enumerate(columns)},
        "renameByName": dict(columns),
    }))
    p.show_header(True).cell_height(cm.TableCellHeight.SM).footer(cb.TableFooterOptions().show(False).reducer(["sum"]))
    return p.sort_by([cb.TableSortByFieldState().display_name(sort).desc(False)]).thresholds(steps("text"))


def colored(p: table.Panel, *columns: str, mode: str = "color-text") -> table.Panel:
    """Colour these columns' cells by the panel's value mappings (the table builder has no cell
    options of its own, so this is a field override)."""
    for c in columns:
        p.override_by_name(c, [dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": mode})])
    return p


def linked(p: table.Panel, column: str, uid: str, variable: str) -> table.Panel:
    """Clicking a resource or host opens its dashboard with it selected, same time range and data source."""
    url = f"/d/{uid}/{uid}?${{__url_time_range}}&${{datasource:queryparam}}&var-{variable}=${{__value.raw}}"
    return p.override_by_name(column, [dm.DynamicConfigValue(
        id_val="links", value=[{"title": f"{uid} dashboard for ${{__value.raw}}", "url": url}])])


# --- dashboards --------------------------------------------------------------------------------

def _variables() -> list[Builder[dm.VariableModel]]:
    """The data source, resources and hosts: the same three on every dashboard, so the dashboard
    links carry the selection from one to the next."""
    every = dm.VariableOption(selected=True, text=["All"], value=["$__all"])

    def over(name: str, label: str, metric: str) -> db.QueryVariable:
        return (db.QueryVariable(name).id(name).label(label).datasource(DATASOURCE)
                .query(f"label_values({metric}, {name})").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(dm.VariableSort.ALPHABETICAL_ASC).multi(True).include_all(True).all_value(".*").current(every))

    return [db.DatasourceVariable("datasource").id("datasource").label("Data source").type("prometheus"),
            over("resource", "Resource", "mars_resource_info"),
            over("host", "Host", "mars_node_info")]


def _dashboard(uid: str, title: str, description: str, sections: list[tuple[str, list[Any]]]) -> dm.Dashboard:
    d = (db.Dashboard(title).uid(uid).description(description).tags([TAG]).editable()
         .time("now-1h", "now").refresh("30s").timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .variables(_variables())
         .links([db.DashboardLink("MARS").type(dm.DashboardLinkType.DASHBOARDS).tags([TAG])
                 .as_dropdown(False).include_vars(True).keep_time(True)]))
    for row, panels in sections:
        d.with_row(db.Row(row))
        for p in panels:
            d.with_panel(p)
    built = d.build()
    for i, p in enumerate(built.panels or [], 1):  # stable ids: links to a panel (viewPanel=N) keep working
        p.id_val = i
    return built


def cluster_dashboard() -> dm.Dashboard:
    healthy = f"""\
**Healthy** looks like this:

* **TODO findings 0**, and no firing alerts. Every TODO names its remedy: the exact command and
  the host to run it on.
* Every node **alive**, its **marsd up**, its exporter target **up**.
* Each resource has one **Primary** (replication state **Replicating**); every other member is
  **Secondary** and **Replaying**; every disk **UpToDate**.
* WORK findings (a sync, fetch or replay with bytes left) finish by themselves; HINTs are optional.

A node that has not reported for {ALIVE_WINDOW_S:.0f} s is not alive. The other dashboards: per
resource (progress, lag, latency) and per node (space, links, throughput), in the links above.
"""

    def finding(level: str) -> str:
        return sel("mars_finding", eq("level", level), RESOURCE_OR_NONE, HOST_OR_NONE)

    # the level as its rank in LEVELS (most urgent first), so the table sorts by it; a mapping names it
    levels = " or ".join(f"{i} * {agg('code, resource, host, remedy', finding(lv))}" for i, lv in enumerate(LEVELS, 1))
    states = {**_state_names(ROLES, False), **_state_names(DISKSTATES, False), **_state_names(REPLSTATES, False)}
    members = grid(
        "Members", "One row per member: its role, disk state and replication state as marsadm view names them, and "
        "how old its copy is. A red state needs an operator (see the findings below for the command); blue is on "
        "its way; orange is switched off by an operator ('marsadm pause-*', 'down'). Click a resource or host for "
        "its dashboard.",
        target(current_state("mars_member_role"), table_format=True),
        target(current_state("mars_member_disk_state"), table_format=True),
        target(current_state("mars_member_repl_state"), table_format=True),
        target(member("mars_member_replay_lag_seconds"), table_format=True),
        columns={"resource": "Resource", "host": "Host", "mars_member_role": "Role",
                 "mars_member_disk_state": "Disk state", "mars_member_repl_state": "Replication state",
                 "Value #D": "Replay lag"},
        sort="Resource", h=9)
    members.mappings(value_map(states))
    members.override_by_name("Replay lag", [dm.DynamicConfigValue(id_val="unit", value="s")])
    colored(members, "Role", "Disk state", "Replication state")
    linked(members, "Resource", "mars-resource", "resource")
    linked(members, "Host", "mars-node", "host")
    findings = grid(
        "Current findings", "The status model's verdict, most urgent first: TODO needs an operator (run the remedy "
        "on the host named), HINT is optional, WORK finishes by itself. The same findings as 'marsadm view' and "
        "mars-status.",
        target(levels, table_format=True),
        columns={"Value": "Level", "code": "Code", "resource": "Resource", "host": "Host", "remedy": "Remedy"},
        sort="Level", w=15, h=10)
    findings.mappings(value_map({str(i): (lv, LEVEL_COLORS[lv]) for i, lv in enumerate(LEVELS, 1)}))
    colored(findings, "Level", mode="color-background")
    alerts = grid(
        "Firing alerts", "Alerts Prometheus fires now (its ALERTS series), whatever rules are loaded. Each one "
        "names what is wrong; the findings table next to it has the remedy.",
        target(sel("ALERTS", 'alertstate="firing"'), table_format=True),
        columns={"alertname": "Alert", "severity": "Severity", "resource": "Resource", "host": "Host"},
        sort="Alert", w=9, h=10)
    return _dashboard("mars-cluster", "MARS cluster overview",
                      "Is the MARS cluster healthy, and if not, what to do: states of every member, nodes, findings "
                      "with their remedies, firing alerts.", [
        ("Health", [
            text.Panel().title("What healthy looks like").description("The signs of a healthy cluster on this page.")
            .mode(TextMode.MARKDOWN).content(healthy).span(8).height(8),
            single("TODO findings", "Findings that need an operator, counted once each however many nodes report "
                   "them. Red: read the findings table below and run each remedy.",
                   target(f"count({agg('code, resource, host', finding('TODO'))}) or vector(0)"),
                   thresholds=steps("green", (1, "red"))),
            single("Nodes alive", "Whether each node reported within the alive window. Red: the node is down or cut "
                   "off; check it and its network ('marsadm view' on it).",
                   target(agg("host", sel("mars_node_alive", HOST), "min"), "{{host}}"),
                   mappings=value_map({"0": ("dead", "red"), "1": ("alive", "green")})),
            single("marsd up", "Whether each node's marsd answers on its control socket (each node's own exporter "
                   "says). Red: start it ('systemctl start marsd'); no value: that node's exporter is not scraped.",
                   target(agg("host", sel("mars_marsd_up", HOST)), "{{host}}"), mappings=UP_DOWN),
            single("Exporter targets", "Whether Prometheus scrapes each mars-exporter (job 'mars'). Red: the "
                   "exporter or its node is down, or a firewall blocks the port.",
                   target(sel("up", 'job="mars"'), "{{instance}}"), mappings=UP_DOWN),
        ]),
        ("Resources", [members]),
        ("Findings and alerts", [findings, alerts]),
    ])


def _transfer(t: str) -> tuple[str, list[Any]]:
    """The same row for the full sync, the log fetch and the log replay: their metrics differ only by
    the transfer's name."""
    what = {"sync": "full sync", "fetch": "log fetch", "replay": "log replay"}[t]
    name = what.capitalize()

    def m(suffix: str) -> str:
        return member(f"mars_member_{t}_{suffix}")

    return name, [
        single(f"{name} progress", f"Done part of the {what} per member. Blue while bytes are left, green when done.",
               target(m("progress_ratio"), MEMBER_LEGEND), unit="percentunit",
               thresholds=steps("blue", (1, "green"))),
        single(f"{name} stalled", f"1 when the {what} has bytes left but has not moved for a while. Red: check the "
               "member's findings (a paused switch, a network or disk problem) and its marsd log.",
               target(m("stalled"), MEMBER_LEGEND),
               mappings=value_map({"0": ("moving", "green"), "1": ("STALLED", "red")})),
        graph(f"{name} remaining", f"Bytes left of the {what} per member. A line that does not fall while the rate "
              "is absent means it does not run: see its switch and the findings.",
              target(m("remaining_bytes"), MEMBER_LEGEND), unit="bytes", w=6),
        graph(f"{name} rate", f"Current rate of the {what} per member; absent while it does not run.",
              target(m("rate_bytes_per_second"), MEMBER_LEGEND), unit="Bps", w=6),
        single(f"{name} time left", f"Time left of the {what} at the current rate; no value when unknown.",
               target(m("remaining_seconds"), MEMBER_LEGEND), unit="s",
               thresholds=steps("green", (3600, "orange"))),
    ]


def resource_dashboard() -> dm.Dashboard:
    return _dashboard("mars-resource", "MARS resource",
                      "One resource's members: states over time, sync / fetch / replay progress, replication lag, "
                      "write latency, log space and NBD traffic.", [
        ("States", [
            timeline("Replication state", "Each member's replication state over time. Red needs an operator (see "
                     "the overview's findings), orange is switched off, blue is on its way.",
                     target(state_code("mars_member_repl_state", REPLSTATES), MEMBER_LEGEND),
                     mappings=value_map(_state_names(REPLSTATES, True))),
            timeline("Disk state", "Each member's disk state over time. UpToDate is green; InConsistent, OutDated "
                     "and WriteBack catch up by themselves; red needs an operator.",
                     target(state_code("mars_member_disk_state", DISKSTATES), MEMBER_LEGEND),
                     mappings=value_map(_state_names(DISKSTATES, True))),
        ]),
        ("Replication", [
            single("Split brain", "Whether members hold different versions of a log file. Red: the histories "
                   "diverged; decide which node's data survives and run 'marsadm invalidate RESOURCE' on the "
                   "others (the SPLIT_BRAIN finding names them).",
                   target(agg("resource", sel("mars_resource_split_brain", RESOURCE)), "{{resource}}"),
                   mappings=value_map({"0": ("none", "green"), "1": ("SPLIT BRAIN", "red")})),
            graph("Replication lag", "How much older each member's fetched and replayed data is than the primary's "
                  "log end: the age of its copy. Rising without end: the member does not keep up (see its rates "
                  "below and the node's links).",
                  target(member("mars_member_replay_lag_seconds"), "replay {{resource}} on {{host}}"),
                  target(member("mars_member_fetch_lag_seconds"), "fetch {{resource}} on {{host}}"),
                  unit="s", w=10),
            graph("Write latency", "From an NBD write's arrival at the primary to its acknowledgement (durable in "
                  "the log and written back). High: the MARS directory's or the data device's disk is slow.",
                  *(target(f"histogram_quantile({q}, {rate('mars_write_latency_seconds_bucket', 'le, resource')})",
                           f"p{round(q * 100)} {{{{resource}}}}") for q in (0.5, 0.99)),
                  unit="s", w=10),
        ]),
        *(_transfer(t) for t in TRANSFERS),
        ("Log and I/O", [
            graph("Log space per node", "Bytes of the resource's log files on each node, and how many of them every "
                  "member has replayed. Deletable bytes that keep growing: run 'marsadm log-delete-all RESOURCE'.",
                  target(member("mars_resource_log_bytes"), "log {{resource}} on {{host}}"),
                  target(agg("resource", sel("mars_resource_deletable_bytes", RESOURCE)), "deletable {{resource}}"),
                  unit="bytes", w=8),
            graph("NBD requests", "Requests the member's NBD export serves, by command (only the primary serves).",
                  target(rate("mars_nbd_requests_total", f"{MEMBER}, command"), "{{command}} {{resource}} on {{host}}"),
                  unit="reqps", w=8),
            single("NBD clients", "NBD clients connected to each member's export. 0 on the primary: nothing uses "
                   "the device (expected only while the service is down).",
                   target(member("mars_member_nbd_clients"), MEMBER_LEGEND), w=8,
                   thresholds=steps("text")),
        ]),
    ])


def node_dashboard() -> dm.Dashboard:
    free, size = sel("mars_node_dir_free_bytes", HOST), sel("mars_node_dir_size_bytes", HOST)
    return _dashboard("mars-node", "MARS node",
                      "One node: its MARS directory, emergency mode, peer links, report age and its marsd's "
                      "throughput.", [
        ("MARS directory", [
            graph("MARS directory space", "Free and total bytes of each node's MARS directory, and where the free "
                  "space goes in 6 hours at the last hour's trend. When the trend line reaches 0 the node enters "
                  "emergency mode: delete replayed logs ('marsadm log-delete-all all') or grow the file system.",
                  target(agg("host", free), "free {{host}}"),
                  target(agg("host", size), "total {{host}}"),
                  target(agg("host", f"predict_linear({free}[1h], 6 * 3600)"), "free in 6 h {{host}}"),
                  unit="bytes"),
            single("Free share", "Free part of each node's MARS directory. Orange below "
                   f"{SPACE_WARN_FRACTION:.0%} (a HINT), red below {SPACE_LOW_FRACTION:.0%} (a TODO): delete replayed "
                   "logs ('marsadm log-delete-all all') or grow the file system.",
                   target(agg("host", f"{free} / {size}", "min"), "{{host}}"), unit="percentunit",
                   thresholds=steps("red", (SPACE_LOW_FRACTION, "orange"), (SPACE_WARN_FRACTION, "green"))),
            single("Emergency mode", "1 when the node's MARS directory ran full and its log stopped. Red: free "
                   "space ('marsadm log-delete-all all' on it), then 'marsadm invalidate RESOURCE' on every "
                   "secondary that fell behind (the EMERGENCY finding names them).",
                   target(agg("host", sel("mars_node_emergency", HOST)), "{{host}}"),
                   mappings=value_map({"0": ("normal", "green"), "1": ("EMERGENCY", "red")})),
            single("marsd up", "Whether the node's marsd answers on its control socket. Red: 'systemctl start "
                   "marsd' on it; the figures of that node then come from its state tree alone.",
                   target(agg("host", sel("mars_marsd_up", HOST)), "{{host}}"), mappings=UP_DOWN),
        ]),
        ("Cluster links", [
            timeline("Peer links", "Whether each node reaches each peer, as the node reports it. Red: check the "
                     "network and firewall between the two (the peer port), then the PEER_UNREACHABLE finding.",
                     target(agg("host, peer", sel("mars_node_link_up", HOST), "min"), "{{host}} → {{peer}}"),
                     mappings=UP_DOWN, w=8),
            graph("Report age", "Seconds since each node's last report reached the others. Above "
                  f"{ALIVE_WINDOW_S:.0f} s (red line) the node counts as not alive: check it and its marsd.",
                  target(agg("host", sel("mars_node_report_age_seconds", HOST)), "{{host}}"), unit="s", w=8,
                  thresholds=steps("green", (ALIVE_WINDOW_S / 2, "orange"), (ALIVE_WINDOW_S, "red"))),
            graph("Clock slip", "Each node's Lamport clock minus its wall clock. Above the alive window: a peer's "
                  "clock runs ahead; fix NTP on the nodes.",
                  target(agg("host", sel("mars_clock_slip_seconds", HOST)), "{{host}}"), unit="s", w=8,
                  thresholds=steps("green", (ALIVE_WINDOW_S, "red"))),
        ]),
        ("Throughput of the node's marsd", [
            graph("Group commit size", "Log records made durable per fdatasync on the primary: above 1 means "
                  "concurrent writes share one flush, which keeps the write latency down under load.",
                  target(f"{rate('mars_log_records_total', MEMBER)} / {rate('mars_log_group_commits_total', MEMBER)}",
                         MEMBER_LEGEND), unit="none"),
            graph("NBD requests", "NBD requests the node's marsd serves, by command.",
                  target(rate("mars_nbd_requests_total", "host, command"), "{{command}} on {{host}}"), unit="reqps"),
            graph("NBD bytes", "Bytes the NBD requests ask for, by command.",
                  target(rate("mars_nbd_request_bytes_total", "host, command"), "{{command}} on {{host}}"),
                  unit="Bps"),
            graph("Log and replication throughput", "Bytes appended to the logs (primary), fetched from peers, "
                  "replayed onto the data device and copied by a full sync (secondaries).",
                  *(target(rate(f"mars_{m}_bytes_total", "host"), f"{label} on {{{{host}}}}") for m, label in (
                      ("log_appended", "appended"), ("fetched", "fetched"), ("replayed", "replayed"),
                      ("synced", "synced"))),
                  unit="Bps"),
        ]),
    ])


DASHBOARDS: dict[str, Callable[[], dm.Dashboard]] = {
    "mars-cluster.json": cluster_dashboard,
    "mars-resource.json": resource_dashboard,
    "mars-node.json": node_dashboard,
}


# --- output ------------------------------------------------------------------------------------

def render(build: Callable[[], dm.Dashboard]) -> str:
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(build()) + "\n"


def panel_queries(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, expr) of every query of a dashboard document, rows' nested
    panels included: what the tests and the integration test run against Prometheus."""
    out: list[tuple[str, str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            out.extend((doc.get("title", ""), p.get("title", ""), t["expr"])
                       for t in p.get("targets") or [] if t.get("expr"))
            walk(p.get("panels") or [])

    walk(doc.get("panels") or [])
    return out


def stale(directory: Path = OUT_DIR) -> list[str]:
    """The files in ``directory`` that differ from what the code generates (or are missing)."""
    return [name for name, build in DASHBOARDS.items()
            if not (directory / name).is_file() or (directory / name).read_text() != render(build)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--check", action="store_true", help="only report stale files (exit 1), write nothing")
    args = ap.parse_args(argv)
    rel = OUT_DIR.relative_to(ROOT)
    if args.check:
        names = stale()
        for name in names:
            print(f"{rel / name} is stale; run '.venv/bin/python tools/dashboards.py' and commit it", file=sys.stderr)
        return 1 if names else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        (OUT_DIR / name).write_text(render(build))
        print(rel / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
