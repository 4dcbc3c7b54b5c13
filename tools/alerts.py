"""Generate MARS's Prometheus alerting rules, dashboards/prometheus/mars-alerts.yml.

Why generated: the findings of :mod:`mars.engine.model` are the one verdict on a cluster, and
``mars_finding`` carries each of them to Prometheus. An alert per TODO code written by hand would
miss the next code someone adds to :data:`~mars.engine.model.CODES`; made from CODES, it cannot,
and tests/test_alert_rules.py fails until the new alert has promtool test cases too. The rules
the findings cannot express, because they need history (a lag that keeps growing, a position
that has not moved for 15 minutes, a trend of free space) or because no exporter can report
them (an exporter that is down), are written here by hand, beside the generated ones.

Why the aggregations: every node runs its own mars-exporter and each reports what its node's
tree knows about every node, so one problem is one series per exporter (they differ only in
``instance``). The finding alerts aggregate the exporters away and fire once per problem; the
history rules take the view every exporter agrees on (``min`` of what must hold, ``max`` of a
movement any view saw), so one lagging view does not page.

The output is deterministic (no date, fixed order), so ``--check`` can compare it with the
checked-in file.

Usage: ``.venv/bin/python tools/alerts.py`` rewrites the rules file; ``--check`` only reports a
stale one (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from mars.engine.model import CODES, URGENT

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = ROOT / "dashboards" / "prometheus" / "mars-alerts.yml"

#: The scrape job of the exporters (exporters/README.md's scrape_configs).
JOB = "mars"

#: TODO codes that page: data is at risk or nothing serves the resource. The other TODO codes
#: need an operator too, but during working hours.
CRITICAL = URGENT  # the model's, so Zabbix's HIGH triggers and these agree

#: How long a finding must last before it alerts, where 1m is wrong for it:
FOR = {
    # Two histories never merge again by themselves; waiting only delays the decision.
    "SPLIT_BRAIN": "0s",
    # The finding waits for the alive window (30 s) already; a marsd restart or an upgrade
    # ('systemctl restart marsd') takes that long again.
    "NODE_DOWN": "2m",
    "MARSD_DOWN": "2m",
    # While marsd starts, the primary is alive with attach on before its export serves.
    "PRIMARY_NOT_SERVING": "2m",
    # A link error stays until the next round that reaches the peer; a fetch fails while the
    # node it fetches from restarts. Both heal by themselves after short network trouble.
    "PEER_UNREACHABLE": "5m",
    "FETCH_FAILING": "5m",
    # Free space near the threshold goes up and down with every log rotation and deletion.
    "SPACE_LOW": "5m",
}
DEFAULT_FOR = "1m"

#: HINTs are what an operator may want to do: a ticket, not a page, and only once it stays.
HINT_FOR = "30m"

#: The labels a finding alert keeps: what the finding is about, and what to do. ``remedy`` is
#: part of the identity because the alert must carry it; the exporters word it alike (it names no
#: figures), and should two views ever word it differently, two alerts are better than a lost one.
FINDING_BY = "code, resource, host, remedy"

#: "resource r on node b", "resource r", "node b" or "the cluster": what a finding is about.
#: An empty label is an absent one in Prometheus, so a node-level finding has no resource label.
WHERE = ("{{ if $labels.resource }}resource {{ $labels.resource }}{{ if $labels.host }} on node "
         "{{ $labels.host }}{{ end }}{{ else if $labels.host }}node {{ $labels.host }}{{ else }}the cluster{{ end }}")


@dataclass(frozen=True)
class Alert:
    """One alerting rule; ``description`` says what it means and what to do."""

    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def rule(self) -> dict[str, object]:
        return {"alert": self.name, "expr": self.expr, "for": self.for_, "labels": {"severity": self.severity},
                "annotations": {"summary": self.summary, "description": self.description}}


def camel(code: str) -> str:
    """``NODE_DOWN`` -> ``NodeDown``: the alert's name after ``Mars``."""
    return "".join(part.capitalize() for part in code.split("_"))


def codes(level: str) -> list[str]:
    """Sorted, so the file does not change with CODES's order; a meaning goes into a Go template
    as it is, so it must not open an action."""
    found = sorted(code for code, (lv, _) in CODES.items() if lv == level)
    for code in found:
        if "{{" in CODES[code][1]:
            raise ValueError(f"the meaning of {code} contains '{{{{', which a Prometheus template would run")
    return found


def finding_alert(code: str) -> Alert:
    level, meaning = CODES[code]
    assert level == "TODO", code
    return Alert(
        name=f"Mars{camel(code)}",
        expr=f'max by ({FINDING_BY}) (mars_finding{{code="{code}"}}) == 1',
        for_=FOR.get(code, DEFAULT_FOR),
        severity="critical" if code in CRITICAL else "warning",
        summary=f"MARS {code}: {WHERE}",
        description=f"{code}: {meaning}. 'marsadm view' shows the finding with its figures. "
                    "Remedy: {{ $labels.remedy }}")


def unknown_todo_alert() -> Alert:
    """A TODO code these rules do not know: an exporter newer than the rules still pages."""
    known = "|".join(codes("TODO"))
    return Alert(
        name="MarsUnknownTodoFinding",
        expr=f'max by ({FINDING_BY}) (mars_finding{{level="TODO", code!~"{known}"}}) == 1',
        for_=DEFAULT_FOR,
        severity="warning",
        summary=f"MARS {{{{ $labels.code }}}}: {WHERE}",
        description="A TODO finding these alerting rules have no alert of their own for: mars-exporter is newer "
                    "than mars-alerts.yml (regenerate it with tools/alerts.py of the same version). 'marsadm view' "
                    "shows the finding with its figures. Remedy: {{ $labels.remedy }}")


def hint_alert() -> Alert:
    """Every HINT in one rule: the meaning is looked up by code, so a new HINT needs no new rule."""
    meanings = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq $labels.code "{code}" }}}}{CODES[code][1]}'
                       for i, code in enumerate(codes("HINT")))
    return Alert(
        name="MarsHint",
        expr=f'max by ({FINDING_BY}) (mars_finding{{level="HINT"}}) == 1',
        for_=HINT_FOR,
        severity="info",
        summary=f"MARS hint {{{{ $labels.code }}}}: {WHERE}",
        description=f"{{{{ $labels.code }}}}: {meanings}{{{{ else }}}}a hint these alerting rules do not know"
                    f"{{{{ end }}}}, for {HINT_FOR} now. 'marsadm view' shows it with its figures. "
                    "Remedy: {{ $labels.remedy }}")


MEMBER = "resource {{ $labels.resource }} on node {{ $labels.host }}"

# What the findings already alert about, taken out of the history rules so that one cause gives
# one alert: a node that is down (NODE_DOWN in the others' view, MARSD_DOWN in its own) moves no
# position, and neither does a replay that stopped (REPLAY_STOPPED, or a failed attach).
UNLESS_NODE_DOWN = 'unless on (host) max by (host) (mars_finding{code=~"NODE_DOWN|MARSD_DOWN"})'
UNLESS_REPLAY_STOPPED = "unless max by (resource, host) (mars_member_replay_stopped) == 1"

REPLICATION = [
    Alert(
        name="MarsReplicationLagGrowing",
        # The value is the lag (the left operand), for the description. A paused replay is
        # left in: REPLAY_PAUSED is only a HINT, and the copy getting older is worth a warning.
        expr="min by (resource, host) (mars_member_replay_lag_seconds) > 60\n"
             "and min by (resource, host) (deriv(mars_member_replay_lag_seconds[10m])) > 0\n"
             f"{UNLESS_REPLAY_STOPPED}\n{UNLESS_NODE_DOWN}",
        for_="10m",
        severity="warning",
        summary=f"MARS replication lag growing: {MEMBER}",
        description="The copy of {{ $labels.resource }} on {{ $labels.host }} is {{ $value | humanizeDuration }} "
                    "behind the primary's log end and has fallen further behind for 20 minutes: it fetches or "
                    "replays slower than the primary writes. 'marsadm view {{ $labels.resource }}' on "
                    "{{ $labels.host }} shows whether fetch or replay lags; a paused one resumes with 'marsadm "
                    "connect {{ $labels.resource }}' or 'marsadm resume-replay {{ $labels.resource }}' there; "
                    "otherwise check the network to the primary and the disk of {{ $labels.host }}."),
    Alert(
        name="MarsSyncStalled",
        # The value is the bytes left. SYNC_PAUSED covers a sync that is switched off.
        expr='min by (resource, host) (mars_member_sync_remaining_bytes) > 0\n'
             'and min by (resource, host) (mars_member_switch{switch="sync"}) == 1\n'
             'and max by (resource, host) (changes(mars_member_sync_position_bytes[15m])) == 0\n'
             f"{UNLESS_NODE_DOWN}",
        for_="15m",
        severity="warning",
        summary=f"MARS sync stalled: {MEMBER}",
        description="The full sync of {{ $labels.resource }} on {{ $labels.host }} is switched on with "
                    "{{ $value | humanize1024 }}B left, but its position has not moved for 30 minutes, so "
                    "{{ $labels.host }} stays inconsistent. 'marsadm view {{ $labels.resource }}' on "
                    "{{ $labels.host }} says why (not attached, the host's sync limit, the primary unreachable); "
                    "'marsadm pause-sync {{ $labels.resource }}' then 'marsadm resume-sync {{ $labels.resource }}' "
                    "there restarts it."),
    Alert(
        name="MarsReplayNotAdvancing",
        # REPLAY_PAUSED (switched off) and REPLAY_STOPPED (a damaged record) have findings of
        # their own; this is the replay that is switched on and should run, and does not.
        expr='min by (resource, host) (mars_member_replay_remaining_bytes) > 0\n'
             'and max by (resource, host) (changes(mars_member_replay_position_bytes[10m])) == 0\n'
             'and max by (resource, host) (changes(mars_member_fetch_position_bytes[10m])) > 0\n'
             'and min by (resource, host) (mars_member_switch{switch="replay"}) == 1\n'
             f"{UNLESS_REPLAY_STOPPED}\n{UNLESS_NODE_DOWN}",
        for_="5m",
        severity="warning",
        summary=f"MARS replay not advancing: {MEMBER}",
        description="{{ $labels.host }} fetches the log of {{ $labels.resource }} but has replayed nothing for 15 "
                    "minutes, with {{ $value | humanize1024 }}B left to replay: its data device falls behind. Look "
                    "at marsd's log on {{ $labels.host }} ('journalctl -u marsd') and at 'marsadm view "
                    "{{ $labels.resource }}' there; 'marsadm pause-replay {{ $labels.resource }}' then 'marsadm "
                    "resume-replay {{ $labels.resource }}' restarts the replay."),
]

SPACE = [
    Alert(
        name="MarsDirFillingUp",
        # Once SPACE_LOW or EMERGENCY is reported, that alert says the same, and louder.
        expr="max by (host) (predict_linear(mars_node_dir_free_bytes[1h], 4 * 3600)) < 0\n"
             'unless on (host) max by (host) (mars_finding{code=~"SPACE_LOW|EMERGENCY"})',
        for_="15m",
        severity="warning",
        summary="MARS directory filling up: node {{ $labels.host }}",
        description="At the rate of the last hour, the MARS directory of {{ $labels.host }} runs full within 4 "
                    "hours; then its logs stop and writes to the resources it is primary of fail. Free space: "
                    "'marsadm log-delete-all all' on {{ $labels.host }} deletes the logs every member has "
                    "replayed; resume a paused replay, remove a dead node, or grow the file system."),
]

EXPORTER = [
    Alert(
        name="MarsExporterDown",
        expr=f'up{{job="{JOB}"}} == 0',
        for_="2m",
        severity="warning",
        summary="mars-exporter down: {{ $labels.instance }}",
        description="Prometheus cannot scrape mars-exporter at {{ $labels.instance }}: that node's view of the "
                    "cluster is missing (the other nodes' exporters still report its findings). Check that "
                    "mars-exporter runs on {{ $labels.instance }} ('systemctl status mars-exporter') and that "
                    "Prometheus reaches its port."),
    Alert(
        name="MarsExporterAbsent",
        expr=f'absent(up{{job="{JOB}"}})',
        for_="10m",
        severity="warning",
        summary=f"No mars-exporter target in job {JOB}",
        description=f"Prometheus has no target of job {JOB}, so none of the MARS alerts can fire. Check the "
                    f"scrape configuration (a job_name {JOB} listing every node's mars-exporter, port 9777 by "
                    f"default) and the service discovery."),
    Alert(
        name="MarsSnapshotFailing",
        # The reason is a separate info series; joined, the alert carries it. The 'or' keeps the
        # alert should that series ever be missing.
        expr="(mars_snapshot_ok == 0) * on (instance, job) group_left (reason) mars_snapshot_error_info\n"
             "or on (instance, job) mars_snapshot_ok == 0",
        for_="5m",
        severity="warning",
        summary="mars-exporter cannot read the MARS state: {{ $labels.instance }}",
        description="mars-exporter at {{ $labels.instance }} answers, but cannot read its node's MARS state, so "
                    "that node's view of the cluster is missing. {{ with $labels.reason }}Why, and what to do: "
                    "{{ . }}{{ else }}Why: mars_snapshot_error_info on its /metrics page.{{ end }}"),
]

# marsd: the finding MARSD_DOWN (the local exporter's own view: no marsd process) is the alert
# MarsMarsdDown above, so there is no rule on 'mars_marsd_up == 0' alone: it is 0 in that case
# too, and would alert twice for one stopped marsd. mars_marsd_up is also 0 when the process
# runs but does not answer on its control socket, which no finding reports: that remainder is
# this alert, with the MARSD_DOWN case taken out.
MARSD = [
    Alert(
        name="MarsMarsdNotAnswering",
        expr="max by (host) (mars_marsd_up) == 0\n"
             'unless on (host) max by (host) (mars_finding{code="MARSD_DOWN"})',
        for_="2m",
        severity="warning",
        summary="marsd does not answer: node {{ $labels.host }}",
        description="marsd runs on {{ $labels.host }} but does not answer on its control socket (or sends no "
                    "counters: a marsd older than mars-exporter), so its counters are missing and the status is "
                    "what the tree knows. Look at marsd's log on {{ $labels.host }} ('journalctl -u marsd'); "
                    "'systemctl kill -s USR1 marsd' logs where it hangs; 'systemctl restart marsd' if it does."),
]


def groups() -> list[tuple[str, list[Alert]]]:
    findings = [finding_alert(code) for code in codes("TODO")] + [unknown_todo_alert(), hint_alert()]
    return [("mars-findings", findings), ("mars-replication", REPLICATION), ("mars-space", SPACE),
            ("mars-exporter", EXPORTER), ("mars-marsd", MARSD)]


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as block scalars, so the file reads like a hand-written one."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)

HEADER = """\
# MARS alerting rules for Prometheus.
# Generated by tools/alerts.py from the exporter's findings (mars.engine.model.CODES): do not edit,
# run '.venv/bin/python tools/alerts.py'. Tests: mars-alerts.test.yml ('promtool test rules').
"""


def render() -> str:
    doc = {"groups": [{"name": name, "rules": [a.rule() for a in alerts]} for name, alerts in groups()]}
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1 << 16, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alerts.py", description="Generate MARS's Prometheus alerting rules.")
    ap.add_argument("--check", action="store_true", help="only report a stale rules file (exit 1)")
    ap.add_argument("--out", type=Path, default=RULES_FILE, help=f"where the rules go (default: {RULES_FILE})")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"alerts.py: {args.out} is stale; run '.venv/bin/python tools/alerts.py'", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
