"""The node's tunables (seed chapter 5): ``set-<name>-value``, ``get-<name>-value``, ``tunables``.

Why one command pair per tunable, generated from the model's table: the original's operators
know ``set-global-sync-limit-value`` and ``/proc/sys/mars/<name>``; a command per name keeps that
shape, and the table (engine/model/tunables.py) gives each the same parser, unit and range that
marsd and the faces use. A set value goes into the tree per host, so it is durable and every node
shows it; a running marsd applies it in its next round, and ``set`` waits for that.
"""

from __future__ import annotations

from ..model import tunables as tun
from ..tree import node_actual
from .base import Ctx, command


def _in_force(ctx: Ctx, name: str) -> str | None:
    """What the host's marsd reports running with (None while it has not said)."""
    return ctx.tree.get(node_actual(ctx.host, f"tunable-{name}"))


def _same(s: tun.Spec, reported: str | None, v: float | int) -> bool:
    if reported is None or reported == "None":
        return False
    try:
        return s.parse(reported) == v
    except Exception:
        return False


def _set(ctx: Ctx, name: str) -> None:
    s = tun.spec(name)
    tree = ctx.tree
    if ctx.args.value.strip().lower() == "default":
        tree.delete(tun.key(ctx.host, name))
        ctx.poke()
        ctx.say(f"{name} of host {ctx.host} is back to its default ({s.show(s.default)})")
        return
    v = s.parse(ctx.args.value)  # UsageError with the range for a bad value
    tree.set(tun.key(ctx.host, name), v)
    ctx.poke()
    shown = f"{name} of host {ctx.host} set to {s.show(v)}"
    if ctx.marsd_pid() is None or ctx.host != tree.host:
        ctx.say(f"{shown}; its marsd applies it when it runs (no restart needed)")
        return
    ctx.wait(f"apply {name} {s.show(v)}", lambda: _same(s, _in_force(ctx, name), v))
    ctx.say(f"{shown}; in force")


def _get(ctx: Ctx, name: str) -> None:
    """The value in force, as a plain number for scripts: marsd's report, else the tree's."""
    reported = _in_force(ctx, name)
    if reported is not None and reported != "None":
        print(reported)
        return
    v = tun.value(ctx.tree, ctx.host, name)
    print("auto" if v is None else v)


def _register(name: str) -> None:
    s = tun.spec(name)
    what = f"{s.help} ({s.unit}; {s.range_text()}; default {s.show(s.default)}; the original's {s.original})"
    what = what.replace("%", "%%")  # argparse formats help texts with %
    command(f"set-{name}-value", f"set {name}: {what}",
            ("value", {"help": f"the new value: {s.range_text()}; the word default removes the set value"}))(lambda ctx: _set(ctx, name))
    command(f"get-{name}-value",
            f"print {name} in force on the host (marsd's, else the tree's): {s.help}".replace("%", "%%"))(
        lambda ctx: _get(ctx, name))


for _name in tun.SPECS:
    _register(_name)

# The original's spelling of the sync limit, kept (its old 'set-sync-limit-value' is generated above).
command("set-global-sync-limit-value", "the same as set-sync-limit-value: how many full syncs may run at once "
        "on this host (0: no limit)", ("value", {"help": "number of concurrent syncs, 0 = unlimited"}))(
    lambda ctx: _set(ctx, "sync-limit"))
command("get-global-sync-limit-value", "the same as get-sync-limit-value")(lambda ctx: _get(ctx, "sync-limit"))


@command("tunables", "list the host's tunables: set value, value in force in marsd, default, unit, range",
         aliases=("get-tunables",))
def tunables(ctx: Ctx) -> None:
    tree = ctx.tree
    running = ctx.marsd_pid() is not None if ctx.host == tree.host else None
    rows = [("NAME", "SET", "IN FORCE", "DEFAULT", "UNIT", "RANGE", "ORIGINAL")]
    for name, s in tun.SPECS.items():
        sv = tun.set_value(tree, ctx.host, name)
        reported = _in_force(ctx, name)
        try:
            actual = s.show(s.parse(reported)) if reported not in (None, "None") else "-"
        except Exception:
            actual = reported or "-"
        rows.append((name, s.show(sv) if sv is not None else "-", actual, s.show(s.default), s.unit,
                     s.range_text(), s.original))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    if running is False:
        ctx.say(f"marsd is not running on host {ctx.host}: IN FORCE is what it last reported")
