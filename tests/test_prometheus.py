"""The Prometheus face on a real cluster: real marsd processes, one mars-exporter per node, and
Debian's real Prometheus scraping them with our alert rules, asked through its HTTP API.

What must hold (issue: the Prometheus face): every target up; the series say what `marsadm
view-*` says; every query of every dashboard panel evaluates and shows data where the cluster
state implies it; an alert fires when a node's marsd is killed and resolves when it is back;
promtool's lint is clean in every state of the status tests; a resource deleted, or a member that
left, has no series on the next scrape.

Prometheus runs with 1 s scrape and evaluation intervals and the rules of
dashboards/prometheus/mars-alerts.yml with every ``for:`` cut to 1 s (their own durations are
tested by ``promtool test rules``, tests/test_alert_rules.py): what is tested here is that the
expressions meet the real exporters' series.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from harness import Node, caught_up, free_port, run, wait_until, write

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
RULES = ROOT / "dashboards" / "prometheus" / "mars-alerts.yml"
DASHBOARDS = ROOT / "dashboards" / "grafana"


@pytest.fixture(autouse=True)
def _prometheus_installed() -> None:
    """make test installs Debian's prometheus; a missing one is a broken install, not a reason to skip."""
    assert Path(PROMETHEUS).exists() and Path(PROMTOOL).exists(), "apt-get install prometheus (make deps does)"


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


class Exporter:
    """mars-exporter for one node, listening on the node's own address as in production."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.address = f"{node.ip}:{free_port(node.ip)}"
        self.url = f"http://{self.address}/metrics"
        self.log_path = node.base / f"exporter-{node.host}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "mars-exporter"), "--mars-dir", str(self.node.mars_dir),
                                          "--host", self.node.host, "--listen", self.address, "--window", "2"],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: http_get(self.url, 2)[0] == 200 or self.proc.poll() is not None, 30,
                   f"exporter {self.node.host} to answer")
        assert self.proc.poll() is None, self.log_path.read_text()

    def scrape(self) -> str:
        status, body = http_get(self.url)
        assert status == 200, body
        return body

    def stop(self) -> None:
        terminate(self.proc, 10)


def terminate(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds; nothing if it already ended."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def fast_rules(dest: Path) -> Path:
    """Our rules with every ``for:`` cut to 1 s, so a test sees an alert fire within seconds."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


class Prometheus:
    """Debian's prometheus as a process on 127.0.0.1, with a temporary config and storage."""

    def __init__(self, base: Path, targets: list[str]) -> None:
        self.dir = base / "prometheus"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = fast_rules(self.dir / "mars-alerts.yml")
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                  "rule_files": [str(rules)],
                  "scrape_configs": [{"job_name": "mars", "static_configs": [{"targets": targets}]}]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        check = run([PROMTOOL, "check", "config", str(self.dir / "prometheus.yml")], check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: http_get(self.url + "/-/ready", 2)[0] == 200 or self.proc.poll() is not None, 60,
                   "prometheus to be ready")
        assert self.proc.poll() is None, self.log_path.read_text()

    def api(self, path: str, **params: str) -> object:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        doc = json.loads(body)
        assert status == 200 and doc.get("status") == "success", f"{path} {params}: {body[:500]}"
        assert not doc.get("warnings"), doc["warnings"]
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def firing(self) -> list[dict]:
        data = self.api("alerts")
        assert isinstance(data, dict)
        return [a for a in data["alerts"] if a["state"] == "firing"]

    def stop(self) -> None:
        terminate(self.proc, 20)


@pytest.fixture
def exporters(trio):
    started = [Exporter(n) for n in trio]
    try:
        for e in started:
            e.start()
        yield started
    finally:
        for e in started:
            e.stop()


@pytest.fixture
def watched(trio, exporters):
    """The trio, its exporters, and a Prometheus that has scraped every target at least once."""
    prom = Prometheus(trio[0].base, [e.address for e in exporters])
    try:
        prom.start()
        wait_until(lambda: prom.value('count(up{job="mars"} == 1)') == 3, 60, "every target up")
        yield trio, exporters, prom
    finally:
        prom.stop()


def view(node: Node, macro: str, res: str = "r") -> str:
    return node.marsadm(f"view-{macro}", res).stdout.strip()


# --- the tests ------------------------------------------------------------------------------------

def test_prometheus_scrapes_every_node_and_the_series_say_what_marsadm_view_says(watched):
    (a, b, c), exporters, prom = watched
    targets = prom.api("targets")["activeTargets"]
    assert sorted(t["health"] for t in targets) == ["up"] * 3, targets
    assert prom.value('sum(mars_snapshot_ok{job="mars"})') == 3
    assert prom.value('sum(mars_marsd_up{job="mars"})') == 3
    wait_until(lambda: all(caught_up(a, n, "r") for n in (b, c)), 30, "a quiet cluster")
    for node, exp in zip((a, b, c), exporters):
        on = f'instance="{exp.address}",resource="r",host="{node.host}"'
        # Positions are stable in a quiet cluster; compare once Prometheus has the newest scrape.
        for macro, metric in (("sync-pos", "mars_member_sync_position_bytes"),
                              ("sync-size", "mars_member_sync_size_bytes"),
                              ("fetch-pos", "mars_member_fetch_position_bytes"),
                              ("replay-pos", "mars_member_replay_position_bytes"),
                              ("replay-rest", "mars_member_replay_remaining_bytes"),
                              ("resource-size", "mars_member_disk_size_bytes"),
                              ("device-opened", "mars_member_nbd_clients")):
            want = float(view(node, macro))
            wait_until(lambda: prom.value(f"{metric}{{{on}}}") == want, 15,
                       f"{metric} of {node.host} to be marsadm view-{macro} = {want:g}")
        for macro, metric in (("role", "mars_member_role"), ("diskstate", "mars_member_disk_state"),
                              ("replstate", "mars_member_repl_state")):
            want = view(node, macro).split("[", 1)[0]
            wait_until(lambda: [r["metric"][metric] for r in prom.query(f"{metric}{{{on}}} == 1")] == [want], 15,
                       f"{metric} of {node.host} to be {want}")
    # The counters of the primary's marsd: the 1 MiB the trio fixture wrote, one request at least.
    on_a = f'instance="{exporters[0].address}",resource="r"'
    assert prom.value(f'mars_nbd_request_bytes_total{{{on_a},command="write"}}') >= 1 << 20
    assert prom.value(f"mars_write_latency_seconds_count{{{on_a}}}") >= 1
    # No findings in a healthy cluster, so no alert; MarsDirFillingUp aside: it extrapolates the
    # free space of the disk the MARS directories share with every other test (and pytest worker),
    # whose files come and go while this one runs; tests/test_alert_rules.py tests that rule.
    assert prom.query('mars_finding{level="TODO"}') == []
    assert [a for a in prom.firing() if a["labels"]["alertname"] != "MarsDirFillingUp"] == []


def test_every_dashboard_query_evaluates_and_shows_data(watched):
    """Every panel's every query, with the dashboards' variables set to this cluster, evaluates
    without error; in a cluster that writes, with one replay paused (a HINT finding, a lag, an
    alert), each shows data, but the one whose subject does not exist here (named below)."""
    sys.path.insert(0, str(ROOT))
    from tools.dashboards import panel_queries, substitute
    (a, b, c), _, prom = watched
    c.marsadm("pause-replay", "r")
    wait_until(lambda: prom.query('mars_finding{code="REPLAY_PAUSED"}'), 30, "the paused replay as a finding")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:  # a few seconds of writes: rates, latencies, group commits
        write(a, "write -P 0x22 0 256k", "write -P 0x23 1M 64k")
    wait_until(lambda: prom.firing(), 30, "an alert to fire (the paused replay's HINT)")
    queries = [q for f in sorted(DASHBOARDS.glob("*.json")) for q in panel_queries(json.loads(f.read_text()))]
    assert len(queries) >= 20, queries
    empty = []
    for dash, panel, expr in queries:
        result = prom.query(substitute(expr, resource="r", host=".*"))
        if not result:
            empty.append((dash, panel, expr))
    # What this cluster legitimately does not have: a rate is absent while nothing moves.
    allowed = {"Full sync rate": "every member's sync is done"}
    unexpected = [e for e in empty if e[1] not in allowed]
    assert not unexpected, "panels without data:\n" + "\n".join(f"{d} / {p}: {x}" for d, p, x in unexpected)


def test_an_alert_fires_when_a_marsd_is_killed_and_resolves_after_restart(watched):
    (a, b, c), exporters, prom = watched

    def node_down() -> list[dict]:
        # Every exporter's, c's own too: c's tree stands still while its marsd is down, and the
        # model judges a's and b's reports there as of c's last one (it called them down before).
        return [x for x in prom.firing() if x["labels"].get("alertname") == "MarsNodeDown"]

    assert node_down() == []
    c.kill()
    wait_until(lambda: node_down(), 60, "MarsNodeDown to fire for c")
    alerts = node_down()
    assert len(alerts) == 1, [x["labels"] for x in alerts]  # one alert, though a and b both report it
    alert = alerts[0]
    assert alert["labels"]["host"] == "c" and alert["labels"]["severity"] == "critical"
    assert "marsd" in alert["annotations"]["description"], alert
    # c's own exporter keeps answering from c's tree and says its marsd is down.
    assert prom.value(f'mars_marsd_up{{instance="{exporters[2].address}"}}') == 0
    assert prom.value(f'up{{instance="{exporters[2].address}"}}') == 1
    c.start()
    wait_until(lambda: node_down() == [], 60, "MarsNodeDown to resolve after c's restart")
    wait_until(lambda: prom.value(f'mars_marsd_up{{instance="{exporters[2].address}"}}') == 1, 30, "c's marsd up")


def test_a_member_that_left_and_a_deleted_resource_have_no_series_on_the_next_scrape(watched):
    (a, b, c), exporters, prom = watched
    assert 'mars_member_role{host="c",mars_member_role="Secondary",resource="r"} 1.0' in exporters[2].scrape()
    c.marsadm("down", "r")
    c.marsadm("leave-resource", "r")
    def members_of_c(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("mars_member_") and 'host="c"' in line]

    wait_until(lambda: not any(members_of_c(e.scrape()) for e in exporters), 30,
               "c's member series gone from every exporter")
    wait_until(lambda: prom.query('mars_member_role{host="c",resource="r"}') == [], 15,
               "Prometheus to drop c's member series")
    for n in (a, b):
        n.marsadm("down", "r")
    b.marsadm("leave-resource", "r")  # delete-resource refuses while another host is a member
    a.marsadm("delete-resource", "r")
    wait_until(lambda: all('resource="r"' not in e.scrape() for e in exporters), 30, "r gone from every exporter")
    wait_until(lambda: prom.query('{job="mars",resource="r"}') == [], 15, "Prometheus to drop every series of r")


def promtool_check(text: str) -> None:
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_lint_is_clean_in_every_state(trio, exporters):
    """Up to date, paused, split brain, node down: each exporter's scrape passes promtool's lint
    (the syncing state is the next test)."""
    from mars.engine.tree import Tree
    a, b, c = trio

    def all_clean() -> None:  # every exporter, also the one of a node whose marsd is dead
        for e in exporters:
            promtool_check(e.scrape())

    all_clean()
    c.marsadm("pause-replay", "r")
    wait_until(lambda: 'code="REPLAY_PAUSED"' in exporters[0].scrape(), 30, "the paused replay")
    all_clean()
    write(a, "write -P 0x66 1M 3M")  # log 1 is finished by the rotation at 2 MiB
    wait_until(lambda: b.tree_value("resource-r/version-000000001-b") is not None, 30, "b's version of log 1")
    good = b.tree_value("resource-r/version-000000001-b")
    Tree(b.mars_dir, "b").set("resource-r/version-000000001-b", "f" * len(good.split(",", 1)[0]) + "," +
                              good.split(",", 1)[1])
    wait_until(lambda: 'mars_resource_split_brain{resource="r"} 1.0' in exporters[0].scrape(), 30, "split brain")
    all_clean()
    c.kill()
    wait_until(lambda: 'code="NODE_DOWN"' in exporters[0].scrape(), 30, "c down")
    all_clean()


def test_promtool_lint_is_clean_while_a_secondary_syncs(sparse_8t):
    a, b, _ = sparse_8t
    b.marsadm("join-resource", "r", str(b.base / "b.img"))
    wait_until(lambda: b.tree_value("resource-r/syncstatus-b") not in (None, "0"), 30, "b's sync to start")
    for n in (a, b):  # every member, as a's tree knows b's sync too
        out = run([str(BIN / "mars-exporter"), "--once", "--members", "all", "--mars-dir", str(n.mars_dir),
                   "--host", n.host]).stdout
        assert 'mars_member_repl_state{host="b",mars_member_repl_state="Syncing",resource="r"} 1.0' in out, out
        assert 'code="SYNC_RUNNING"' in out
        promtool_check(out)
