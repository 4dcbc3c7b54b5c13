"""The Grafana dashboards in dashboards/grafana/ are what tools/dashboards.py generates, and every
query in them can show something.

A dashboard fails silently: a renamed metric, a misspelt state or a label the metric does not have
gives an empty panel, not an error. So each query is checked here against what the exporter can
emit (its catalogue, :data:`mars.exporters.prometheus.METRICS`, and the state names of
:mod:`mars.engine.model`), against the rules of Grafana's dashboard-linter (template-datasource,
panel-datasource, target-rate-interval) and against ``promtool``, Prometheus's own parser. None of
this needs a cluster; tests/test_prometheus.py runs the same queries against a real Prometheus.

Stale files mean the code changed without a regeneration: run ``.venv/bin/python tools/dashboards.py``
and check dashboards/grafana/ in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import dashboards
from dashboards import panel_queries, substitute
from mars.engine.model import CODES, DISKSTATES, LEVELS, REPLSTATES, ROLES
from mars.exporters.prometheus import ACTIVITIES, METRICS, SWITCHES

DOCS: dict[str, dict[str, Any]] = {name: json.loads(dashboards.render(build))
                                   for name, build in dashboards.DASHBOARDS.items()}
QUERIES = [(name, panel, expr) for name, doc in DOCS.items() for _, panel, expr in panel_queries(doc)]
QUERY_IDS = [f"{name.removesuffix('.json')}:{panel}:{i}" for i, (name, panel, _) in enumerate(QUERIES)]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

STATESETS = {"mars_member_role": ROLES, "mars_member_disk_state": DISKSTATES, "mars_member_repl_state": REPLSTATES}
#: (metric, label) -> every value the exporter can give that label; a matcher on anything else matches nothing
DOMAINS: dict[tuple[str, str], tuple[str, ...]] = {
    **{(name, name): states for name, states in STATESETS.items()},
    ("mars_finding", "level"): LEVELS,
    ("mars_finding", "code"): tuple(CODES),
    ("mars_member_active", "activity"): ACTIVITIES,
    ("mars_member_switch", "switch"): SWITCHES,
    ("ALERTS", "alertstate"): ("pending", "firing"),
}
#: its help says so: resource and host are empty when a finding is not about one ("$resource|" keeps those)
EMPTY_WHEN_CLUSTER_WIDE = {"mars_finding"}


def _labels() -> dict[str, set[str]]:
    """Every series name a query may use, with its labels (Prometheus adds instance and job)."""
    out: dict[str, set[str]] = {}
    for s in METRICS:
        labels = {*s.labels, "instance", "job"}
        if s.type == "stateset":
            labels.add(s.name)  # prometheus_client names the state label after the family
        if s.type == "histogram":
            out.update({f"{s.name}_bucket": labels | {"le"}, f"{s.name}_sum": labels, f"{s.name}_count": labels})
        else:
            out[s.name] = labels
    # Prometheus's own series (ALERTS also has whatever labels the alert rules set)
    out["up"] = out["scrape_duration_seconds"] = {"instance", "job"}
    out["ALERTS"] = {"alertname", "alertstate", "severity", "instance", "job"}
    return out


LABELS = _labels()


# --- a little PromQL reading (enough for the queries dashboards.py writes) ----------------------

STRING = r'"(?:[^"\\]|\\.)*"'
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
            "inf", "nan",  # and the aggregations, which "sum by (...) (...)" puts before no "("
            "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
            "quantile"}
CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# strings, ranges and grouping clauses are skipped whole; what is left of interest is a name, not a
# function's (no "(" after it), with its label matchers if it has any
TOKEN = re.compile(STRING + r"|\[[^\]]*\]|" + CLAUSE.pattern
                   + r'|(?<![\w:.])(?P<name>[A-Za-z_:][\w:]*)(?![\w:])\s*(?P<matchers>\{(?:[^}"]|' + STRING
                   + r")*\})?(?!\s*\()")
STRING_AT = re.compile(STRING)
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """Every series selector: its name and label matchers (none for a bare name)."""
    for m in TOKEN.finditer(expr):
        if m.group("name") and m.group("name").lower() not in KEYWORDS:
            yield m.group("name"), MATCHER.findall(m.group("matchers") or "")


def metric_names(expr: str) -> list[str]:
    return [name for name, _ in selectors(expr)]


def inside(expr: str, open_at: int) -> str:
    """What the parenthesis at ``open_at`` encloses."""
    depth, i = 0, open_at
    while i < len(expr):
        c = expr[i]
        if c == '"':
            i = STRING_AT.match(expr, i).end()  # type: ignore[union-attr]
            continue
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0:
            return expr[open_at + 1:i]
        i += 1
    raise AssertionError(f"unbalanced parenthesis in {expr!r}")


def label_list(text: str) -> list[str]:
    return [label.strip() for label in text.split(",") if label.strip()]


def all_panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in panels:
            yield p
            yield from walk(p.get("panels") or [])
    return walk(doc["panels"])


def query_panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(doc) if p["type"] not in ("row", "text")]


# --- 1. the checked-in files are the generated ones ----------------------------------------------

def test_checked_in_dashboards_are_up_to_date():
    """The rules below read the generated documents (:data:`DOCS`); this makes them the shipped ones."""
    assert dashboards.stale() == [], (
        "dashboards/grafana/ is stale; run '.venv/bin/python tools/dashboards.py' and commit dashboards/grafana/")


def test_generation_is_deterministic_and_check_names_a_stale_file(tmp_path):
    for name, build in dashboards.DASHBOARDS.items():
        first = dashboards.render(build)
        assert first == dashboards.render(build) and first.endswith("}\n")
        (tmp_path / name).write_text(first)
    assert dashboards.stale(tmp_path) == []
    (tmp_path / "mars-node.json").write_text("{}\n")
    assert dashboards.stale(tmp_path) == ["mars-node.json"]
    cli = subprocess.run([sys.executable, str(ROOT / "tools" / "dashboards.py"), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr


def test_each_dashboard_has_its_uid_settings_and_links_to_the_others():
    titles = set()
    for name, doc in DOCS.items():
        assert doc["uid"] == name.removesuffix(".json")
        assert doc["time"] == {"from": "now-1h", "to": "now"} and doc["refresh"] == "30s" and doc["editable"]
        assert dashboards.TAG in doc["tags"]
        assert any(link["type"] == "dashboards" and link["tags"] == [dashboards.TAG] and link["includeVars"]
                   and link["keepTime"] for link in doc["links"]), "no link to the other MARS dashboards"
        titles.add(doc["title"])
    assert len(titles) == len(DOCS)


@pytest.mark.parametrize("name", DOCS)
def test_panels_have_ids_titles_descriptions_units_and_fit_the_grid(name):
    panels = list(all_panels(DOCS[name]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    for p in panels:
        assert p.get("title"), p
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":  # dashboard-linter: panel-title-description, panel-units
            assert p.get("description"), f"{p['title']}: say what it shows and what to do when it is red"
        if p["type"] in ("timeseries", "stat"):
            assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
    for p in query_panels(DOCS[name]):
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and all(refs) and len(refs) == len(set(refs)), p["title"]


# --- 2. the data source is a variable (dashboard-linter: template-datasource, panel-datasource) ----

@pytest.mark.parametrize("name", DOCS)
def test_datasource_variable_and_every_panel_and_target_use_it(name):
    doc = DOCS[name]
    variables = [v for v in doc["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in variables] == [("datasource", "prometheus")]
    for p in query_panels(doc):
        assert p["datasource"] == DATASOURCE, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, (p["title"], t["refId"])
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, v["name"]


# --- 3. resource and host variables, and every query about one filters by it -------------------

@pytest.mark.parametrize("name", DOCS)
def test_resource_and_host_variables(name):
    variables = {v["name"]: v for v in DOCS[name]["templating"]["list"]}
    for var in ("resource", "host"):
        v = variables[var]
        m = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["query"])
        assert v["type"] == "query" and m, v
        metric, label = m.groups()
        assert metric.startswith("mars_") and metric in LABELS and label == var and var in LABELS[metric], v["query"]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*"


@pytest.mark.parametrize(("name", "panel", "expr"), QUERIES, ids=QUERY_IDS)
def test_queries_about_a_resource_or_host_filter_by_it(name, panel, expr):
    for metric, matchers in selectors(expr):
        labels = LABELS.get(metric, set()) - {metric}  # a stateset's own label is not about a host
        for var in ("resource", "host"):
            if var in labels:
                allowed = {f"${var}"} | ({f"${var}|"} if metric in EMPTY_WHEN_CLUSTER_WIDE else set())
                values = [v for label, op, v in matchers if label == var and op == "=~"]
                assert values and values[0] in allowed, f"{panel}: {metric} does not filter by ${var}: {expr}"


# --- 4. rates over $__rate_interval (dashboard-linter: target-rate-interval) ----------------------

@pytest.mark.parametrize(("name", "panel", "expr"), QUERIES, ids=QUERY_IDS)
def test_rates_use_rate_interval(name, panel, expr):
    for m in re.finditer(r"\b(rate|irate|increase)\s*\(", expr):
        ranges = re.findall(r"\[([^\]]*)\]", inside(expr, m.end() - 1))
        assert ranges and set(ranges) == {"$__rate_interval"}, f"{panel}: {m.group(1)}() over {ranges}: {expr}"


# --- 5. every metric and label exists in the exporter's catalogue ---------------------------------

@pytest.mark.parametrize(("name", "panel", "expr"), QUERIES, ids=QUERY_IDS)
def test_metrics_and_labels_exist(name, panel, expr):
    names = metric_names(expr)
    assert names, f"{panel}: no metric in {expr}"
    unknown = [n for n in names if n not in LABELS]
    assert not unknown, f"{panel}: not in the exporter's catalogue: {unknown}"
    for metric, matchers in selectors(expr):
        for label, _, _ in matchers:
            assert label in LABELS[metric], f"{panel}: {metric} has no label {label!r}"
    for m in re.finditer(r"\b(by|without)\s*\(([^)]*)\)\s*\(", expr):
        operand = metric_names(inside(expr, m.end() - 1))
        for label in label_list(m.group(2)):
            missing = [n for n in operand if label not in LABELS[n]]
            assert not missing, f"{panel}: {m.group(1)} ({label}) over {missing}, which have no such label"
    for m in CLAUSE.finditer(expr):
        if m.group(1) not in ("by", "without"):
            for label in label_list(m.group(2)):
                assert any(label in LABELS[n] for n in names), f"{panel}: {m.group(1)} ({label}) matches no label"


def test_the_reader_finds_what_it_should():
    expr = ('histogram_quantile(0.99, sum by (le, resource) (rate(x_bucket{resource=~"$resource"}[$__rate_interval])))'
            ' / on (instance) group_left (host) y{a="b{c}"} or vector(1e3) * 6 * 3600')
    assert metric_names(expr) == ["x_bucket", "y"]
    assert list(selectors(expr)) == [("x_bucket", [("resource", "=~", "$resource")]), ("y", [("a", "=", "b{c}")])]


# --- 6. promtool accepts every query ---------------------------------------------------------------

def promtool_check(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` over the queries as recording rules: Prometheus's own parser, no server."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: make test installs Debian's prometheus (apt-get install prometheus)"
    rules = [{"record": f"dash:panel_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", DOCS)
def test_promtool_accepts_every_query(name, tmp_path):
    exprs = [substitute(expr) for _, _, expr in panel_queries(DOCS[name])]
    r = promtool_check(exprs, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(exprs)} rules found" in r.stdout


def test_promtool_check_rejects_a_broken_query(tmp_path):
    r = promtool_check(["up", 'sum by (host (mars_node_alive{host=~".*"})'], tmp_path)
    assert r.returncode != 0 and "dash:panel_1" in r.stdout + r.stderr


def test_substitute():
    expr = 'rate(x{resource=~"$resource", host=~"${host}"}[$__rate_interval]) + y[$__interval]'
    assert substitute(expr, resource="r") == 'rate(x{resource=~"r", host=~".*"}[1m]) + y[1m]'
    assert substitute('z{resource=~"$resource|"}') == 'z{resource=~".*|"}'
    with pytest.raises(KeyError):
        substitute('x{job="$job"}')


def test_panel_queries_walks_collapsed_rows():
    doc = {"title": "D", "panels": [
        {"type": "row", "title": "R", "panels": [{"type": "stat", "title": "P", "targets": [{"expr": "up"}]}]},
        {"type": "text", "title": "T"},
        {"type": "stat", "title": "Q", "targets": [{"expr": "a"}, {"refId": "B"}]}]}
    assert panel_queries(doc) == [("D", "P", "up"), ("D", "Q", "a")]


# --- 7. no query that can never match --------------------------------------------------------------

@pytest.mark.parametrize(("name", "panel", "expr"), QUERIES, ids=QUERY_IDS)
def test_no_matcher_that_can_never_match(name, panel, expr):
    for metric, matchers in selectors(expr):
        for label, op, value in matchers:
            if op in ("=~", "!~"):
                # drbd-reactor's dashboard had =~"!..." for "not": a regex of a literal "!", which matches nothing
                assert not value.startswith("!"), f"{panel}: {label}{op}{value!r} is no negation (use !~)"
                re.compile(substitute(value))
            domain = DOMAINS.get((metric, label))
            if domain and "$" not in value:
                # a regex without groups: each alternative must be possible, not just one of them
                wanted = [value] if op in ("=", "!=") else value.split("|") if "(" not in value else [value]
                never = [w for w in wanted if not any(re.fullmatch(w, d) for d in domain)]
                assert not never, f"{panel}: {metric}{{{label}{op}{value!r}}}: the exporter never gives {never}"


def test_state_names_agree_with_the_catalogue_and_all_have_a_colour():
    """The catalogue lists a stateset's states after the colon of its help text; the dashboards use
    the model's tuples (value mappings, state timelines), so the two must be the same names."""
    for s in METRICS:
        if s.type == "stateset":
            assert tuple(re.split(r",\s*", s.help.rsplit(":", 1)[1].strip())) == STATESETS[s.name]
    names = set(ROLES) | set(DISKSTATES) | set(REPLSTATES)
    assert set(dashboards.STATE_COLORS) == names
    assert sum(len(states) for states in dashboards._STATE_GROUPS.values()) == len(dashboards.STATE_COLORS)
    assert set(dashboards.LEVEL_COLORS) == set(LEVELS)


@pytest.mark.parametrize("name", DOCS)
def test_state_value_mappings_name_only_real_states(name):
    """A mapping that names states maps either each state's name to itself (a label shown in a
    table) or each index of one of the model's tuples to its name (a coded state timeline); a
    name that cannot occur would colour nothing, and a shifted index would show the wrong state."""
    names = set(ROLES) | set(DISKSTATES) | set(REPLSTATES)
    for p in query_panels(DOCS[name]):
        for mapping in p["fieldConfig"]["defaults"].get("mappings", []):
            options = mapping["options"]
            if not names & {result["text"] for result in options.values()}:
                continue
            if all(raw.isdigit() for raw in options):
                coded = sorted(options, key=int)  # the JSON's keys are sorted as text: 0, 1, 10, 11, 2...
                assert coded == [str(i) for i in range(len(coded))], p["title"]
                assert tuple(options[raw]["text"] for raw in coded) in (ROLES, DISKSTATES, REPLSTATES), p["title"]
            else:
                assert all(raw == options[raw]["text"] and raw in names for raw in options), p["title"]
