"""mars-exporter without a cluster: the catalogue, the families of hand-made snapshots, promtool's
lint, the HTTP face (paths, content negotiation, a state that cannot be read) and its command line.

The exporter on a real cluster under a real Prometheus is tests/test_prometheus.py.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from mars.engine.model import (DISKSTATES, REPLSTATES, ROLES, Counters, Histogram, MarsError, Member, Progress,
                               ResourceCounters, SplitBrain, ExchangeCounters, Tunable, findings, state_name)
from mars.engine.stats import LATENCY_BOUNDS_S
from mars.exporters import prometheus as px
from test_findings import GiB, MiB, LOG_END, healthy, member, node, resource

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def counters() -> Counters:
    rc = ResourceCounters(nbd_requests={"read": 3, "write": 10, "flush": 1, "trim": 0, "write_zeroes": 0},
                          nbd_bytes={"read": 12288, "write": 40960, "flush": 0, "trim": 0, "write_zeroes": 0},
                          log_records=10, log_bytes=41760, group_commits=4,
                          write_latency=Histogram(list(LATENCY_BOUNDS_S), [0] * 3 + [6, 4] + [0] * 12, 0.011),
                          fetched_bytes=0, replayed_bytes=0, synced_bytes=0)
    ex = ExchangeCounters(pulls=120, full_pulls=2, repairs=0, pushes=7, entries_received=300, entries_taken=150,
                          entries_sent=290, scans=12, external_changes=3)
    return Counters(started_at_s=1_699_999_000.0, resources={"r": rc}, exchange=ex)


def rich():
    """Every family has something to say: counters, a split brain, a held-back deletion, a rate."""
    s = dataclasses.replace(healthy(), counters=counters())
    member(s, "b", fetch=Progress(4 * GiB, LOG_END, 100.0 * MiB), replay=Progress(3 * GiB, LOG_END, 0.0),
           fetch_lag_s=12.0, replay_lag_s=20.0)
    resource(s, split_brain=[SplitBrain(3, {"a": "a:1", "c": "c:2"})], held_back_by=["c"],
             deletable_logs=["log-000000001-a"], deletable_bytes=4096)
    member(s, "c", fetch=Progress(LOG_END, LOG_END, None))
    node(s, "c", link_errors={"b": "connection refused"}, emergency=True)
    node(s, "b", tunables=[Tunable("port", None, "7777"), Tunable("traffic-out-limit", str(20 * MiB), "0")])
    return s


class One:
    """A registry of one collector over a fixed source, as the encoders want."""

    def __init__(self, source, members: str = "all") -> None:
        self.c = px.MarsCollector(source, members)

    def collect(self):
        return self.c.collect()


def text_of(snap, members: str = "all") -> str:
    return generate_latest(One(lambda: (snap, snap.marsd_running), members)).decode()  # marsd answers iff it runs


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def promtool_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


# --- the catalogue ---------------------------------------------------------------------------------

def test_the_catalogue_follows_the_prometheus_naming_rules():
    names = [s.name for s in px.METRICS]
    assert len(names) == len(set(names))
    for s in px.METRICS:
        assert re.fullmatch(r"mars_[a-z][a-z0-9_]*", s.name), s.name
        assert s.help and (s.help[0].isupper() or s.help[0].isdigit()), s.name
        assert s.name.endswith("_total") == (s.type == "counter"), s.name
        assert s.name.endswith("_info") == (s.type == "info"), s.name
        assert not re.search(r"_(ms|sec|kb|mb|gb|percent|count)(_|$)", s.name), s.name
        assert all(re.fullmatch(r"[a-z][a-z_]*", x) for x in s.labels), s.name


def test_every_catalogued_family_appears_and_nothing_else():
    emitted = {f.name + ("_total" if f.type == "counter" else "")
               for f in px.families(rich(), findings(rich()), 0.01, members="all")}
    emitted |= {f.name for f in px.failure_families("x")}
    emitted = {n if n in px.BY_NAME else n + "_info" for n in emitted}
    assert emitted == set(px.BY_NAME), emitted ^ set(px.BY_NAME)


def test_promtool_finds_nothing_to_lint_in_any_state():
    states = {"healthy": healthy(), "rich": rich()}
    s = healthy()
    node(s, "c", alive=False, seen_age_s=None)
    states["node down"] = s
    for name, snap in states.items():
        r = promtool_metrics(text_of(snap))
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
    r = promtool_metrics(generate_latest(One(lambda: (_ for _ in ()).throw(MarsError("gone", "fix it")))).decode())
    assert r.returncode == 0, r.stdout + r.stderr


# --- what the families say -------------------------------------------------------------------------

def test_findings_are_the_status_models_findings_one_series_each():
    s = rich()
    got = {(x.labels["code"], x.labels["level"], x.labels["resource"], x.labels["host"], x.labels["remedy"])
           for x in samples(text_of(s))["mars_finding"]}
    want = {(f.code, f.level, f.res or "", f.node or "", f.remedy) for f in findings(s)}
    assert got == want and ("SPLIT_BRAIN", "TODO", "r", "", next(f.remedy for f in findings(s)
                                                                  if f.code == "SPLIT_BRAIN")) in got


def test_states_are_one_hot_and_name_what_marsadm_view_names():
    s = rich()
    by = samples(text_of(s))
    for fam, states, of in (("mars_member_role", ROLES, Member.role),
                            ("mars_member_disk_state", DISKSTATES, lambda m: state_name(m.diskstate())),
                            ("mars_member_repl_state", REPLSTATES, Member.replstate)):
        for h in "abc":
            mine = [x for x in by[fam] if x.labels["host"] == h]
            assert sorted(x.labels[fam] for x in mine) == sorted(states)
            on = [x.labels[fam] for x in mine if x.value == 1]
            assert on == [of(Member(s, s.resources["r"], h))], (fam, h)


def test_figures_are_the_members_and_unknown_ones_are_absent():
    s = rich()
    by = samples(text_of(s))

    def value(name, **labels):
        hits = [x.value for x in by.get(name, []) if all(x.labels.get(k) == v for k, v in labels.items())]
        return hits[0] if hits else None

    m = Member(s, s.resources["r"], "b")
    assert value("mars_member_fetch_position_bytes", host="b") == m.pos("fetch")
    assert value("mars_member_fetch_remaining_bytes", host="b") == m.rest("fetch") > 0
    assert value("mars_member_fetch_rate_bytes_per_second", host="b") == 100.0 * MiB
    assert value("mars_member_fetch_remaining_seconds", host="b") == pytest.approx(m.remain("fetch"))
    assert value("mars_member_fetch_progress_ratio", host="b") == pytest.approx(m.percent("fetch") / 100)
    assert 0 < value("mars_member_fetch_progress_ratio", host="b") < 1
    assert value("mars_member_fetch_lag_seconds", host="b") == 12.0
    assert value("mars_member_fetch_rate_bytes_per_second", host="c") is None  # rate None: not running
    assert value("mars_member_fetch_remaining_seconds", host="c") == 0.0  # done: nothing left, known
    assert value("mars_member_fetch_lag_seconds", host="a") == 0.0
    assert value("mars_resource_split_brain", resource="r") == 1
    assert value("mars_resource_deletion_held_back", resource="r", host="c") == 1
    assert value("mars_node_link_up", host="c", peer="b") == 0 and value("mars_node_link_up", host="c", peer="a") == 1
    assert value("mars_node_emergency", host="c") == 1
    assert value("mars_marsd_up", host="a") == 1
    # counters and the histogram: cumulative buckets ending at +Inf with the count
    assert value("mars_nbd_requests_total", command="write") == 10
    buckets = [(x.labels["le"], x.value) for x in by["mars_write_latency_seconds_bucket"]]
    assert buckets[-1] == ("+Inf", 10) and [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert value("mars_write_latency_seconds_count") == 10 and value("mars_write_latency_seconds_sum") == 0.011


def test_by_default_an_exporter_serves_its_own_nodes_members_and_the_whole_view_else():
    by = samples(text_of(rich(), members="local"))
    assert {x.labels["host"] for x in by["mars_member_role"]} == {"a"}  # the tree is a's
    assert {x.labels["host"] for x in by["mars_node_alive"]} == {"a", "b", "c"}
    assert {x.labels["host"] for x in by["mars_finding"]} >= {"b", "c"}  # findings about others stay
    assert {x.labels["host"] for x in samples(text_of(rich()))["mars_member_role"]} == {"a", "b", "c"}


def test_with_marsd_down_the_tree_still_speaks_and_counters_are_gone():
    s = dataclasses.replace(healthy(), marsd_running=False, marsd_pid=None)
    by = samples(text_of(s))
    assert [x.value for x in by["mars_marsd_up"]] == [0]
    assert "mars_nbd_requests_total" not in by and "mars_marsd_start_time_seconds" not in by
    assert any(x.labels["code"] == "MARSD_DOWN" for x in by["mars_finding"])
    assert by["mars_snapshot_ok"][0].value == 1


def test_a_deleted_resource_and_a_departed_node_have_no_series_on_the_next_scrape():
    s = rich()
    first = text_of(s)
    assert 'resource="r"' in first and 'host="c"' in first
    gone = dataclasses.replace(s, resources={}, nodes={h: n for h, n in s.nodes.items() if h != "c"},
                               counters=Counters(s.counters.started_at_s, {}))
    second = text_of(gone)
    assert 'resource="r"' not in second and 'host="c"' not in second and 'peer="c"' not in second


# --- the HTTP face ---------------------------------------------------------------------------------

@pytest.fixture
def server():
    state = {"source": lambda: (rich(), True)}
    srv = px.serve(px.MarsCollector(lambda: state["source"](), "all"), ("127.0.0.1", 0))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()
    t.join(10)


def get(url: str, accept: str | None = None, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def test_metrics_in_text_and_openmetrics_by_accept_and_nothing_elsewhere(server):
    url, _ = server
    status, ctype, body = get(url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4") and "mars_snapshot_ok 1.0" in body
    status, ctype, body = get(url + "/metrics", "application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert status == 200 and ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
    assert "# TYPE mars_member_role stateset" in body and "# TYPE mars_resource info" in body
    assert "# UNIT mars_resource_size_bytes bytes" in body
    for path in ("/", "/metricsx", "/favicon.ico"):
        status, _, body = get(url + path)
        assert status == 404 and "/metrics" in body
    assert get(url + "/metrics", method="POST")[0] == 405


def test_a_state_that_cannot_be_read_is_a_200_that_says_why(server):
    url, state = server

    def unreadable():
        raise MarsError("/mars: permission denied", "the state tree is for root only; run the tool as root")

    def broken():
        raise RuntimeError("a bug")

    state["source"] = unreadable
    status, _, body = get(url + "/metrics")
    assert status == 200 and "mars_snapshot_ok 0.0" in body
    assert 'mars_snapshot_error_info{reason="/mars: permission denied; the state tree is for root only; run the ' \
           'tool as root"} 1.0' in body
    assert "mars_member_role" not in body  # nothing made up
    state["source"] = broken
    status, _, body = get(url + "/metrics")
    assert status == 200 and "mars_snapshot_ok 0.0" in body and "a bug" in body and "Traceback" not in body
    state["source"] = lambda: (rich(), True)
    assert "mars_snapshot_ok 1.0" in get(url + "/metrics")[2]


def test_openmetrics_output_parses_back():
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    body = generate_openmetrics(One(lambda: (rich(), True))).decode()
    names = {f.name for f in om_parse(body)}
    assert {"mars_member_role", "mars_nbd_requests", "mars_write_latency_seconds", "mars_finding"} <= names


# --- the command line ------------------------------------------------------------------------------

def exporter(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mars-exporter"), *args], capture_output=True, text=True, timeout=timeout)


def test_operator_mistakes_get_a_message_and_no_traceback(tmp_path):
    r = exporter("--listen", "localhost", "--mars-dir", str(tmp_path))
    assert r.returncode == 2 and "--listen 'localhost' is not ADDR:PORT; for example" in r.stderr, r.stderr
    r = exporter("--window", "-3", "--mars-dir", str(tmp_path))
    assert r.returncode == 2 and "--window -3 is not a positive number of seconds" in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = exporter("--listen", f"127.0.0.1:{port}", "--mars-dir", str(tmp_path))
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--listen" in r.stderr, r.stderr
    for r in (exporter("--listen", "x"), exporter("--window", "0")):
        assert "Traceback" not in r.stderr


def test_once_without_a_tree_says_unknown_state_not_a_crash(tmp_path):
    r = exporter("--once", "--mars-dir", str(tmp_path / "none"), "--host", "a")
    assert r.returncode == 0 and "mars_snapshot_ok 0.0" in r.stdout and "does not exist" in r.stdout


def test_the_readme_metric_table_is_the_catalogue():
    text = (ROOT / "exporters" / "README.md").read_text()
    begin, end = "<!-- metrics: generated by 'mars-exporter --metrics-doc' -->\n", "<!-- end of metrics -->"
    assert begin in text and end in text, "exporters/README.md lost its generated-table markers"
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table == px.metrics_doc(), "exporters/README.md is stale: paste 'mars-exporter --metrics-doc' between the markers"
