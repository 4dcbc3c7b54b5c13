"""marsadm view on hand-written trees: the original's state names, the macros, JSON, and the refusals.

Every test writes a small tree the way marsd and marsadm would (``Tree.set``), then runs
marsadm in-process. Two members of resource r: a is the primary, b the secondary; the log is
one 4 KiB file. A held ``marsd.lock`` stands in for a running marsd (the tools only look at the
lock), so the local node's state is rendered as live; without it the view says marsd is down.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mars.engine import marsadm
from mars.engine.marsadm.view import MACROS
from mars.engine.tree import Tree
from mars.engine.trigger import take_lock

SIZE = 64 << 20
LOG = "log-000000001-a"
END = 4096
R = "resource-r"


def now() -> str:
    return f"{time.time():.9f}"


class Fixture:
    """A two-node tree, up to date, with helpers to move it into one state."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.t = Tree(root, "a")
        self._locks: list[int] = []
        t = self.t
        t.set("uuid", "a_test")
        for h, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            t.set(f"ips/ip-{h}", ip)
            t.set(f"actual-{h}/time", now())
            t.set(f"{R}/data-{h}", f"/images/{h}.img")
            t.set(f"{R}/actsize-{h}", SIZE)
            for sw in ("attach", "connect", "sync", "allow-replay"):
                t.set(f"{R}/todo-{h}/{sw}", 1)
            t.set(f"{R}/actual-{h}/is-attached", 1)
            t.set(f"{R}/replay-{h}", f"{LOG},{END},0")
        t.set(f"{R}/size", SIZE)
        t.set(f"{R}/primary", "a")
        t.set(f"{R}/actual-a/is-primary", 1)
        t.set(f"{R}/actual-a/log-pos", f"{LOG},{END}")
        t.set(f"{R}/actual-b/is-primary", 0)
        t.set(f"{R}/actual-b/is-copying", 1)
        t.set(f"{R}/actual-b/is-replaying", 1)
        t.set(f"{R}/actual-b/fetch-pos", f"{LOG},{END}")
        t.set(f"{R}/syncstatus-b", SIZE)
        (root / R / LOG).write_bytes(b"\0" * END)

    def set(self, path: str, value: str | int) -> None:
        self.t.set(path, value)

    def marsd(self, host: str) -> None:
        """Pretend marsd runs for ``host`` on this tree: hold its lock."""
        fd = take_lock(self.root, host)
        assert fd is not None
        self._locks.append(fd)

    def close(self) -> None:
        for fd in self._locks:
            os.close(fd)

    def run(self, capsys, host: str, *argv: str) -> tuple[int, str, str]:
        code = marsadm.main(["--mars-dir", str(self.root), "--host", host, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    def line(self, capsys, host: str, *argv: str) -> str:
        """The local node's status line: ``  r [n/m] <diskstate> <replstate> <flags> <role> <primary>``."""
        code, out, err = self.run(capsys, host, "view", *argv)
        assert code == 0, err
        for ln in out.splitlines():
            if ln.startswith("  r ["):
                return ln
        raise AssertionError(f"no status line in:\n{out}")


@pytest.fixture
def tree(tmp_path):
    f = Fixture(tmp_path / "mars")
    f.marsd("a")
    yield f
    f.close()


@pytest.fixture
def tree_b(tmp_path):
    """The same tree seen from b, with b's marsd 'running'."""
    f = Fixture(tmp_path / "mars")
    f.marsd("b")
    yield f
    f.close()


def fields(line: str) -> list[str]:
    """``[res, [n/m], diskstate, replstate, flags, role, primarynode]``."""
    return line.split()


# --- states -------------------------------------------------------------------------------------

def test_up_to_date_primary_and_secondary(tree, capsys):
    assert fields(tree.line(capsys, "a")) == ["r", "[2/2]", "UpToDate", "Replicating", "DCASFR", "Primary", "a"]
    code, out, _ = tree.run(capsys, "a", "view", "r")
    assert "--------- resource r 64.0 MiB [2/2]" in out
    node_b = next(ln for ln in out.splitlines() if ln.startswith("    node b:"))
    assert node_b.split()[2:6] == ["UpToDate", "Replaying", "dCASFR", "Secondary"]
    assert "sync: done" in node_b and "fetch: done" in node_b and "replay: done" in node_b
    assert "syncing:" not in out and "replaying:" not in out


def test_up_to_date_secondary_from_its_own_view(tree_b, capsys):
    assert fields(tree_b.line(capsys, "b")) == ["r", "[2/2]", "UpToDate", "Replaying", "dCASFR", "Secondary", "a"]


def test_syncing_then_sync_paused(tree_b, capsys):
    t = tree_b
    t.set(f"{R}/syncstatus-b", SIZE // 4)
    t.set(f"{R}/actual-b/is-syncing", 1)
    t.set(f"{R}/actual-b/amount-sync_rate", 4 << 20)
    code, out, _ = t.run(capsys, "b", "view", "r")
    line = next(ln for ln in out.splitlines() if ln.startswith("  r ["))
    assert fields(line)[2:5] == ["InConsistent", "Syncing", "dcAsFR"]
    sync = next(ln for ln in out.splitlines() if "syncing:" in ln)
    assert "25.00%" in sync and "(16.0 MiB/64.0 MiB)" in sync and "rate: 4.0 MiB/s" in sync
    assert "remaining: 12 s" in sync
    assert "[=====...............]" in sync
    assert "WORK SYNC_RUNNING r@b" in out
    t.set(f"{R}/todo-b/sync", 0)
    t.set(f"{R}/actual-b/is-syncing", 0)
    assert fields(t.line(capsys, "b"))[2:5] == ["InConsistent", "PausedSync", "dcA-FR"]


def test_fetch_paused(tree_b, capsys):
    t = tree_b
    t.set(f"{R}/todo-b/connect", 0)
    t.set(f"{R}/actual-b/is-copying", 0)
    t.set(f"{R}/actual-b/fetch-pos", f"{LOG},1024")
    t.set(f"{R}/replay-b", f"{LOG},1024,0")
    assert fields(t.line(capsys, "b"))[2:5] == ["OutDated[F]", "PausedFetch", "dCAS-R"]
    code, out, _ = t.run(capsys, "b", "view", "r")
    assert "replaying:" in out
    assert "> fetch: 3.0 KiB" in out and "> replay: 0 B" in out
    assert "HINT FETCH_PAUSED r@b" in out


def test_replay_paused(tree_b, capsys):
    t = tree_b
    t.set(f"{R}/todo-b/allow-replay", 0)
    t.set(f"{R}/actual-b/is-replaying", 0)
    t.set(f"{R}/replay-b", f"{LOG},1024,0")
    assert fields(t.line(capsys, "b"))[2:5] == ["OutDated[R]", "PausedReplay", "dCASF-"]
    code, out, _ = t.run(capsys, "b", "view", "r")
    assert "[=====+++++++++++++++]" in out  # replayed, fetched, nothing left to fetch
    assert "logs: [1..1]" in out
    assert "HINT REPLAY_PAUSED r@b" in out


def test_fetch_and_replay_behind(tree_b, capsys):
    t = tree_b
    t.set(f"{R}/actual-b/fetch-pos", f"{LOG},2048")
    t.set(f"{R}/replay-b", f"{LOG},1024,0")
    t.set(f"{R}/actual-b/amount-file_rate", 1024)
    assert fields(t.line(capsys, "b"))[2:5] == ["OutDated[FR]", "Replaying", "dCASfr"]
    code, out, _ = t.run(capsys, "b", "view", "r")
    assert "> fetch: 2.0 KiB rate: 1.0 KiB/s remaining: 2 s" in out
    assert "> replay: 1.0 KiB rate: unknown remaining: unknown" in out


def test_replay_stopped(tree_b, capsys):
    t = tree_b
    t.set(f"{R}/actual-b/replay-code", "-1,5,4096")
    t.set(f"{R}/actual-b/msg-err-replay-stop", "replay stopped: bad checksum")
    line = t.line(capsys, "b")
    assert fields(line)[2] == "DefectiveLog[5@4096]"
    assert fields(line)[4][1] == "c"  # a stopped replay is not consistent
    code, out, _ = t.run(capsys, "b", "view", "r")
    assert "TODO REPLAY_STOPPED r@b: " in out
    assert _macro(t, capsys, "b", "replay-code") == "-1,5,4096"
    assert _macro(t, capsys, "b", "is-consistent") == "0"


def test_a_down_node(tree, capsys):
    t = tree
    t.set("actual-b/time", f"{time.time() - 600:.9f}")
    code, out, _ = t.run(capsys, "a", "view", "r")
    assert "--------- resource r 64.0 MiB [1/2]" in out
    node_b = next(ln for ln in out.splitlines() if ln.startswith("    node b:"))
    assert node_b.split()[3] == "UnResponsive"
    assert "(last report 10 min" in node_b
    assert "TODO NODE_DOWN @b" in out
    assert "[1/2 nodes alive]" in out
    assert _macro(t, capsys, "b", "is-alive") == "0"
    assert 590 <= int(_macro(t, capsys, "b", "alive-age")) <= 700


def test_the_primary_down_seen_from_the_secondary(tree_b, capsys):
    tree_b.set("actual-a/time", f"{time.time() - 600:.9f}")
    assert fields(tree_b.line(capsys, "b"))[3] == "PrimaryUnreachable"


def test_window_decides_who_is_alive(tree, capsys):
    tree.set("actual-b/time", f"{time.time() - 5:.9f}")
    assert _macro(tree, capsys, "b", "is-alive") == "1"
    code, out, err = tree.run(capsys, "b", "--window", "2", "view-is-alive")
    assert (code, out) == (0, "0\n"), err


def test_detached_and_handover(tree, capsys):
    t = tree
    t.set(f"{R}/todo-b/attach", 0)
    t.set(f"{R}/actual-b/is-attached", 0)
    code, out, _ = t.run(capsys, "a", "view", "r")
    node_b = next(ln for ln in out.splitlines() if ln.startswith("    node b:"))
    assert node_b.split()[2:5] == ["Detached", "NotStarted", "dC-SFR"]
    # Handover to b: b is designated, a still serves.
    t.set(f"{R}/todo-b/attach", 1)
    t.set(f"{R}/actual-b/is-attached", 1)
    t.set(f"{R}/primary", "b")
    # create-resource writes no syncstatus for the creator, and the model counts a missing one as 0
    # once the host is no longer the designated primary; written here as a synced node has it.
    t.set(f"{R}/syncstatus-a", SIZE)
    assert fields(t.line(capsys, "a"))[2:] == ["UpToDate", "Replaying", "DCASFR", "RemainsPrimary", "b"]
    assert _macro(t, capsys, "b", "role") == "NotYetPrimary"
    assert _macro(t, capsys, "b", "primarynode") == "b"


def test_verbose_lists_logs_with_versions(tree, capsys):
    tree.set(f"{R}/version-000000001-a", f"{'ab' * 16},{LOG},{END}:{'0' * 32},log-000000000-a,0")
    code, out, _ = tree.run(capsys, "a", "view", "--verbose", "r")
    assert f"      {LOG}  4.0 KiB  a=abababab" in out


# --- marsd down, json, resources -----------------------------------------------------------------

def test_marsd_down_is_said_once_and_the_view_still_prints(tmp_path, capsys):
    f = Fixture(tmp_path / "mars")
    code, out, err = f.run(capsys, "a", "view")
    assert code == 0
    assert err == "marsadm: marsd is not running on host a; showing what the tree knows\n"
    assert fields(next(ln for ln in out.splitlines() if ln.startswith("  r [")))[3] == "MarsdNotRunning"
    assert "TODO MARSD_DOWN @a" in out
    # A macro is for scripts: one value on stdout, nothing on stderr.
    code, out, err = f.run(capsys, "a", "view-get-primary", "r")
    assert (code, out, err) == (0, "a\n", "")


def test_marsd_answering_means_no_notice(tree, capsys, monkeypatch):
    from mars.engine import model
    monkeypatch.setattr(model, "live_snapshot", lambda d, h, **kw: (model.build(d, h), True))
    code, out, err = tree.run(capsys, "a", "view")
    assert code == 0 and err == ""


def test_json_is_the_snapshot_with_findings(tree_b, capsys):
    tree_b.set(f"{R}/todo-b/allow-replay", 0)
    code, out, err = tree_b.run(capsys, "b", "view", "--json", "r")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["local_host"] == "b" and doc["marsd_running"] is True
    assert doc["resources"]["r"]["nodes"]["b"]["switches"]["replay"] is False
    f = next(f for f in doc["findings"] if f["code"] == "REPLAY_PAUSED")
    assert (f["level"], f["res"], f["node"]) == ("HINT", "r", "b") and f["remedy"]
    assert set(f) >= {"level", "code", "res", "node", "text", "remedy"}


def test_all_is_every_resource_of_this_host(tree, capsys):
    t = tree
    t.set("resource-s/size", SIZE)
    t.set("resource-s/data-b", "/images/s.img")
    t.set("resource-s/primary", "b")
    code, out, _ = t.run(capsys, "a", "view")
    assert "resource r " in out and "resource s " not in out
    code, out, _ = t.run(capsys, "a", "view", "r,s")
    assert "--------- resource s 64.0 MiB [1/1]" in out
    assert "  s [1/1] host a is no member; primary b" in out
    assert "    node b:" in out.split("resource s")[1]


def test_unknown_resource_exits_1(tree, capsys):
    for argv in (["view", "nosuch"], ["view", "r,nosuch"], ["view-get-primary", "nosuch"],
                 ["view", "--json", "nosuch"]):
        code, out, err = tree.run(capsys, "a", *argv)
        assert code == 1, argv
        assert out == ""
        assert err.startswith("marsadm: view nosuch: resource nosuch does not exist; the resources are: r"), err


def test_no_cluster_exits_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = marsadm.main(["--mars-dir", str(tmp_path / "empty"), "--host", "a", "view"])
    assert code == 1 and "no cluster" in capsys.readouterr().err


# --- macros ------------------------------------------------------------------------------------

def _macro(t: Fixture, capsys, host: str, name: str, res: str = "r") -> str:
    code, out, err = t.run(capsys, host, f"view-{name}", res)
    assert code == 0, err
    assert out.endswith("\n") and out.count("\n") == 1, out
    return out[:-1]


REQUIRED = """get-primary todo-primary is-primary is-secondary todo-attach todo-sync todo-fetch todo-replay
    is-attach is-sync is-fetch is-replay is-alive is-split-brain is-emergency is-consistent is-orphan is-member
    get-disk disk-size resource-size device-opened sync-size sync-pos sync-rest sync-percent sync-rate sync-remain
    sync-reached fetch-pos fetch-size fetch-rest fetch-percent fetch-rate fetch-remain fetch-reached replay-pos
    replay-size replay-rest replay-percent replay-rate replay-remain replay-reached work-rest work-reached
    replay-code deletable-size rest-space total-space fetch-age replay-age alive-age resource-peers cluster-peers
    global-sync-limit-value uuid time real-time diskstate replstate flags role primarynode""".split()


def test_the_required_macros_exist():
    assert not set(REQUIRED) - set(MACROS)


@pytest.mark.parametrize("name", sorted(MACROS))
@pytest.mark.parametrize("host", ["a", "b"])
def test_every_macro_prints_one_line(tree, capsys, name, host):
    _macro(tree, capsys, host, name)


def test_macro_values(tree_b, capsys):
    t = tree_b
    t.set(f"{R}/actual-b/fetch-pos", f"{LOG},3072")
    t.set(f"{R}/replay-b", f"{LOG},1024,0")
    t.set(f"{R}/actual-b/amount-file_rate", 512)
    t.set(f"{R}/actual-b/amount-replay_rate", 256)
    t.set("actual-b/rest-space", 5 << 30)
    t.set("actual-b/total-space", 10 << 30)
    t.set("actual-b/tunable-sync-limit", 2)
    expect_b = {
        "get-primary": "a", "todo-primary": "0", "is-primary": "0", "is-secondary": "1", "is-member": "1",
        "todo-attach": "1", "is-attach": "1", "is-fetch": "1", "is-sync": "0", "is-alive": "1",
        "is-consistent": "1", "is-split-brain": "0", "is-orphan": "0", "is-emergency": "0",
        "get-disk": "/images/b.img", "disk-size": str(SIZE), "resource-size": str(SIZE), "device-opened": "0",
        "sync-size": str(SIZE), "sync-pos": str(SIZE), "sync-rest": "0", "sync-reached": "1", "sync-percent": "100",
        "sync-remain": "0", "sync-rate": "0",
        "fetch-pos": "3072", "fetch-size": "4096", "fetch-rest": "1024", "fetch-percent": "75",
        "fetch-rate": "512", "fetch-remain": "2", "fetch-reached": "0",
        "replay-pos": "1024", "replay-size": "3072", "replay-rest": "2048", "replay-percent": "33.33",
        "replay-rate": "256", "replay-remain": "8", "replay-reached": "0",
        "work-rest": "3072", "work-reached": "0", "work-remain": "10", "work-rate": "512",
        "replay-code": "0", "rest-space": "5", "total-space": "10",
        "rest-space-bytes": str(5 << 30), "total-space-bytes": str(10 << 30),
        "resource-peers": "a,b", "cluster-peers": "a,b", "count-resource-peers": "2",
        "global-sync-limit-value": "2", "uuid": "a_test",
        "diskstate": "OutDated[FR]", "replstate": "Replaying", "flags": "dCASfr", "role": "Secondary",
        "primarynode": "a", "todo-role": "Secondary",
    }
    got = {name: _macro(t, capsys, "b", name) for name in expect_b}
    assert got == expect_b
    assert _macro(t, capsys, "a", "is-primary") == "1"
    assert _macro(t, capsys, "a", "todo-primary") == "1"
    assert _macro(t, capsys, "a", "replay-rest") == "0"
    assert _macro(t, capsys, "b", "disk-size", "r") == str(SIZE)
    assert abs(float(_macro(t, capsys, "a", "time")) - time.time()) < 60
    assert abs(int(_macro(t, capsys, "a", "real-time")) - time.time()) < 60
    assert 0 <= int(_macro(t, capsys, "b", "replay-age")) < 60
    assert _macro(t, capsys, "c", "is-member") == "0"  # --host names any node; c is none of r's


def test_space_macros_are_whole_gib_as_the_original_and_bytes_beside(tree_b, capsys):
    t = tree_b
    t.set("actual-b/rest-space", (3 << 30) - 1)  # just below 3 GiB: rounded down, as the original
    t.set("actual-b/total-space", (7 << 30) + 12345)
    assert _macro(t, capsys, "b", "rest-space") == "2"
    assert _macro(t, capsys, "b", "total-space") == "7"
    assert _macro(t, capsys, "b", "rest-space-bytes") == str((3 << 30) - 1)
    assert _macro(t, capsys, "b", "total-space-bytes") == str((7 << 30) + 12345)
    # A node that never said: unknown in both units.
    assert _macro(t, capsys, "a", "rest-space") == "-1"
    assert _macro(t, capsys, "a", "total-space-bytes") == "-1"


def _text_macro(t: Fixture, capsys, host: str, name: str, *res: str) -> list[str]:
    """A line macro's lines; [] for the empty value (one empty line on stdout)."""
    code, out, err = t.run(capsys, host, f"view-{name}", *res)
    assert code == 0 and err == "", err
    assert out.endswith("\n"), out
    return out[:-1].split("\n") if out != "\n" else []


def _view_lines(t: Fixture, capsys, host: str, marker: str) -> list[str]:
    code, out, _ = t.run(capsys, host, "view", "r")
    return [ln for ln in out.splitlines() if marker in ln]


def test_syncinfo_and_sync_line_are_the_views_sync_line(tree_b, capsys):
    t = tree_b
    for name in ("syncinfo", "sync-line"):
        assert _text_macro(t, capsys, "b", name, "r") == []  # synced: nothing to show
    t.set(f"{R}/syncstatus-b", SIZE // 4)
    t.set(f"{R}/actual-b/is-syncing", 1)
    t.set(f"{R}/actual-b/amount-sync_rate", 4 << 20)
    shown = _view_lines(t, capsys, "b", "syncing:")
    assert len(shown) == 1 and "25.00%" in shown[0] and "rate: 4.0 MiB/s" in shown[0]
    assert _text_macro(t, capsys, "b", "syncinfo", "r") == shown
    assert _text_macro(t, capsys, "b", "sync-line", "r") == shown
    # The primary (the sync source) and a detached secondary show none, in the view and the macro.
    assert _text_macro(t, capsys, "a", "syncinfo", "r") == []
    t.set(f"{R}/actual-b/is-attached", 0)
    assert _view_lines(t, capsys, "b", "syncing:") == []
    assert _text_macro(t, capsys, "b", "syncinfo", "r") == []


def test_replinfo_fetch_line_and_replay_line_are_the_views_lines(tree_b, capsys):
    t = tree_b
    for name in ("replinfo", "fetch-line", "replay-line"):
        assert _text_macro(t, capsys, "b", name, "r") == []  # caught up
    t.set(f"{R}/actual-b/fetch-pos", f"{LOG},2048")
    t.set(f"{R}/replay-b", f"{LOG},1024,0")
    t.set(f"{R}/actual-b/amount-file_rate", 1024)
    code, out, _ = t.run(capsys, "b", "view", "r")
    lines = out.splitlines()
    first = next(i for i, ln in enumerate(lines) if "replaying:" in ln)
    shown = lines[first:first + 3]
    assert "> fetch: 2.0 KiB" in shown[1] and "> replay: 1.0 KiB" in shown[2]
    assert _text_macro(t, capsys, "b", "replinfo", "r") == shown
    assert _text_macro(t, capsys, "b", "fetch-line", "r") == [shown[1]]
    assert _text_macro(t, capsys, "b", "replay-line", "r") == [shown[2]]
    assert _text_macro(t, capsys, "a", "replinfo", "r") == []  # the primary replays nothing from others


def test_comminfo(tree, capsys):
    t = tree
    heading = "++++ Global / Communication Status ++++"
    assert _text_macro(t, capsys, "a", "comminfo") == [heading]  # all is well: the heading alone
    t.set("actual-a/msg-peer-b", "connection refused")
    t.set("actual-b/msg-peer-a", "timed out after 10 s")
    assert _text_macro(t, capsys, "a", "comminfo") == [
        heading, "  a cannot reach b: connection refused", "  b cannot reach a: timed out after 10 s"]
    # A node that is down is not a witness: its old link errors are not shown.
    t.set("actual-b/time", f"{time.time() - 600:.9f}")
    assert _text_macro(t, capsys, "a", "comminfo") == [heading, "  a cannot reach b: connection refused"]
    # A stamp from 10 minutes ahead drags the Lamport clock: the slip is shown.
    t.t.set("actual-a/time", now(), stamp_ns=time.time_ns() + 600 * 10**9)
    lines = _text_macro(t, capsys, "a", "comminfo")
    assert lines[0] == heading and lines[-1] in ("  Lamport time slip: 10 min", "  Lamport time slip: 9 min 59 s")


def test_line_macros_in_view_help(tree, capsys):
    code, out, _ = tree.run(capsys, "a", "view-help")
    assert code == 0
    for name in ("syncinfo", "sync-line", "replinfo", "fetch-line", "replay-line", "comminfo",
                 "rest-space-bytes", "total-space-bytes"):
        assert f"  {name} " in out, name
    rest = next(ln for ln in out.splitlines() if ln.startswith("  rest-space "))
    assert "GiB" in rest and "rounded down" in rest


def test_split_brain_macro(tree, capsys):
    tree.set(f"{R}/version-000000001-a", f"{'ab' * 16},{LOG},{END}:{'0' * 32},log-000000000-a,0")
    tree.set(f"{R}/version-000000001-b", f"{'cd' * 16},{LOG},{END}:{'0' * 32},log-000000000-a,0")
    assert _macro(tree, capsys, "a", "is-split-brain") == "1"


def test_spellings(tree, capsys):
    """view-<macro>, view --macro <macro>, and option values that look like a macro are left alone."""
    code, out, _ = tree.run(capsys, "b", "view", "--macro", "get-primary", "r")
    assert (code, out) == (0, "a\n")
    code, out, _ = tree.run(capsys, "b", "--ip", "view-x", "view-get-primary", "r")
    assert (code, out) == (0, "a\n")
    code, out, _ = tree.run(capsys, "b", "view-uuid")  # a cluster macro needs no resource
    assert (code, out) == (0, "a_test\n")
    code, out, _ = tree.run(capsys, "b", "view-help")
    assert code == 0 and "  sync-rest " in out and "total-space" in out and "GiB" in out


@pytest.mark.parametrize("argv, words", [
    (["view-frobnicate", "r"], "unknown macro 'frobnicate'; list the macros with 'marsadm view-help'"),
    (["view", "--macro", "frobnicate", "r"], "unknown macro 'frobnicate'"),
    (["view-get-primary"], "macro get-primary needs a resource"),
    (["view-get-primary", "all"], "takes one resource"),
    (["view-get-primary", "r,r"], "takes one resource"),
    (["view", "--json", "--macro", "uuid"], "exclude each other"),
    (["--window", "0", "view"], "--window"),
])
def test_usage_errors_exit_2(tree, capsys, argv, words):
    code, out, err = tree.run(capsys, "a", *argv)
    assert code == 2, err
    assert out == ""
    assert words in err and err.startswith("marsadm: ")
