"""check_mars, the Nagios / Icinga plugin, as a monitoring server runs it.

Every output is read by :func:`plugin_output`, a reader written here from the monitoring-plugins
guidelines (not from the plugin's code): the exit code is 0..3 and its word starts the first line
(``MARS <STATE> - <text>``), the perfdata after ``|`` is space-separated
``'label'=value[UOM];[warn];[crit];[min];[max]`` with quoted labels where they hold spaces, units
from the guidelines' set, plain decimals (no scientific notation) and ranges in the standard
syntax, and nothing is a traceback. The states come from real three-node clusters (the conftest
fixtures), several assertions per cluster since each costs seconds to start; in each state the
plugin and ``mars-status --check`` give the same exit code, since both render the model's verdict.
"""

from __future__ import annotations

import math
import os
import re
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
from harness import BIN, Node, caught_up, wait_until, write
from hypothesis import given
from hypothesis import strategies as st
from mars.engine.model import (
    CHECK_STATES,
    PerfFigure,
    UsageError,
    Verdict,
    number_text,
    verdict,
)
from mars.exporters.nagios import threshold

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
STATES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")  # by exit code, as the guidelines number them
UOMS = {"", "s", "ms", "us", "%", "B", "KB", "MB", "GB", "TB", "c"}
_NUM = r"-?\d+(?:\.\d+)?"
_RANGE = rf"@?(?:(?:~|{_NUM})?:)?(?:{_NUM})?"
_PERF = re.compile(rf"(?P<label>'(?:[^']|'')+'|[^'= ]+)=(?P<value>{_NUM}|U)(?P<uom>[A-Za-z%]*)"
                   rf"(?:;(?P<warn>{_RANGE})(?:;(?P<crit>{_RANGE})(?:;(?P<min>{_NUM})?(?:;(?P<max>{_NUM})?)?)?)?)?")


# --- the reader of plugin output, after the guidelines -------------------------------------------------

@dataclass
class Perf:
    value: float | None  # None: "U", the plugin could not tell
    uom: str
    warn: str
    crit: str
    min: float | None
    max: float | None


@dataclass
class Output:
    code: int
    state: str
    summary: str
    perf: dict[str, Perf] = field(default_factory=dict)
    long: list[str] = field(default_factory=list)
    text: str = ""


def perfdata(text: str) -> dict[str, Perf]:
    """``'label'=value[UOM];warn;crit;min;max ...``, each item checked against the guidelines."""
    out: dict[str, Perf] = {}
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _PERF.match(text, pos)
        assert m, f"not perfdata at {text[pos:pos + 60]!r}"
        pos = m.end()
        assert pos == len(text) or text[pos] == " ", f"perfdata item does not end at a space: {text[m.start():pos + 20]!r}"
        pos += 1
        raw = m["label"]
        label = raw[1:-1].replace("''", "'") if raw.startswith("'") else raw
        assert label not in out, f"label {label!r} twice"
        assert m["uom"] in UOMS, f"{label}: unit {m['uom']!r} is not one of the guidelines' {sorted(UOMS)}"
        value = None if m["value"] == "U" else float(m["value"])
        assert value is not None or not m["uom"], f"{label}: U carries no unit"
        lo = float(m["min"]) if m["min"] else None
        hi = float(m["max"]) if m["max"] else None
        if value is not None:
            assert lo is None or value >= lo, f"{label}={value} below its min {lo}"
            assert hi is None or value <= hi, f"{label}={value} above its max {hi}"
        out[label] = Perf(value, m["uom"], m["warn"] or "", m["crit"] or "", lo, hi)
    return out


def plugin_output(r: subprocess.CompletedProcess[str]) -> Output:
    """The parts of a plugin's output (Nagios 3 multi-line form), checked against the guidelines."""
    both = r.stdout + r.stderr
    assert "Traceback" not in both, both
    assert r.returncode in (0, 1, 2, 3), (r.returncode, both)
    assert r.stdout.endswith("\n") and r.stdout.strip(), both
    lines = r.stdout.rstrip("\n").split("\n")
    first, _, perf1 = lines[0].partition("|")
    m = re.fullmatch(r"MARS (OK|WARNING|CRITICAL|UNKNOWN) - (\S.*?)\s*", first)
    assert m, f"first line is not 'MARS <STATE> - <text>': {lines[0]!r}"
    assert m[1] == STATES[r.returncode], f"exit code {r.returncode} but the line says {m[1]}"
    rest = "\n".join(lines[1:])
    long_text, _, perf2 = rest.partition("|")
    out = Output(r.returncode, m[1], m[2], perfdata(perf1 + " " + perf2.replace("\n", " ")),
                 [x for x in long_text.split("\n") if x], r.stdout)
    return out


def check_mars(*args: str, env: dict[str, str] | None = None, user: tuple[str, ...] = ()) -> Output:
    r = subprocess.run([*user, str(BIN / "check_mars"), *args], capture_output=True, text=True, timeout=60,
                       env=env, check=False)
    return plugin_output(r)


def on(node: Node, *args: str, user: tuple[str, ...] = ()) -> Output:
    """check_mars judging the cluster from ``node``'s tree."""
    return check_mars("--mars-dir", str(node.mars_dir), "--host", node.host, *args, env=node.env(), user=user)


def monitor(node: Node, *args: str) -> int:
    """``mars-status --check`` on ``node``: the exit code to compare with check_mars's."""
    cmd = [str(BIN / "mars-status"), "--mars-dir", str(node.mars_dir), "--host", node.host, *args, "--check"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=node.env(), check=False)
    assert r.stdout.startswith("MARS ") and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r.returncode


def agree(node: Node, *args: str) -> Output:
    """check_mars without thresholds, and the same exit code from mars-status --check."""
    out = on(node, *args)
    assert monitor(node, *args) == out.code, out.text
    return out


# --- the reader itself, and the model's verdict and figures ------------------------------------------------

def test_the_reader_refuses_what_the_guidelines_forbid():
    def bad(stdout: str, code: int = 0) -> None:
        with pytest.raises(AssertionError):
            plugin_output(subprocess.CompletedProcess([], code, stdout, ""))

    good = plugin_output(subprocess.CompletedProcess([], 1, "MARS WARNING - x | 'a b'=1.5s;60;~:300;0 n=3\n", ""))
    assert good.perf["a b"] == Perf(1.5, "s", "60", "~:300", 0.0, None) and good.perf["n"].value == 3
    bad("MARS OK - x | a b=1s\n")  # a label with a space must be quoted
    bad("MARS OK - x | 'a'=1e-06s\n")  # no scientific notation
    bad("MARS OK - x | 'a'=1KiB\n")  # not a unit of the guidelines
    bad("MARS OK - x | 'a'=1s;abc\n")  # not a range
    bad("MARS OK - x\n", 2)  # the word and the exit code disagree
    bad("MARS: OK x\n")
    bad("MARS OK - x\nTraceback (most recent call last):\n")


@pytest.mark.parametrize("spec, unit, alerting, quiet", [
    ("10", "s", [-1, 10.5, 11], [0, 5, 10]),  # outside 0..10
    ("10:", "s", [-1, 9.99], [10, 1e9]),  # below 10
    ("~:10", "s", [10.01, 1e9], [-1e9, 0, 10]),  # above 10
    ("10:20", "s", [9, 21], [10, 15, 20]),  # outside 10..20
    ("@10:20", "s", [10, 15, 20], [9.99, 20.01]),  # inside 10..20, ends included
    ("@~:5", "s", [-3, 5], [5.5]),
    ("0.000001", "s", [0.00001, 3.2], [0, 0.000001]),
    ("1G:", "B", [0, (1 << 30) - 1], [1 << 30, 1 << 40]),  # a free-space minimum with a suffix
    ("@0:1.5k", "B", [0, 1536], [1537]),
])
def test_ranges_alert_as_the_guidelines_say(spec, unit, alerting, quiet):
    t = threshold(spec, unit, "-w")
    assert t is not None
    assert [v for v in alerting if not t.alerts(v)] == [], f"{spec} must alert for these"
    assert [v for v in quiet if t.alerts(v)] == [], f"{spec} must not alert for these"
    assert re.fullmatch(_RANGE, t.spec) and "e" not in t.spec, t.spec  # written back as perfdata wants it


def test_ranges_are_written_back_in_base_units_and_refused_with_a_remedy():
    assert threshold("10G:", "B", "--free-critical").spec == "10737418240:"
    assert threshold("@1T:2T", "B", "x").spec == "@1099511627776:2199023255552"
    assert threshold("0.000001", "s", "-w").spec == "0.000001"  # nagiosplugin would write 1e-06
    assert threshold(":10", "s", "-w").spec == "0:10" and threshold("~:", "s", "-w").spec == "~:"
    assert threshold(None, "s", "-w") is None and threshold("", "s", "-w") is None  # an empty $ARG1$
    for spec, unit in (("abc", "s"), ("1:2:3", "s"), ("20:10", "s"), ("1e3", "s"), ("@", "s"), ("10G", "s"),
                       ("1.5.2", "B"), ("10X", "B")):
        with pytest.raises(UsageError) as e:
            threshold(spec, unit, "-w")
        assert str(e.value).startswith(f"-w {spec}: ") and "check_mars --help" in str(e.value), str(e.value)


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10 ** 20, 10 ** 20))
def test_numbers_are_plain_decimals(v):
    text = number_text(v)
    assert re.fullmatch(_NUM, text), text
    assert float(text) == float(v)


def test_the_verdict_and_its_figures_refuse_what_a_monitor_cannot_read():
    for bad in (("a'b", 1, ""), ("a=b", 1, ""), ("x", 1, "KiB"), ("x", math.nan, "s"), ("", 1, "")):
        with pytest.raises(ValueError):
            PerfFigure(*bad)
    with pytest.raises(ValueError):
        PerfFigure("x", 1, max=math.inf)
    assert PerfFigure("r@b lag", 0.0000015, "s").value_text == "0.0000015s"
    assert PerfFigure("r@b lag", None, "s").value_text == "U"
    with pytest.raises(ValueError):
        Verdict(4, "x")
    with pytest.raises(ValueError):
        Verdict(0, "a | b")
    v = verdict(None, [], "/mars does not exist; create a cluster | or not")
    assert (v.code, v.state, v.figures) == (3, "UNKNOWN", ()) and "|" not in v.summary
    assert CHECK_STATES == STATES


def test_the_figures_of_one_resource_with_unknown_values_written_u(tmp_path):
    """A hand-written tree: two resources, b never published a replay position or its space."""
    from mars.engine.model import build
    from mars.engine.tree import Tree
    from mars.exporters.nagios import figures
    t = Tree(tmp_path, "a")
    t.set("uuid", "t")
    for h in "ab":
        t.set(f"ips/ip-{h}", "127.0.0.2")
        t.set(f"actual-{h}/time", f"{time.time():.9f}")
    t.set("actual-a/rest-space", 5 << 30)
    t.set("actual-a/total-space", 100 << 30)
    for res in "rs":
        t.set(f"resource-{res}/size", 1 << 20)
        t.set(f"resource-{res}/primary", "a")
        t.set(f"resource-{res}/replay-a", "log-000000001-a,0,0")
        for h in "ab":
            t.set(f"resource-{res}/data-{h}", f"/images/{h}.img")
    got = {f.name: (kind, f) for kind, f in figures(build(tmp_path, "a"), "r")}
    assert set(got) == {f"r@{h} {w}" for h in "ab" for w in ("lag", "sync rest", "fetch rest", "replay rest")} \
        | {"a free", "b free"}  # the nodes' figures concern every resource
    assert got["a free"] == ("free", PerfFigure("a free", 5 << 30, "B", 0, 100 << 30))
    assert got["b free"][1].value_text == "U" and got["r@b replay rest"][1].value_text == "U"
    assert got["r@b lag"][0] == "lag" and got["r@b lag"][1].value is None
    assert got["r@a lag"][1] == PerfFigure("r@a lag", 0.0, "s", 0)


# --- UNKNOWN: whatever keeps the plugin from judging -----------------------------------------------------------

def test_unknown_with_a_reason_never_a_traceback(tmp_path):
    def unknown(*args: str, env: dict[str, str] | None = None) -> str:
        out = check_mars(*args, env=env)
        assert out.code == 3 and out.state == "UNKNOWN" and not out.perf, out.text
        return out.summary

    none = tmp_path / "none"
    assert unknown("--mars-dir", str(none)).startswith(f"{none} does not exist; give the state tree")
    assert unknown(env={**os.environ, "MARS_DIR": str(none)}).startswith(f"{none} does not exist")
    assert "holds no cluster" in unknown("--mars-dir", str(tmp_path), "--host", "a")
    # mars-status says the same with the same code.
    r = subprocess.run([str(BIN / "mars-status"), "--mars-dir", str(none), "--check"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 3 and r.stdout.startswith(f"MARS UNKNOWN - {none} does not exist")
    # A wrong command line is UNKNOWN (3), not argparse's 2, which a monitor reads as CRITICAL.
    said = unknown("--mars-dir", str(tmp_path), "-w", "abc")
    assert said.startswith("-w abc: 'abc' is not a number of seconds") and "check_mars --help" in said
    assert "start 20 must not be greater than end 10" in unknown("-c", "20:10")
    assert "'1T' is not a number of seconds" in unknown("-w", "1T")
    assert unknown("--bogus") == "unrecognized arguments: --bogus; see 'check_mars --help'"
    assert "not a positive number of seconds" in unknown("--timeout", "0")
    assert "resource name 'no way' is not valid" in unknown("--resource", "no way")
    for opt in ("--help", "--version"):  # not a check result: UNKNOWN, as the monitoring-plugins do
        r = subprocess.run([str(BIN / "check_mars"), opt], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 3 and ("usage: check_mars" in r.stdout or r.stdout.startswith("check_mars ")), r


def test_a_hanging_read_times_out_as_unknown(tmp_path):
    """A state tree on a file system that hangs: nagiosplugin's timeout, reported as UNKNOWN."""
    code = ("import sys, threading\n"
            "from mars.engine import model\n"
            "model.read_snapshot = lambda *a, **k: threading.Event().wait()  # blocks until a signal\n"
            "from mars.exporters.nagios import main\n"
            "main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", code, "--mars-dir", str(tmp_path), "--host", "a", "--timeout", "1"],
                       capture_output=True, text=True, timeout=60, check=False)
    out = plugin_output(r)
    assert out.code == 3 and out.summary.startswith("no result within 1 s (--timeout)"), out.text
    assert "give a longer --timeout" in out.summary


# --- real clusters -------------------------------------------------------------------------------------

def lag(out: Output, where: str) -> float:
    v = out.perf[f"{where} lag"].value
    return -1.0 if v is None else v


def test_a_trio_up_to_date_then_paused(trio):
    """OK with every figure, the thresholds on it, --resource, permissions; then a paused fetch and a
    paused replay (HINTs: WARNING) and the lag thresholds on the replay that lags."""
    a, b, c = trio
    ok = wait_until(lambda: (o := on(a)).code == 0 and o.perf["work"].value == 0 and o, 30, "a to see all up to date")
    assert ok.summary == "1 resource, 3 of 3 nodes alive", ok.text
    assert monitor(a) == 0
    labels = {f"r@{h} {w}" for h in "abc" for w in ("lag", "sync rest", "fetch rest", "replay rest")}
    labels |= {f"{h} free" for h in "abc"} | {"resources", "nodes", "nodes_alive", "todo", "hint", "work"}
    assert set(ok.perf) == labels, sorted(set(ok.perf) ^ labels)
    assert ok.perf["r@b lag"] == Perf(0.0, "s", "", "", 0.0, None)
    assert ok.perf["r@b sync rest"] == Perf(0.0, "B", "", "", 0.0, float(32 << 20))
    assert ok.perf["nodes_alive"].value == 3 and ok.perf["nodes_alive"].max == 3
    free = ok.perf["b free"]
    assert free.uom == "B" and free.value and free.max and 0 < free.value <= free.max
    assert "'b free'=" in ok.text and "'r@b lag'=0s" in ok.text  # labels with spaces are quoted

    # Thresholds that hold change nothing but the perfdata; broken ones raise the state and say why.
    out = on(a, "-w", "60", "-c", "300", "--free-critical", "1073741824:")
    assert out.code == 0 and out.summary == ok.summary, out.text
    assert out.perf["r@b lag"].warn == "60" and out.perf["r@b lag"].crit == "300"
    assert out.perf["b free"].crit == "1073741824:" and out.perf["b free"].warn == ""
    huge = str(int(free.max) + 1)
    out = on(a, "--free-warning", f"{huge}:")
    assert out.code == 1 and out.summary.startswith(ok.summary + "; ") and "b free " in out.summary, out.text
    assert re.search(r"below \d+\.\d \w+ \(warning\)", out.summary) and out.perf["b free"].warn == f"{huge}:"
    out = on(a, "--free-critical", f"{huge}:", "--free-warning", f"{huge}:")
    assert out.code == 2 and "(critical)" in out.summary and "(warning)" not in out.summary, out.text
    out = on(a, "--free-critical", "@0:1P")  # inside the range alerts
    assert out.code == 2 and "inside 0 B..1.0 PiB (critical)" in out.summary and out.perf["a free"].crit == \
        "@0:1125899906842624"
    assert on(a, "--free-critical", "@1P:").code == 0  # free space is far from a PiB
    assert on(a, "--free-warning", "10G").perf["c free"].warn == "10737418240"

    # One resource's figures; an unknown one names the known ones.
    out = on(a, "--resource", "r", "-w", "60")
    assert out.code == 0 and "r@c lag" in out.perf and out.perf["r@c lag"].warn == "60"
    assert monitor(a, "--resource", "r") == 0
    out = on(a, "--resource", "nosuch")
    assert out.code == 3 and out.summary == "resource nosuch does not exist; the resources are: r", out.text
    assert monitor(a, "--resource", "nosuch") == 3

    # Not root: the tree is 0700. With its parent opened for traversal, the tree itself refuses.
    mode = stat.S_IMODE(os.stat(a.base).st_mode)
    os.chmod(a.base, 0o711)
    try:
        out = on(a, user=tuple(NOBODY))
    finally:
        os.chmod(a.base, mode)
    assert out.code == 3 and out.summary == f"{a.mars_dir}: permission denied; the state tree is for root only; " \
                                            f"run the tool as root", out.text

    # A paused fetch: a hint, WARNING, on the primary and on b itself. Small writes: no log rotation,
    # so no "logs deletable" hint stays behind afterwards.
    b.marsadm("disconnect", "r")
    write(a, "write -P 0x22 1M 64k")
    out = wait_until(lambda: (o := on(a)).code == 1 and "FETCH_PAUSED r@b" in o.summary and o, 30,
                     "a's check to report b's paused fetch")
    assert out.summary.startswith("1 hint: FETCH_PAUSED r@b: fetch of r on b is switched off"), out.text
    assert monitor(a) == 1
    wait_until(lambda: on(b).code == 1, 30, "b's check to turn WARNING")
    assert monitor(b) == 1
    b.marsadm("connect", "r")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    wait_until(lambda: (o := on(a)).code == 0 and o.perf["work"].value == 0, 30, "a's check to turn OK again")

    # A paused replay with a write after it: a hint, and c's replay lags behind a's.
    c.marsadm("pause-replay", "r")
    write(a, "write -P 0x33 2M 64k")
    out = wait_until(lambda: (o := on(a)).code == 1 and lag(o, "r@c") > 0 and o, 30, "c's replay to lag")
    assert "REPLAY_PAUSED r@c" in out.summary and monitor(a) == 1, out.text
    assert out.perf["r@c replay rest"].value and out.perf["r@c replay rest"].value > 0
    out = on(a, "-w", "0.000001")
    assert out.code == 1 and out.perf["r@c lag"].warn == "0.000001", out.text
    assert re.search(r"; r@c lag \d+(\.\d+)?s above 0\.000001s \(warning\)$", out.summary), out.summary
    assert "r@b lag" not in out.summary  # b is not behind
    out = on(a, "-w", "0.000001", "-c", "0.000001")
    assert out.code == 2 and out.summary.endswith("above 0.000001s (critical)"), out.text
    out = on(a, "-c", "~:0.000001")
    assert out.code == 2 and out.perf["r@c lag"].crit == "~:0.000001", out.text
    out = on(a, "-c", "@0.000001:100000")
    assert out.code == 2 and "inside 0.000001s..100000s (critical)" in out.summary, out.text
    out = on(a, "-w", "~:100000", "-c", "100000")
    assert out.code == 1 and "r@c lag" not in out.summary, out.text  # only the hint
    # -v: every finding with its remedy, the broken thresholds, perfdata on the last line.
    out = on(a, "-v", "-c", "0.000001")
    assert out.code == 2 and out.text.split("\n")[-2].startswith("| ") and "r@c lag" in out.perf, out.text
    assert any(x.startswith("HINT REPLAY_PAUSED r@c: ") and x.endswith("'marsadm resume-replay r' on c")
               for x in out.long), out.long
    assert any(re.fullmatch(r"r@c lag \S+ above 0\.000001s \(critical\)", x) for x in out.long), out.long


def test_a_trio_split_brain_then_a_node_down(trio):
    """TODO findings are CRITICAL: two histories of one log, then a node that stopped reporting."""
    from mars.engine.tree import Tree
    a, b, c = trio
    write(a, "write -P 0x66 1M 3M")  # log 1 is finished by the rotation at 2 MiB
    wait_until(lambda: b.tree_value("resource-r/version-000000001-b") is not None, 30, "b's version of log 1")
    good = b.tree_value("resource-r/version-000000001-b")
    Tree(b.mars_dir, "b").set("resource-r/version-000000001-b",
                              "f" * len(good.split(",", 1)[0]) + "," + good.split(",", 1)[1])
    for n in (a, b, c):
        out = wait_until(lambda n=n: (o := on(n)).code == 2 and "SPLIT_BRAIN r" in o.summary and o, 30,
                         f"{n.host}'s check to report the split brain")
        assert re.match(r"\d todo: .*SPLIT_BRAIN r: r is in a split brain: from log 1 on", out.summary), out.text
        assert out.perf["todo"].value and monitor(n) == 2

    c.kill()
    out = wait_until(lambda: (o := on(a, "--window", "2")).code == 2 and "NODE_DOWN @c" in o.summary and o, 30,
                     "a's check to report c down")
    assert re.match(r"\d todo: NODE_DOWN @c: node c ", out.summary), out.text
    assert out.perf["nodes_alive"].value == 2 and out.perf["todo"].value and out.perf["todo"].value >= 2
    assert monitor(a, "--window", "2") == 2
    # On c, marsd is down: the tree is still judged, and says so.
    out = agree(c)
    assert out.code == 2 and "MARSD_DOWN @c" in out.summary, out.text


def test_a_sync_is_work_and_a_paused_one_a_hint(sparse_8t):
    a, b, _ = sparse_8t
    b.marsadm("join-resource", "r", str(a.base / "b.img"), "--create")
    out = wait_until(lambda: (o := on(a)).code == 0 and "SYNC_RUNNING r@b" in o.summary and o, 30,
                     "a's check to report b's sync as work")
    assert re.match(r"1 resource, 3 of 3 nodes alive, 1 work: SYNC_RUNNING r@b: sync of r on b at ", out.summary)
    rest = out.perf["r@b sync rest"]
    assert rest.uom == "B" and rest.max == float(8 << 40) and rest.value and rest.value > 0, out.text
    assert out.perf["work"].value == 1 and monitor(a) == 0
    b.marsadm("pause-sync", "r")
    out = wait_until(lambda: (o := on(a)).code == 1 and "SYNC_PAUSED r@b" in o.summary and o, 30,
                     "a's check to hint at b's paused sync")
    assert monitor(a) == 1
    wait_until(lambda: on(b).code == 1, 30, "b's check to turn WARNING")
    assert monitor(b) == 1
    out = on(a, "-v")
    assert any(x.startswith("HINT SYNC_PAUSED r@b: ") and "'marsadm resume-sync r' on b" in x for x in out.long)
