"""mars-status as a Textual app: the plain-text status, live, with keys that switch its views.

What it shows is exactly :func:`mars.status.render.render`'s lines, the same lines the plain
output prints; this module adds only the chrome (a header with the options in effect, a summary
bar with the worst finding level, a footer with the keys) and the loop that keeps it current.
It judges nothing itself: levels and counts come from :func:`mars.engine.model.findings`. Its
looks are in ``mars_status.tcss``, next to this file.

Why the work happens where it does (STYLE.md §2, after dolphie's worker manager):

* A thread worker does everything slow, in one go: read the snapshot (marsd's control socket,
  or the tree alone when marsd is down), compute the findings, render the lines and wrap them
  to the screen's width. The UI thread only swaps the finished rows in and repaints the rows
  on screen (a Line API widget), so 8 nodes x 50 resources (thousands of lines) cost the event
  loop next to nothing, and a hung marsd or a slow disk never freezes the keys.
* Refreshes never overlap. A request that arrives while one runs (the interval timer, marsd's
  event stream, a key) is remembered and served once, right after: bursts of events collapse
  into one refresh and the screen never goes backwards.
* A failed read is a state, not a crash: the summary says ``MARS UNKNOWN - <why>`` (the
  monitor's wording, :func:`~mars.status.render.check`) and the last good screen stays.
* Read-only, as the original (seed §4): no key changes MARS state; keys change only what this
  process shows. What they change, the options in effect and whether it is paused, are reactives:
  their watchers keep the subtitle and the screen in step, whoever sets them (a key, a test).

marsd's event stream is followed by a daemon thread of its own, not a Textual worker: workers
run in the event loop's executor, which ``asyncio.run`` joins at exit, so a read blocked on an
idle socket would hold up ``q`` for as long as marsd says nothing.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import ClassVar
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import App, ComposeResult, ScreenStackError
from textual.binding import Binding
from textual.cache import LRUCache
from textual.content import Content
from textual.css.query import NoMatches
from textual.geometry import Size
from textual.message import Message
from textual.reactive import var
from textual.scroll_view import ScrollView
from textual.scrollbar import ScrollBarRender
from textual.strip import Strip
from textual.widgets import Footer, Header, Input, Static

from ..engine import model
from ..engine.model import LEVELS, Finding, Snapshot, findings, worst
from .render import STYLES, VIEWS, Line, Options, Span, check, relevant, render

__all__ = ["MarsStatusApp", "SnapshotSource", "wrap_lines"]

SnapshotSource = Callable[[], tuple[Snapshot, bool]]
"""Returns (snapshot, whether this host's marsd answered); raises when nothing can be read."""

RECONNECT_S = 2.0  # at most this long between tries to reach marsd's event stream when it is down
MIN_WIDTH = 40  # narrower than this, lines are wrapped for this width and the rest is cut off


# --- wrapping (pure, runs in the worker) ----------------------------------------------------------

def wrap_lines(lines: Sequence[Line], width: int) -> list[Line]:
    """Rows of at most ``width`` characters: long lines break at the last space that fits, which
    is dropped (or hard, inside a word longer than the row); styles are kept across the break.

    Why here and not in the widget: wrapping thousands of lines is the one costly step left after
    rendering, so it belongs in the worker; the widget then paints rows one to one.
    """
    width = max(1, width)
    rows: list[Line] = []
    for line in lines:
        total = sum(len(s.text) for s in line)
        if total <= width:
            rows.append(line)
            continue
        text = "".join(s.text for s in line)
        cuts = []
        start = 0
        while total - start > width:
            end = start + width
            space = text.rfind(" ", start + 1, end + 1)  # a space just past the row breaks there too
            if space > start:
                cuts.append((start, space))
                start = space + 1  # the space at a break is not shown
            else:
                cuts.append((start, end))
                start = end
        cuts.append((start, total))
        for a, b in cuts:
            rows.append(_slice(line, a, b))
    return rows


def _slice(line: Line, a: int, b: int) -> Line:
    """The characters ``a`` to ``b`` of a line, as spans with their styles."""
    out: list[Span] = []
    pos = 0
    for s in line:
        end = pos + len(s.text)
        if end > a and pos < b:
            out.append(Span(s.text[max(0, a - pos):min(len(s.text), b - pos)], s.style))
        pos = end
        if pos >= b:
            break
    return tuple(out)


# --- one refresh's result ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What a refresh worker hands to the UI thread: everything ready to show, or why it failed."""

    opts: Options
    fetched: bool  # a new snapshot was read (False: the cached one re-rendered for new options)
    snap: Snapshot | None = None
    answered: bool = False
    fs: tuple[Finding, ...] = ()
    lines: tuple[Line, ...] = ()
    rows: tuple[Line, ...] = ()
    error: str | None = None
    read_ms: float = 0.0  # snapshot + findings
    render_ms: float = 0.0  # render + wrap


class Refreshed(Message):
    """Posted by the refresh worker (from its thread; post_message is thread-safe)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__()
        self.outcome = outcome


class MarsdChanged(Message):
    """Posted by the event-stream thread: marsd reported a finding or a state change."""


# --- widgets ------------------------------------------------------------------------------------------

class AsciiScrollBarRender(ScrollBarRender):
    """Scrollbars drawn with spaces only (the thumb is its colour): nothing but ASCII with --ascii."""

    VERTICAL_BARS: ClassVar[list[str]] = [" "] * 8
    HORIZONTAL_BARS: ClassVar[list[str]] = [" "] * 8


class SummaryBar(Static):
    """The verdict in one line, coloured and worded: the worst level, the counts, the top finding.

    The words carry the meaning (``TODO 1 / HINT 0 / WORK 2``); the colours, component classes
    like the body's (styled in mars_status.tcss), only repeat it.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"summary--badge-todo", "summary--badge-hint", "summary--badge-work", "summary--badge-ok",
                         "summary--badge-unknown", "summary--todo", "summary--hint", "summary--work", "summary--none"}

    def _style(self, name: str) -> Style:
        return self.get_component_rich_style(f"summary--{name}", partial=True)

    def show_findings(self, fs: Sequence[Finding]) -> None:
        level = worst(fs)
        counts = {lv: sum(1 for f in fs if f.level == lv) for lv in LEVELS}
        text = Text(no_wrap=True, overflow="crop")
        text.append(f" {level or 'OK'} ", self._style(f"badge-{(level or 'OK').lower()}"))
        text.append("  ")
        for i, lv in enumerate(("TODO", "HINT", "WORK")):
            if i:
                text.append(" / ")
            text.append(f"{lv} {counts[lv]}", self._style(lv.lower() if counts[lv] else "none"))
        top = next((f for f in fs if f.level == level), None)
        if top is not None:
            text.append(f"  | {top.code} {top.where}: {top.text}")
        self.update(text)

    def show_error(self, why: str) -> None:
        text = Text(no_wrap=True, overflow="crop")
        text.append(" UNKNOWN ", self._style("badge-unknown"))
        text.append("  " + check(None, [], error=why)[1])
        self.update(text)


class StatusView(ScrollView, can_focus=True):
    """The rendered lines, one row each (Line API): only the rows on screen are ever painted.

    A span's style is a meaning (render.STYLES); the colours for the meanings are this widget's
    component classes, so they live in mars_status.tcss and follow the theme.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {f"status--{s}" for s in STYLES if s}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: tuple[Line, ...] = ()
        self._strips: LRUCache[int, Strip] = LRUCache(1024)
        self._styles: dict[str, Style] | None = None

    def show(self, rows: tuple[Line, ...]) -> None:
        self.rows = rows
        self._strips.clear()
        width = max((sum(len(s.text) for s in r) for r in rows), default=0)
        self.virtual_size = Size(width, len(rows))
        self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles = None
        self._strips.clear()

    def _span_style(self, style: str) -> Style | None:
        if not style:
            return None
        if self._styles is None:
            self._styles = {s: self.get_component_rich_style(f"status--{s}", partial=True) for s in STYLES if s}
        return self._styles.get(style)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        i = y + scroll_y
        width = self.scrollable_content_region.width
        if i >= len(self.rows):
            return Strip.blank(width)
        strip = self._strips.get(i)
        if strip is None:
            strip = Strip([Segment(s.text, self._span_style(s.style)) for s in self.rows[i]])
            self._strips[i] = strip
        return strip.crop_extend(scroll_x, scroll_x + width, None)


# --- the app --------------------------------------------------------------------------------------------

class MarsStatusApp(App[None]):
    """mars-status live. ``snapshot_source`` replaces the live read (marsd's control socket, else
    the tree) so that tests and recordings need no marsd: with it the app follows no event stream.
    """

    TITLE = "MARS Status"
    ENABLE_COMMAND_PALETTE = False  # a read-only monitor: the keys below are all there is

    CSS_PATH = "mars_status.tcss"  # next to this module; pyproject ships it as package data

    options: var[Options] = var(Options, init=False)
    """What is shown. A reactive so that whoever changes it (a key, a test) gets the held snapshot
    re-rendered, without a read, and the subtitle that names it."""

    paused: var[bool] = var(False, init=False)
    """Reads stop while set; clearing it reads at once, so the screen is not as old as the pause."""

    tree_only: var[bool] = var(False, init=False)
    """This host's marsd did not answer the last good live read: the subtitle warns that the
    screen shows what the tree knows, without marsd's debug lines."""

    BINDINGS: ClassVar[list[Binding]] = [
        Binding("d", "default_view", "default"),
        Binding("h", "toggle_view('history')", "history"),
        Binding("s", "toggle_view('system')", "system"),
        Binding("t", "toggle_view('status')", "status"),
        Binding("g", "toggle_view('debug')", "debug"),
        Binding("r", "cycle_resource", "resource"),
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("p", "pause", "pause"),
        Binding("a", "toggle_ascii", "ascii"),
        Binding("q", "quit", "quit"),
        Binding("escape", "close_filter", "close filter", show=False),
    ]

    def __init__(self, mars_dir: str | Path, host: str, options: Options | None = None, interval: float = 2.0,
                 window_s: float | None = None, *, snapshot_source: SnapshotSource | None = None) -> None:
        super().__init__()
        if interval <= 0:
            raise ValueError(f"refresh interval {interval:g} s is not a positive number of seconds")
        self.mars_dir = Path(mars_dir)
        self.host = host
        self.set_reactive(MarsStatusApp.options, options or Options())  # no watcher: nothing is up yet
        self.interval = interval
        self.window_s = window_s
        self._source = snapshot_source or self._live
        self._follow = snapshot_source is None
        # What the tests and the bench look at: counters move only forward.
        self.refreshes = 0  # outcomes applied to the screen
        self.ticks = 0  # interval timer firings (also while paused)
        self.events_seen = 0  # finding/state events marsd's stream delivered
        self.last: Outcome | None = None  # the last outcome applied
        self.fetch_error: str | None = None  # why the last read failed; None after a good one
        self.ui_ms = 0.0  # how long applying the last refresh held the event loop (the bench reports it)
        self._held: tuple[Snapshot, bool, tuple[Finding, ...]] | None = None
        self._busy = False
        self._want = False
        self._want_fetch = False
        self._stop = threading.Event()
        self._tree_cache = model.TreeCache()  # a refresh reads again only the directories that changed

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(icon="*" if self.options.ascii else None)
        yield SummaryBar("waiting for the first snapshot ...", id="summary")
        yield StatusView(id="body")
        yield Input(placeholder="resource name, Enter applies (empty: all resources), Esc cancels", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self._apply_ascii()
        self._update_subtitle()
        self.query_one(StatusView).focus()
        self.set_interval(self.interval, self._tick, name="mars-status refresh")
        if self._follow:
            threading.Thread(target=self._follow_events, name="mars-status events", daemon=True).start()
        self.request_refresh(fetch=True)

    def on_unmount(self) -> None:
        self._stop.set()

    def on_resize(self) -> None:
        self.request_refresh(fetch=False)  # rows are wrapped for the width

    def get_theme_variable_defaults(self) -> dict[str, str]:
        """$mars-hint and $mars-work: the two colours mars_status.tcss needs that Textual's themes
        do not have, defined here once so that a theme can still set its own."""
        return {**super().get_theme_variable_defaults(), "mars-hint": "#c678dd", "mars-work": "#56b6c2"}

    def format_title(self, title: str, sub_title: str) -> Content:
        """As Textual's, with an ASCII dash: the chrome follows --ascii too."""
        return Content.assemble(Content(title), (" - ", "dim"), Content(sub_title).stylize("dim")) if sub_title \
            else Content(title)

    # -- what the tests read ------------------------------------------------------------------------

    @property
    def lines(self) -> tuple[Line, ...]:
        return self.last.lines if self.last is not None else ()

    @property
    def screen_text(self) -> str:
        """The rendered lines as plain text (what is shown, before wrapping)."""
        return "".join("".join(s.text for s in line) + "\n" for line in self.lines)

    @property
    def idle(self) -> bool:
        """No refresh is running or waiting to run."""
        return not self._busy and not self._want

    @property
    def summary_text(self) -> str:
        return str(self.query_one(SummaryBar).render())

    # -- refreshing -----------------------------------------------------------------------------------

    def _tick(self) -> None:
        self.ticks += 1
        if not self.paused:
            self.request_refresh(fetch=True)

    def request_refresh(self, fetch: bool = True) -> None:
        """Fetch (or only re-render) soon: now when idle, else once right after the running refresh."""
        self._want = True
        self._want_fetch = self._want_fetch or fetch
        if not self._busy:
            self._launch()

    def _launch(self) -> None:
        fetch = self._want_fetch or self._held is None
        self._want = self._want_fetch = False
        self._busy = True
        self.run_worker(partial(self._produce, fetch, self._render_options(), self._held), thread=True,
                        group="refresh", name="mars-status refresh", exit_on_error=False)

    def _render_options(self) -> Options:
        # A tick can land while the screen is not (or no longer) mounted, at start-up or exit.
        width = self.query_one(StatusView).scrollable_content_region.width if self._mounted() else 0
        return dataclasses.replace(self.options, width=max(MIN_WIDTH, width or self.size.width or 100))

    def _produce(self, fetch: bool, opts: Options, cache: tuple[Snapshot, bool, tuple[Finding, ...]] | None) -> None:
        """In the worker thread: read (when asked), judge, render, wrap; never raises."""
        t0 = time.perf_counter()
        try:
            if fetch or cache is None:
                snap, answered = self._source()
                fs = tuple(findings(snap))
            else:
                snap, answered, fs = cache
            t1 = time.perf_counter()
            lines = tuple(render(snap, list(fs), opts))
            rows = tuple(wrap_lines(lines, opts.width))
            t2 = time.perf_counter()
            outcome = Outcome(opts, fetch, snap, answered, fs, lines, rows, None, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
        except Exception as e:  # any failure is shown as UNKNOWN, never a crash
            outcome = Outcome(opts, fetch, error=_why(e))
        self.post_message(Refreshed(outcome))

    def _live(self) -> tuple[Snapshot, bool]:
        """This host's snapshot: the tree, with marsd's debug lines when it answers."""
        return model.read_snapshot(self.mars_dir, self.host, window_s=self.window_s, cache=self._tree_cache)

    def _mounted(self) -> bool:
        """Whether the screen with the status view is up: a tick or a finished refresh can land
        while it is not, at start-up or while the app exits."""
        try:
            return bool(self.query(StatusView))
        except ScreenStackError:
            return False

    def _parts(self) -> tuple[StatusView, SummaryBar] | None:
        """The two widgets a refresh fills, or None when either is gone: at exit Textual prunes the
        screen widget by widget while messages are still handled, so one can be there without the
        other (seen in CI: the status view still mounted, the summary bar already removed)."""
        try:
            return self.query_one(StatusView), self.query_one(SummaryBar)
        except (ScreenStackError, NoMatches):
            return None

    @on(Refreshed)
    def _show(self, message: Refreshed) -> None:
        t0 = time.perf_counter()
        o = message.outcome
        self._busy = False
        parts = self._parts()
        if parts is None:
            return
        body, summary = parts
        if o.error is not None:
            if o.fetched:
                self.fetch_error = o.error
            summary.show_error(o.error)
        else:
            assert o.snap is not None
            if o.fetched:
                self._held = (o.snap, o.answered, o.fs)
                self.fetch_error = None
                self.tree_only = self._follow and not o.answered
            self.last = o
            body.show(o.rows)
            if self.fetch_error is not None:
                summary.show_error(self.fetch_error)
            else:
                # The verdict of what is shown: with a resource filter, as 'mars-status --resource'.
                summary.show_findings(relevant(list(o.fs), o.opts.resource))
        self.refreshes += 1
        self.ui_ms = (time.perf_counter() - t0) * 1e3
        if self._want or (o.error is None and o.opts != self._render_options()):
            self._launch()

    # -- marsd's event stream -----------------------------------------------------------------------

    def _follow_events(self) -> None:
        """In a daemon thread: poke a refresh on every finding or state event; reconnect quietly."""
        while not self._stop.is_set():
            try:
                for ev in model.stream_events(self.mars_dir):
                    if self._stop.is_set():
                        return
                    kind = ev.get("kind")
                    if kind in ("finding", "state"):
                        self.post_message(MarsdChanged())
                    elif kind == "lagged":
                        break  # dropped for falling behind; the reconnect's snapshot line says what changed
            except Exception:  # marsd down, restarting, or a torn line: try again later
                pass
            self._stop.wait(min(RECONNECT_S, self.interval))

    @on(MarsdChanged)
    def _marsd_changed(self) -> None:
        self.events_seen += 1
        if not self.paused:
            self.request_refresh(fetch=True)

    # -- state: the watchers keep the subtitle and the screen in step with it -----------------------

    def watch_options(self, old: Options, new: Options) -> None:
        self._update_subtitle()
        if not self._mounted():
            return  # set before start-up or during exit: on_mount applies it, or nothing is left to show
        if new.ascii != old.ascii:
            self._apply_ascii()
        self.request_refresh(fetch=False)

    def watch_paused(self, paused: bool) -> None:
        self._update_subtitle()
        if not paused and self._mounted():
            self.request_refresh(fetch=True)

    def watch_tree_only(self) -> None:
        self._update_subtitle()

    # -- keys ------------------------------------------------------------------------------------------

    def _set_options(self, **changes: object) -> None:
        self.options = dataclasses.replace(self.options, **changes)

    def action_default_view(self) -> None:
        self._set_options(views=frozenset())

    def action_toggle_view(self, view: str) -> None:
        self._set_options(views=self.options.views ^ {view})

    def action_cycle_resource(self) -> None:
        """All -> each resource in name order -> all."""
        names = sorted(self._held[0].resources) if self._held is not None else []
        cur = self.options.resource
        if cur in names and names.index(cur) + 1 < len(names):
            nxt: str | None = names[names.index(cur) + 1]
        elif cur is None and names:
            nxt = names[0]
        else:
            nxt = None
        self._set_options(resource=nxt)

    def action_pause(self) -> None:
        self.paused = not self.paused

    def action_toggle_ascii(self) -> None:
        self._set_options(ascii=not self.options.ascii)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = self.options.resource or ""
        box.add_class("-open")
        box.focus()

    def action_close_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("-open")
        self.query_one(StatusView).focus()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        self.action_close_filter()
        if not text:
            self._set_options(resource=None)
            return
        names = sorted(self._held[0].resources) if self._held is not None else []
        hits = [n for n in names if text in n]
        if text in names or not hits:
            self._set_options(resource=text)  # an unknown name: the screen says which ones exist
        elif len(hits) == 1:
            self._set_options(resource=hits[0])
        else:
            self.notify(f"'{text}' matches {', '.join(hits)}: type more of the name", severity="warning")

    # -- chrome ----------------------------------------------------------------------------------------

    def _apply_ascii(self) -> None:
        ascii_ = self.options.ascii
        self.query_one(Header).icon = "*" if ascii_ else "⭘"
        view = self.query_one(StatusView)
        renderer = AsciiScrollBarRender if ascii_ else ScrollBarRender
        view.vertical_scrollbar.renderer = renderer
        view.horizontal_scrollbar.renderer = renderer
        view.vertical_scrollbar.refresh()

    def _update_subtitle(self) -> None:
        self.sub_title = " | ".join(self._subtitle_parts())

    def _subtitle_parts(self) -> list[str]:
        o = self.options
        parts = [self.host, "paused" if self.paused else f"every {self.interval:g} s"]
        if self.tree_only:
            parts.append("marsd does not answer: tree only")
        parts.append("views: " + ", ".join(v for v in VIEWS if v in o.views) if o.views else "default view")
        parts.append(f"resource {o.resource}" if o.resource else "all resources")
        if o.ascii:
            parts.append("ascii")
        return parts


def _why(e: BaseException) -> str:
    """One line for the summary: the error's own words, or its type when it has none."""
    text = " ".join(str(e).split())
    return text or type(e).__name__
