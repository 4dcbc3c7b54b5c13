"""The alerting rules in dashboards/prometheus are what tools/alerts.py makes of today's findings,
promtool accepts them, and their hand-written unit tests pass and cover every alert both ways.

Why these checks: a finding code added to CODES without an alert would never page anyone, and a
rule whose metric was renamed in the exporter would silently never fire (PromQL does not know
which names exist). The first is caught by regenerating, the second by comparing the rules'
metric names with the exporter's catalogue. An alert without a test where it fires may never
fire; one without a test where it stays quiet may always fire: the unit tests need both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import alerts
from mars.engine.model import CODES
from mars.exporters.prometheus import METRICS

PROM_DIR = ROOT / "dashboards" / "prometheus"
RULES = PROM_DIR / "mars-alerts.yml"
TESTS = PROM_DIR / "mars-alerts.test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"  # make test installs Debian's prometheus: never skipped


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], check=False, cwd=PROM_DIR, capture_output=True, text=True, timeout=120)


def test_checked_in_rules_are_up_to_date():
    assert RULES.read_text() == alerts.render(), (
        f"{RULES.relative_to(ROOT)} is stale; run '.venv/bin/python tools/alerts.py' and commit it")
    assert alerts.main(["--check"]) == 0


def test_check_names_a_stale_file(tmp_path, capsys):
    out = tmp_path / "mars-alerts.yml"
    out.write_text(alerts.render() + "# edited by hand\n")
    assert alerts.main(["--check", "--out", str(out)]) == 1
    assert str(out) in capsys.readouterr().err
    assert alerts.main(["--out", str(out)]) == 0
    assert alerts.main(["--check", "--out", str(out)]) == 0


def test_render_is_deterministic():
    assert alerts.render() == alerts.render()


def test_promtool_check_rules_is_clean():
    r = promtool("check", "rules", RULES.name)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output
    assert "SUCCESS" in r.stdout, output
    assert not re.search(r"warn|duplicate", output, re.IGNORECASE), output


def test_promtool_unit_tests_pass():
    r = promtool("test", "rules", TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_unit_tests_load_the_rules_file():
    assert yaml.safe_load(TESTS.read_text())["rule_files"] == [RULES.name]


@pytest.mark.parametrize("code", sorted(c for c, (level, _) in CODES.items() if level == "TODO"))
def test_every_todo_code_has_an_alert(code):
    selector = f'max by ({alerts.FINDING_BY}) (mars_finding{{code="{code}"}}) == 1'
    matching = [r["alert"] for r in alert_rules() if r["expr"] == selector]
    assert matching == [f"Mars{alerts.camel(code)}"], f"no alert (or several) on {selector}: {matching}"
    rule = next(r for r in alert_rules() if r["alert"] == matching[0])
    assert CODES[code][1] in rule["annotations"]["description"]
    assert "{{ $labels.remedy }}" in rule["annotations"]["description"]
    assert rule["labels"]["severity"] == ("critical" if code in alerts.CRITICAL else "warning")


def test_every_hint_code_has_its_meaning_in_the_hint_alert():
    hint = next(r for r in alert_rules() if r["alert"] == "MarsHint")
    assert 'level="HINT"' in hint["expr"]
    assert hint["labels"]["severity"] == "info"
    for code, (level, meaning) in CODES.items():
        if level == "HINT":
            assert f'eq $labels.code "{code}" }}}}{meaning}' in hint["annotations"]["description"], code


def test_findings_are_aggregated_over_the_exporters():
    """Each exporter reports every finding of its view: a ``mars_finding`` selector outside an
    aggregation that drops ``instance`` would alert once per node for one problem."""
    for rule in alert_rules():
        uses = rule["expr"].count("mars_finding{")
        aggregated = re.findall(r"max by \(([a-z_, ]+)\) \(mars_finding\{", rule["expr"])
        assert len(aggregated) == uses, rule["alert"]
        assert all("instance" not in labels for labels in aggregated), rule["alert"]


def test_every_alert_is_named_labelled_and_annotated():
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names)), "alert names must be unique"
    assert len(names) == len(rules()), "only alerting rules here"
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Mars(?:[A-Z][a-z0-9]*)+", name), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        for key in ("summary", "description"):
            assert rule["annotations"].get(key, "").strip(), f"{name} has no {key}"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
    groups = [g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]]
    assert all(g.startswith("mars-") for g in groups) and len(groups) == len(set(groups)), groups


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_does_not():
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(TESTS.read_text())["tests"]:
        assert group.get("interval") == "1m", group["name"]
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts without a test case where they fire"
    assert names - quiet == set(), "alerts without a test case where they do not fire (exp_alerts: [])"
    assert (fires | quiet) - names == set(), "test cases of alerts that do not exist"


# PromQL words that look like metric names: operators, modifiers, and what aggregations take.
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "inf", "nan"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not a string, a label matcher,
    a label list of by/on/group_left, a range, a keyword or a function call."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\()?)", expr):
        word = m.group(0)
        if m.group(1) or word.lower() in KEYWORDS:
            continue  # a function (or aggregation) call, or a keyword
        names.add(word)
    return names


def test_metric_name_extraction():
    assert metric_names('max by (host) (predict_linear(mars_node_dir_free_bytes{host=~"a|b"}[1h], 4 * 3600)) < 0\n'
                        'unless on (host) mars_finding{code="SPACE_LOW"}') == {"mars_node_dir_free_bytes",
                                                                                 "mars_finding"}
    assert metric_names('(up == 0) * on (instance, job) group_left (reason) mars_snapshot_error_info') == {
        "up", "mars_snapshot_error_info"}
    assert metric_names('absent(up{job="mars"})') == {"up"}


def test_every_metric_the_rules_use_is_one_the_exporter_exposes():
    known = {s.name for s in METRICS} | {"up"}
    histograms = {s.name for s in METRICS if s.type == "histogram"}
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(rule["alert"])
    assert {"mars_finding", "up", "mars_member_replay_lag_seconds"} <= used.keys()

    def exists(name: str) -> bool:
        return name in known or any(name.endswith(s) and name[:-len(s)] in histograms for s in HISTOGRAM_SUFFIXES)

    unknown = {name: sorted(by) for name, by in used.items() if not exists(name)}
    assert unknown == {}, "metrics the exporter does not expose (mars.exporters.prometheus.METRICS)"
