"""mars-status's Textual app: keys, refresh, pause and the summary against real three-node
clusters; SVG snapshots of every view on a fixed tree; a live sync watched in a real tmux pane.

The snapshots need the same picture on every run, so they use a tree written by hand with fixed
Lamport stamps and a snapshot built for a fixed clock (the app's ``snapshot_source``); the
machine-dependent header facts (state tree path, marsd pid, Python version) are pinned too. The
pilot tests never sleep: a wait for a refresh awaits the refresh worker
(``workers.wait_for_complete``) and lets the app apply its result (``pilot.pause``); a wait for
anything else (the cluster, a timer) polls the app's state with a deadline, yielding to the app
with ``pilot.pause`` in between.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from harness import Node, run, wait_until

from mars.engine import model
from mars.engine.tree import Tree
from mars.status.app import MarsStatusApp, StatusView, wrap_lines
from mars.status.render import Options, Span

SNAPSHOTS = Path(__file__).parent / "__snapshots__" / "test_status_app"
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
SIZE = (120, 50)

# --- the fixed tree ---------------------------------------------------------------------------

FIXED_S = 1_764_547_200.0  # 2025-12-01 00:00:00 UTC: the clock of every snapshot test
GiB, MiB = 1 << 30, 1 << 20


def _ns(age_s: float) -> int:
    return int((FIXED_S - age_s) * 1e9)


def fixed_tree(root: Path) -> None:
    """Three nodes, two resources, seen from a, with something to show in every view.

    ``data``: a primary, b replaying (a little behind), c syncing (WORK). ``logs``: a primary,
    b's replay paused (HINT), so it holds back the deletion of an older log. Every stamp is
    fixed relative to FIXED_S, so every age and rate shown is the same on every run.
    """
    t = Tree(root, "a")

    def put(path: str, value: object, age_s: float = 1.0) -> None:
        t.set(path, str(value), durable=False, stamp_ns=_ns(age_s))

    put("uuid", "fixed_cluster")
    for i, h in enumerate("abc"):
        put(f"ips/ip-{h}", f"10.0.0.{11 + i}")
        put(f"actual-{h}/time", f"{FIXED_S - 1 - i:.9f}", 1 + i)
        put(f"actual-{h}/version", "0.1.0")
        put(f"actual-{h}/rest-space", (180 - 20 * i) * GiB)
        put(f"actual-{h}/total-space", 250 * GiB)
        for name, v in (("interval", "1"), ("logrot-auto", str(4 * GiB)), ("sync-limit", "0"), ("port", "7777")):
            put(f"actual-{h}/tunable-{name}", v)
    put("defaults/logrot-auto", str(4 * GiB))
    put("defaults-b/sync-limit", "2")

    # data: 200 GiB; a primary; b replays behind; c syncs.
    d, size, log1, end = "resource-data", 200 * GiB, 64 * MiB, 40 * MiB
    put(f"{d}/size", size)
    put(f"{d}/primary", "a")
    put(f"{d}/actual-a/log-pos", f"log-000000002-a,{end}", 1)
    for h in "abc":
        put(f"{d}/data-{h}", f"/dev/vg0/data-{h}")
        put(f"{d}/actsize-{h}", size)
        for sw in ("attach", "connect", "sync", "allow-replay"):
            put(f"{d}/todo-{h}/{sw}", 1)
        put(f"{d}/actual-{h}/is-attached", 1)
        put(f"{d}/actual-{h}/is-primary", int(h == "a"))
        put(f"{d}/version-000000001-{h}", f"{'3f' * 16},log-000000001-a,{log1}:{'0' * 32}", 600)
    put(f"{d}/actual-a/open-count", 1)
    put(f"{d}/replay-a", f"log-000000002-a,{end},0", 1)
    put(f"{d}/actual-b/is-copying", 1)
    put(f"{d}/actual-b/is-replaying", 1)
    put(f"{d}/actual-b/fetch-pos", f"log-000000002-a,{end}", 1)
    put(f"{d}/actual-b/amount-file_rate", 8 * MiB)
    put(f"{d}/actual-b/amount-replay_rate", 4 * MiB)
    put(f"{d}/replay-b", f"log-000000002-a,{end - 12 * MiB},0", 3)
    put(f"{d}/syncstatus-b", size)
    put(f"{d}/actual-c/is-syncing", 1)
    put(f"{d}/actual-c/amount-sync_rate", 350 * MiB)
    put(f"{d}/syncstatus-c", 83 * GiB)
    put(f"{d}/actual-c/msg-inf-sync", "fast full sync from a: 83.0 GiB compared", 4)
    (root / d / "log-000000001-a").write_bytes(b"")
    os.truncate(root / d / "log-000000001-a", log1)
    (root / d / "log-000000002-a").write_bytes(b"")
    os.truncate(root / d / "log-000000002-a", end)

    # logs: 20 GiB; a primary; b's replay paused in log 1 while a writes log 2.
    d, size, log1, end = "resource-logs", 20 * GiB, 32 * MiB, 6 * MiB
    put(f"{d}/size", size)
    put(f"{d}/primary", "a")
    put(f"{d}/actual-a/log-pos", f"log-000000002-a,{end}", 2)
    for h in "ab":
        put(f"{d}/data-{h}", f"/dev/vg0/logs-{h}")
        put(f"{d}/actsize-{h}", size)
        for sw in ("attach", "connect", "sync", "allow-replay"):
            put(f"{d}/todo-{h}/{sw}", 0 if (h, sw) == ("b", "allow-replay") else 1)
        put(f"{d}/actual-{h}/is-attached", 1)
        put(f"{d}/actual-{h}/is-primary", int(h == "a"))
        put(f"{d}/syncstatus-{h}", size)
        put(f"{d}/version-000000001-{h}", f"{'a7' * 16},log-000000001-a,{log1}:{'0' * 32}", 900)
    put(f"{d}/replay-a", f"log-000000002-a,{end},0", 2)
    put(f"{d}/actual-b/is-copying", 1)
    put(f"{d}/actual-b/fetch-pos", f"log-000000002-a,{end}", 2)
    put(f"{d}/replay-b", f"log-000000001-a,{20 * MiB},0", 1200)
    for name, n in (("log-000000001-a", log1), ("log-000000002-a", end)):
        (root / d / name).write_bytes(b"")
        os.truncate(root / d / name, n)


DEBUG_LINES = [
    "2025-12-01 00:59:57 a mars.fetcher: data: b fetches log-000000002-a from 41943040",
    "2025-12-01 00:59:58 a mars.syncer: data: c compared 83.0 GiB of 200.0 GiB, 2.1 GiB differed",
    "2025-12-01 00:59:59 a mars.control: snapshot for pid 4711",
]


def fixed_source(root: Path) -> Callable[[], tuple[model.Snapshot, bool]]:
    """A snapshot of the fixed tree as of FIXED_S, as if a's marsd ran as pid 4242."""
    def source() -> tuple[model.Snapshot, bool]:
        snap = model.build(root, "a", now_s=FIXED_S, debug_lines=DEBUG_LINES)
        return dataclasses.replace(snap, mars_dir="/mars", marsd_running=True, marsd_pid=4242), True
    return source


@pytest.fixture
def fixed(tmp_path, monkeypatch):
    """The fixed tree, and the header's Python version pinned (it differs between machines)."""
    import platform
    monkeypatch.setattr(platform, "python_version", lambda: "3.11.2")
    monkeypatch.setattr(platform, "python_implementation", lambda: "CPython")
    root = tmp_path / "mars"
    root.mkdir(mode=0o700)
    fixed_tree(root)
    return root


def fixed_app(root: Path, **opts) -> MarsStatusApp:
    # A long interval: the picture is taken long before a second refresh could start.
    return MarsStatusApp(root, "a", Options(**opts), interval=3600, snapshot_source=fixed_source(root))


async def settled(pilot, timeout: float = 30.0) -> None:
    """Until the app has shown a refresh and no other is pending or running.

    Each round awaits the refresh worker, then lets the app apply what it posted; applying it may
    start the one refresh asked for meanwhile (a key, a tick), which the next round awaits.
    """
    app = pilot.app
    deadline = time.monotonic() + timeout
    while not (app.refreshes > 0 and app.idle):
        try:
            await asyncio.wait_for(app.workers.wait_for_complete(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        if time.monotonic() > deadline:
            _timed_out(pilot, timeout, "a refresh")
        await pilot.pause()
    await pilot.pause()


async def refreshed(pilot, cond: Callable[[], object], what: str) -> None:
    """After a key or a request: once its refresh is on the screen, ``cond`` holds.

    A live app may start another refresh between the two (its interval, marsd's events), so a
    condition not met right after the settle is awaited with a deadline, not failed at once.
    """
    await settled(pilot)
    if not cond():
        await until(pilot, cond, what=what)


async def until(pilot, cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``cond`` with a deadline, letting the app run in between (no sleep stands in for a state):
    for what no worker of the app decides, such as the cluster's state or the interval timer."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            _timed_out(pilot, timeout, what)
        await pilot.pause(0.02)


def _timed_out(pilot, timeout: float, what: str) -> NoReturn:
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; summary: "
                         f"{pilot.app.summary_text!r}\n{pilot.app.screen_text}")


# --- snapshots: one picture per view --------------------------------------------------------------

VIEW_KEYS = {"default": "", "history": "h", "system": "s", "status": "t", "debug": "g", "ascii": "a"}


@pytest.mark.parametrize("view", list(VIEW_KEYS))
def test_view_snapshot(view, fixed, snap_compare):
    """Each view of the fixed tree at 120x50, reached by its key from the default view.

    default: header, cluster line, the two resources with their WORK/HINT lines; the summary bar
    says HINT with the counts. history/system/status/debug: the block of that name after the
    resources (scrolled to it, so the picture shows the block). ascii: the default view with no
    box drawing, in the content or in the chrome.
    """
    keys = VIEW_KEYS[view]

    async def run_before(pilot) -> None:
        await settled(pilot)
        if keys:
            await pilot.press(keys)
            await refreshed(pilot, lambda: pilot.app.last.opts.views == pilot.app.options.views
                            and pilot.app.last.opts.ascii == pilot.app.options.ascii, what=f"the {view} view")
        if view in ("history", "system", "status", "debug"):
            body = pilot.app.query_one(StatusView)
            heading = {"history": "---> History <---", "system": "---> Systemdata <---",
                       "status": "---> Status <---", "debug": "---> Debug <---"}[view]
            row = next(i for i, r in enumerate(body.rows) if "".join(s.text for s in r).startswith(heading))
            body.scroll_to(y=row, animate=False)
            await pilot.pause()

    assert snap_compare(fixed_app(fixed), run_before=run_before, terminal_size=SIZE)


@pytest.mark.parametrize("view", list(VIEW_KEYS))
def test_readme_screenshot_is_the_snapshot(view):
    """docs/screenshots/<view>.svg (shown in the README) is the checked-in snapshot, not an older picture.

    Syrupy writes updated snapshots only when the session ends, so this test cannot copy them
    in the same run; after 'pytest --snapshot-update' copy them as the message says.
    """
    svg = SNAPSHOTS / f"test_view_snapshot[{view}].svg"
    assert svg.exists(), f"{svg} is missing: 'pytest --snapshot-update tests/test_status_app.py' makes it"
    shot = SCREENSHOTS / f"{view}.svg"
    assert shot.exists() and shot.read_bytes() == svg.read_bytes(), \
        f"{shot} is not the snapshot; run: cp '{svg}' {shot}"


def test_ascii_snapshot_has_no_box_drawing():
    """The checked-in --ascii picture: every character on the screen is ASCII."""
    svg = SNAPSHOTS / "test_view_snapshot[ascii].svg"
    assert svg.exists(), f"{svg} is missing: 'pytest --snapshot-update tests/test_status_app.py' makes it"
    text = svg.read_text()
    shown = re.findall(r"<text [^>]*>([^<]*)</text>", text)
    assert shown, "no text in the SVG"
    import html
    chars = {c for t in shown for c in html.unescape(t)} - {"\xa0"}  # the SVG's spaces are no-break spaces
    assert all(ord(c) < 128 for c in chars), sorted(c for c in chars if ord(c) >= 128)


# --- the app without a cluster: failures, responsiveness, wrapping --------------------------------

def test_wrap_lines_keeps_styles_and_breaks_at_spaces():
    line = (Span("---> HINT: ", "hint"), Span("replay of r on b is paused", "value"), Span("; run it", ""))
    rows = wrap_lines([line], 20)
    assert ["".join(s.text for s in r) for r in rows] == ["---> HINT: replay of", "r on b is paused;", "run it"]
    assert rows[0] == (Span("---> HINT: ", "hint"), Span("replay of", "value"))
    assert rows[1] == (Span("r on b is paused", "value"), Span(";", ""))
    assert rows[2] == (Span("run it", ""),)
    assert wrap_lines([(Span("x" * 25),)], 10) == [(Span("x" * 10),), (Span("x" * 10),), (Span("x" * 5),)]
    assert wrap_lines([line], 200) == [line]


@pytest.mark.asyncio
async def test_a_failing_read_says_unknown_and_recovers(fixed):
    """The summary says MARS UNKNOWN with the reason, the last good screen stays, and the next
    good read brings the verdict back: the app never crashes on a read."""
    from mars.engine.errors import MarsError
    good = fixed_source(fixed)
    fail = {"on": False}

    def source():
        if fail["on"]:
            raise MarsError(f"{fixed}/resource-data: permission denied", "run mars-status as root")
        return good()

    app = MarsStatusApp(fixed, "a", Options(), interval=3600, snapshot_source=source)
    async with app.run_test(size=SIZE) as pilot:
        await settled(pilot)
        assert app.summary_text.startswith(" HINT ") and "TODO 0 / HINT 2 / WORK 2" in app.summary_text
        shown = app.screen_text
        fail["on"] = True
        app.request_refresh()
        await refreshed(pilot, lambda: "UNKNOWN" in app.summary_text, what="the UNKNOWN summary")
        assert f"MARS UNKNOWN - {fixed}/resource-data: permission denied; run mars-status as root" \
            in app.summary_text
        assert app.screen_text == shown and app.is_running
        await pilot.press("h")  # re-rendering the last good snapshot keeps saying UNKNOWN
        await refreshed(pilot, lambda: "---> History <---" in app.screen_text, what="the history view")
        assert "UNKNOWN" in app.summary_text
        fail["on"] = False
        app.request_refresh()
        await refreshed(pilot, lambda: "HINT 2" in app.summary_text, what="the verdict to come back")


@pytest.mark.asyncio
async def test_a_slow_read_does_not_block_the_keys(fixed):
    """While a read hangs (a stuck disk, a hung marsd), keys still work and the subtitle follows."""
    import threading
    good = fixed_source(fixed)
    armed, entered, gate = threading.Event(), threading.Event(), threading.Event()

    def source():
        if armed.is_set():
            entered.set()
            gate.wait(60)
        return good()

    app = MarsStatusApp(fixed, "a", Options(), interval=3600, snapshot_source=source)
    async with app.run_test(size=SIZE) as pilot:
        await settled(pilot)
        armed.set()
        app.request_refresh()
        await until(pilot, entered.is_set, what="the hanging read to start")
        await pilot.press("s", "p")
        assert "views: system" in app.sub_title and "paused" in app.sub_title
        assert not app.idle and "Systemdata" not in app.screen_text
        gate.set()
        await refreshed(pilot, lambda: "---> Systemdata <---" in app.screen_text and app.idle,
                        what="the system view after the read")
    gate.set()  # also when the test failed: the worker thread must end


@pytest.mark.asyncio
async def test_a_refresh_landing_while_the_screen_is_pruned_is_dropped(fixed):
    """At exit Textual removes the widgets one by one while messages are still handled; a refresh
    that lands when the status view is there but the summary bar is not must not crash the app
    (CI saw this once in the node-down test: NoMatches for SummaryBar from _show)."""
    from mars.status.app import SummaryBar
    app = fixed_app(fixed)
    async with app.run_test(size=SIZE) as pilot:
        await settled(pilot)
        shown = app.refreshes
        await app.query_one(SummaryBar).remove()
        app.request_refresh()
        await until(pilot, lambda: app.idle, what="the refresh to land")  # _show clears busy first
        await pilot.pause()
        assert app.is_running and app.refreshes == shown  # dropped, not shown and not raised


# --- the app on real three-node clusters ----------------------------------------------------------

def live_app(node: Node, interval: float = 0.3, window_s: float | None = None, **opts) -> MarsStatusApp:
    return MarsStatusApp(node.mars_dir, node.host, Options(**opts), interval=interval, window_s=window_s)


def codes(app: MarsStatusApp) -> set[tuple[str, str | None, str | None]]:
    return {(f.code, f.res, f.node) for f in app.last.fs} if app.last is not None else set()


def desired_state(nodes: list[Node]) -> dict[str, str | None]:
    """Each node's own switches in its own tree: what an operator (or a wrong key) could change.

    Only its own: copies of the others' switches may still be arriving from the exchange."""
    out = {}
    for n in nodes:
        for p in sorted(n.mars_dir.glob(f"resource-*/todo-{n.host}/*")):
            rel = str(p.relative_to(n.mars_dir))
            out[f"{n.host}:{rel}"] = n.tree_value(rel)
    return out


HEADINGS = {"h": "---> History <---", "s": "---> Systemdata <---", "t": "---> Status <---", "g": "---> Debug <---"}


@pytest.mark.asyncio
async def test_keys_switch_views_and_change_nothing(trio):
    a, b, c = trio
    before = desired_state([a, b, c])
    app = live_app(b)
    async with app.run_test(size=SIZE) as pilot:
        await settled(pilot)
        assert "---> Resources <---" in app.screen_text and not any(h in app.screen_text for h in HEADINGS.values())
        assert "default view" in app.sub_title
        for key, heading in HEADINGS.items():
            await pilot.press(key)
            await refreshed(pilot, lambda h=heading: h in app.screen_text, what=f"{heading} after '{key}'")
        assert app.options.views == {"history", "system", "status", "debug"}
        assert "views: history, system, status, debug" in app.sub_title
        bars = [s.text for line in app.lines for s in line if s.style == "bar"]
        assert bars and all(b_.startswith("[") and "\u2588" in b_ for b_ in bars), bars  # full bars: all synced
        await pilot.press("a")  # ascii: the history tree and the bars without box drawing
        await refreshed(pilot, lambda: app.last.opts.ascii, what="the ascii rendering")
        assert app.screen_text.isascii() and "`-->" in app.screen_text and "[####" in app.screen_text
        assert "ascii" in app.sub_title
        await pilot.press("h")  # a toggle: off again
        await refreshed(pilot, lambda: HEADINGS["h"] not in app.screen_text, what="history off")
        assert HEADINGS["s"] in app.screen_text
        await pilot.press("d")
        await refreshed(pilot, lambda: not any(h in app.screen_text for h in HEADINGS.values()), what="the default view")
        assert app.options.views == frozenset() and "default view" in app.sub_title
    assert desired_state([a, b, c]) == before


@pytest.mark.asyncio
async def test_resource_filter(trio):
    a, b, _ = trio
    run(["truncate", "-s", "16M", str(a.base / "s.img")])
    await asyncio.to_thread(a.marsadm, "create-resource", "s", str(a.base / "s.img"), "16M")
    app = live_app(b)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "-> check resource s," in app.screen_text, what="b to learn resource s")
        assert "-> check resource r," in app.screen_text
        shown = []
        for _ in range(3):
            await pilot.press("r")
            await refreshed(pilot, lambda: app.idle and app.last.opts.resource == app.options.resource,
                            what="the filtered view")
            shown.append((app.options.resource, "-> check resource r," in app.screen_text,
                          "-> check resource s," in app.screen_text))
        assert shown == [("r", True, False), ("s", False, True), (None, True, True)]
        assert "all resources" in app.sub_title
        await pilot.press("slash", "s", "enter")  # type a name
        await refreshed(pilot, lambda: app.last.opts.resource == "s" and app.idle, what="the typed filter")
        assert "resource s" in app.sub_title and "-> check resource r," not in app.screen_text
        await pilot.press("slash", "n", "o", "p", "e", "enter")  # an unknown name: the screen says so
        await refreshed(pilot, lambda: "resource nope does not exist" in app.screen_text, what="the unknown name")
        assert "the resources are: r, s" in app.screen_text
        await pilot.press("slash", "ctrl+u", "enter")  # empty: all again
        await refreshed(pilot, lambda: app.last.opts.resource is None and app.idle, what="all resources again")


@pytest.mark.asyncio
async def test_pause_stops_refreshes(trio):
    _, b, c = trio
    app = live_app(b, interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settled(pilot)
        assert ("REPLAY_PAUSED", "r", "c") not in codes(app)
        await pilot.press("p")
        assert "paused" in app.sub_title
        await settled(pilot)  # the last refresh lands
        shown, refreshes = app.screen_text, app.refreshes
        await asyncio.to_thread(c.marsadm, "pause-replay", "r")
        await until(pilot, lambda: b.tree_value("resource-r/todo-c/allow-replay") == "0", what="b to learn it")
        ticks = app.ticks
        # Chances to refresh go by: interval ticks, and marsd's events about the change.
        await until(pilot, lambda: app.ticks >= ticks + 5, what="five ticks")
        assert app.refreshes == refreshes and app.screen_text == shown
        assert ("REPLAY_PAUSED", "r", "c") not in codes(app)
        await pilot.press("p")
        assert "paused" not in app.sub_title and "every 0.2 s" in app.sub_title
        await until(pilot, lambda: ("REPLAY_PAUSED", "r", "c") in codes(app), what="the change after resuming")
        assert "replay of r on c is paused" in app.screen_text and "HINT" in app.summary_text


@pytest.mark.asyncio
async def test_marsd_events_refresh_at_once(trio):
    """With an interval that never fires, marsd's event stream alone brings a change to the screen."""
    _, b, c = trio
    app = live_app(b, interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await settled(pilot)
        await asyncio.to_thread(c.marsadm, "disconnect", "r")
        await until(pilot, lambda: ("FETCH_PAUSED", "r", "c") in codes(app), what="the change via marsd's events")
        assert app.ticks == 0 and app.events_seen > 0


@pytest.mark.asyncio
async def test_summary_says_todo_when_a_node_is_down(trio):
    a, _, c = trio
    await asyncio.to_thread(c.kill)
    app = live_app(a, window_s=2)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: ("NODE_DOWN", None, "c") in codes(app), what="a to report c down")
        await until(pilot, lambda: app.summary_text.startswith(" TODO "), what="the TODO summary")
        todo = sum(1 for f in app.last.fs if f.level == "TODO")  # NODE_DOWN, and PEER_UNREACHABLE from a and b
        assert f"TODO {todo} / HINT " in app.summary_text and todo >= 1
        # Unreachable as soon as a's and b's links to c broke; "not reported" once the window passed.
        assert re.search(r"---> TODO: node c (is unreachable|has not reported)", app.screen_text), app.screen_text
        assert re.search(r"System (unreachable|unknown \(last message)", app.screen_text), app.screen_text
    # c's own status, with its marsd down: what its tree knows, and that marsd does not answer.
    app = live_app(c)
    async with app.run_test(size=SIZE) as pilot:
        await settled(pilot)
        assert ("MARSD_DOWN", None, "c") in codes(app) and app.summary_text.startswith(" TODO ")
        assert "marsd does not answer: tree only" in app.sub_title
        assert "NOT RUNNING" in app.screen_text


# --- a real terminal: a sync watched in tmux --------------------------------------------------------

SYNCED = re.compile(r"synced = (\d+\.\d+)%")


def _tmux(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    # pytest exports COLUMNS=80 and LINES=24; in the pane they would override the pane's real size
    # (shutil.get_terminal_size reads them first), so the tmux server must not inherit them.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return run(["tmux", "-L", sock, *args], timeout=30, env=env)


def test_sync_progress_advances_in_a_tmux_pane(sparse_8t):
    """mars-status in a real terminal on b while b syncs an 8 TiB sparse image: the percentage
    shown for b's sync moves forward between two captures of the pane."""
    a, b, _ = sparse_8t
    base = a.base
    sock = f"mars-status-test-{uuid.uuid4().hex[:8]}"  # a private tmux server: nothing else is touched
    # The app draws on the terminal (Textual writes to stderr: no redirection). Its exit code goes
    # to a file (tmux's pane_dead_status is not always filled in); the pane stays after an exit.
    exit_file = base / "mars-status.exit"
    cmd = (f"{sys.executable} -m mars.status --mars-dir {b.mars_dir} --host b --interval 0.3 --status; "
           f"echo $? > {exit_file}")
    _tmux(sock, "-f", "/dev/null", "new-session", "-d", "-s", "status", "-x", "140", "-y", "60", cmd)
    _tmux(sock, "set-option", "-t", "status", "remain-on-exit", "on")
    last = {"pane": ""}
    try:
        def shown_text() -> str:
            last["pane"] = _tmux(sock, "capture-pane", "-p", "-t", "status").stdout
            return last["pane"]

        def shown() -> float | None:
            local = shown_text().split("-> local Node (b", 1)  # b's own block comes first in its resource
            m = SYNCED.search(local[1]) if len(local) == 2 else None
            return float(m.group(1)) if m else None

        def until_shown(cond: Callable[[float], bool], what: str) -> float:
            try:
                return wait_until(lambda: (p := shown()) is not None and cond(p) and p, 60, what)
            except AssertionError as e:
                raise AssertionError(f"{e}; the pane:\n{last['pane']}") from None

        b.marsadm("join-resource", "r", str(base / "b.img"), "--create")
        first = until_shown(lambda p: 0 < p < 100, "the pane to show b's sync part way")
        second = until_shown(lambda p: p > first, f"the pane to show b's sync beyond {first}%")
        assert first < second <= 100
        pane = _tmux(sock, "capture-pane", "-p", "-t", "status").stdout
        size = _tmux(sock, "display", "-p", "-t", "status", "#{pane_width}x#{pane_height}").stdout
        assert "MARS Status - b" in pane and "---> Status <---" in pane and "WORK" in pane, f"{size}\n{pane}"
        # 'q' ends it at once, although the event-stream thread sits in a read on marsd's socket.
        _tmux(sock, "send-keys", "-t", "status", "q")
        try:
            wait_until(lambda: exit_file.exists() and exit_file.read_text().strip(), 10, "mars-status to exit after 'q'")
        except AssertionError as e:
            raise AssertionError(f"{e}; the pane:\n{shown_text()}") from None
        assert exit_file.read_text().strip() == "0"
    finally:
        run(["tmux", "-L", sock, "kill-server"], check=False, timeout=30)
