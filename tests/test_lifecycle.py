"""Operating a replicated resource: invalidate, pause/resume, log lifecycle across nodes, dead nodes."""

from __future__ import annotations

import os

import pytest

from harness import caught_up, run, start_cluster, start_pair, wait_until, write
from harness import sha256 as sha

MiB = 1 << 20


@pytest.fixture
def pair(workdir):
    return start_pair(*workdir, "32M", ("--logrot-auto", "2M"))



def test_invalidate_repairs_a_damaged_secondary(pair):
    a, b = pair
    write(a, "write -P 0x21 0 4M")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    with open(b.base / "b.img", "r+b") as f:  # damage behind MARS's back
        f.seek(2 * MiB)
        f.write(b"\xff" * 4096)
    assert sha(b.base / "b.img") != sha(a.base / "a.img")
    r = a.marsadm("invalidate", "r", check=False)
    assert r.returncode == 1 and "primary" in r.stderr
    b.marsadm("invalidate", "r")
    wait_until(lambda: caught_up(a, b, "r") and b.tree_value("resource-r/actual-b/sync-chunks-copied") == "1", 30,
               "b to resync")
    assert sha(b.base / "b.img") == sha(a.base / "a.img")


def test_pause_replay_holds_back_log_deletion_and_automatic_rotation(pair):
    a, b = pair
    write(a, "write -P 0x01 0 1M")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    b.marsadm("pause-replay", "r")
    assert b.tree_value("resource-r/actual-b/is-replaying") == "0"
    # More than the 2 MiB auto-rotation size: the primary starts new log files by itself.
    d = a.mars_dir / "resource-r"
    write(a, "write -P 0x02 1M 3M")
    wait_until(lambda: len(list(d.glob("log-*-a"))) >= 2, 20, "automatic log rotation")
    write(a, "write -P 0x03 4M 3M")
    wait_until(lambda: len(list(d.glob("log-*-a"))) >= 3, 20, "a second automatic log rotation")
    r = a.marsadm("log-delete-all", "r")
    assert "no log file can be deleted" in r.stderr and "b at log-000000001-a" in r.stderr
    b.marsadm("resume-replay", "r")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up after resuming")
    assert sha(b.base / "b.img") == sha(a.base / "a.img")
    # Every node replayed the finished logs and wrote the same version entries.
    for seq in (1, 2):
        va = a.tree_value(f"resource-r/version-{seq:09d}-a")
        wait_until(lambda: b.tree_value(f"resource-r/version-{seq:09d}-b") is not None, 20, f"b's version {seq}")
        assert b.tree_value(f"resource-r/version-{seq:09d}-b").split(":")[0].split(",")[0] == va.split(",")[0]
    r = a.marsadm("log-delete-all", "r")
    assert "log file(s) deleted" in r.stderr
    wait_until(lambda: not (b.mars_dir / "resource-r" / "log-000000001-a").exists(), 20,
               "b to delete its replayed copy too")


def test_pause_and_resume_sync(workdir):
    a, b = start_cluster(*workdir, "ab")
    a.marsadm("create-resource", "r", str(a.base / "a.img"), "128M")
    src = a.base / "src"
    src.write_bytes(os.urandom(128 * MiB))
    run(["nbdcopy", str(src), a.uri("r")])
    wait_until(lambda: b.tree_value("resource-r/size") is not None, 20, "b to learn r")
    b.marsadm("set-global-sync-limit-value", "0")
    b.marsadm("--no-wait", "join-resource", "r", str(b.base / "b.img"), "--create")
    b.marsadm("pause-sync", "r")
    paused_at = int(b.tree_value("resource-r/syncstatus-b") or 0)
    assert b.tree_value("resource-r/actual-b/is-syncing") == "0"
    b.marsadm("resume-sync", "r")
    wait_until(lambda: caught_up(a, b, "r"), 60, "b to finish the sync")
    assert int(b.tree_value("resource-r/syncstatus-b")) >= paused_at
    assert sha(b.base / "b.img") == sha(a.base / "a.img")


def test_dead_node_removal(workdir):
    a, b, c = start_cluster(*workdir, "abc")
    a.marsadm("create-resource", "r", str(a.base / "a.img"), "16M")
    wait_until(lambda: c.tree_value("resource-r/size") is not None, 20, "c to learn r")
    c.marsadm("join-resource", "r", str(c.base / "c.img"), "--create")
    wait_until(lambda: caught_up(a, c, "r"), 30, "c to catch up")
    wait_until(lambda: a.tree_value("resource-r/data-c") is not None, 20, "a to know c is a member")
    c.kill()  # c is gone for good
    # As in the original's manual: on a survivor, down / leave-resource / leave-cluster for the dead host.
    a.marsadm("--host", "c", "down", "r", "--force", "--no-wait")
    a.marsadm("--host", "c", "leave-resource", "r", "--force")
    a.marsadm("--host", "c", "leave-cluster", "--force")
    assert a.tree_value("resource-r/data-c") is None and a.tree_value("ips/ip-c") is None
    wait_until(lambda: b.tree_value("ips/ip-c") is None and b.tree_value("resource-r/data-c") is None, 20,
               "b to forget c")
    # The dead member no longer holds logs back.
    write(a, "write -P 0x09 0 1M")
    a.marsadm("log-rotate", "r")
    wait_until(lambda: (a.tree_value("resource-r/replay-a") or "").startswith("log-000000002"), 20, "a in log 2")
    r = a.marsadm("log-delete-all", "r")
    assert "1 log file(s) deleted" in r.stderr


def test_replay_of_fetched_copies_with_fetch_off_after_restart(pair):
    """A secondary restarted with fetching off still replays the copies it already has."""
    a, b = pair
    write(a, "write -P 0x01 0 1M")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    b.marsadm("pause-replay", "r")
    write(a, "write -P 0x4b 2M 512k")  # stays below the 2 MiB auto-rotation
    end = (a.mars_dir / "resource-r" / "log-000000001-a").stat().st_size
    wait_until(lambda: (b.mars_dir / "resource-r" / "log-000000001-a").stat().st_size == end, 20, "b to fetch")
    b.marsadm("disconnect", "r")
    b.restart()
    b.marsadm("resume-replay", "r")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to replay its copies without fetching")
    assert sha(b.base / "b.img") == sha(a.base / "a.img")


def test_sigusr1_logs_where_every_task_waits(resource):
    """A marsd that seems to hang can be asked where it waits, without stopping it."""
    import signal
    node, res, _ = resource
    node.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: "SIGUSR1:" in node.log(), 10, "marsd to log its tasks")
    text = node.log()
    assert "Daemon.run()" in text and f"checkpoint-{res}" in text
    assert node.proc.poll() is None  # it goes on
    assert node.stop() == 0
