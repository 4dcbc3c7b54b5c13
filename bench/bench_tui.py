#!/usr/bin/env python3
"""mars-status TUI benchmark: how long one refresh of the Textual app takes for a big cluster.

Run:  python bench/bench_tui.py [--nodes 8] [--resources 50] [--logs 3] [--rounds 20] [--dir DIR]

Writes the synthetic tree of bench/bench_status.py (``make_tree``: --nodes nodes, each a member of
every one of --resources resources) into a temporary directory (removed at the end), starts
``MarsStatusApp`` headless (``App.run_test``, 200x60) on it with its production snapshot source
(the control socket is asked first; no marsd runs, so that costs one refused connect), and times
--rounds refreshes from the request to the repainted screen: snapshot + findings + render + wrap
in the worker thread, then the widget update on the event loop and the repaint. Once for the
default view and once with every view on (history, system, status, debug: about twice the lines).

Printed per view: min / median / max in ms of the whole refresh, and the median of its parts
(read = snapshot + findings, render = render + wrap, both in the worker; loop = the time applying
the result held the event loop), then the goal: one refresh of 8 nodes x 50 resources < 200 ms (PASS/MISS on the median).
The parts in the worker do not block the keys; "loop" is what a person would feel as lag.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_status import fmt, setup_tree, tree_args  # noqa: E402
from bench_write import print_goals, remove_workdir  # noqa: E402

from mars.status.app import MarsStatusApp, Refreshed, StatusView  # noqa: E402
from mars.status.render import VIEWS, Options  # noqa: E402

GOAL_MS = 200.0
SIZE = (200, 60)


async def measure(root: Path, host: str, views: frozenset[str], rounds: int) -> dict[str, list[float]]:
    """Time ``rounds`` refreshes of one app; the first (start-up) refresh is not counted.

    The wait for a refresh is an asyncio event set when the app dispatches the worker's result
    (Textual's message hook), not a polling loop that would compete with the worker for the GIL.
    """
    app = MarsStatusApp(root, host, Options(views=views), interval=3600)
    arrived = asyncio.Event()

    def hook(message: object) -> None:
        if isinstance(message, Refreshed):
            arrived.set()  # called on the event loop, right before the app handles the message

    out: dict[str, list[float]] = {"total": [], "read": [], "render": [], "loop": []}
    # Rounds run back to back; the idle wait between them (pilot.pause) is not timed.
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        body = app.query_one(StatusView)
        await asyncio.wait_for(arrived.wait(), 60)
        await pilot.pause()
        for _ in range(rounds):
            while not app.idle:  # a resize or the start-up may have queued one more
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 60)
                await pilot.pause()
            arrived.clear()
            t0 = time.perf_counter()
            app.request_refresh(fetch=True)
            await asyncio.wait_for(arrived.wait(), 60)
            # The repaint: every row on screen drawn from the new rows (Textual would do it at its next
            # screen update; Pilot.pause would add an idle wait of at least 20 ms to the figure).
            for y in range(body.size.height):
                body.render_line(y)
            out["total"].append((time.perf_counter() - t0) * 1e3)
            assert app.last is not None and app.fetch_error is None, app.fetch_error
            out["read"].append(app.last.read_ms)
            out["render"].append(app.last.render_ms)
            out["loop"].append(app.ui_ms)
            await pilot.pause()
        lines = len(app.lines)
    out["lines"] = [float(lines)]
    return out


def main() -> int:
    a = tree_args(__doc__.split("\n\n")[0], rounds=20)
    base = Path(tempfile.mkdtemp(prefix="mars-tui-bench-", dir=a.dir))
    try:
        root, nodes = setup_tree(a, base, "MARS status TUI benchmark")
        print(f"app:     MarsStatusApp headless at {SIZE[0]}x{SIZE[1]}, production snapshot source (no marsd)")
        print()
        print(f"  {'view':<28} {'lines':>6} {'min ms':>8} {'median':>8} {'max ms':>8}   "
              f"{'read':>6} {'render':>6} {'loop':>6}  (medians; {a.rounds} rounds)")
        print("  " + "-" * 100)
        medians = []
        for name, views in (("default", frozenset()), ("all views (h+s+t+g)", frozenset(VIEWS))):
            r = asyncio.run(measure(root, nodes[0], views, a.rounds))
            med = {k: statistics.median(v) for k, v in r.items()}
            medians.append(med["total"])
            print(f"  {name:<28} {int(med['lines']):>6} {fmt(r['total'])}   "
                  f"{med['read']:6.1f} {med['render']:6.1f} {med['loop']:6.1f}")
        print()
        print_goals([(med < GOAL_MS, f"one TUI refresh ({name}) of {a.nodes} nodes x {a.resources} resources "
                                     f"< {GOAL_MS:.0f} ms: median {med:.1f} ms")
                     for name, med in zip(("default view", "all views"), medians)])
        return 0
    finally:
        remove_workdir(base, a.keep)


if __name__ == "__main__":
    sys.exit(main())
