"""marsadm's everyday commands against real marsd processes: cron, wait-cluster, wait-resource, help."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess

import pytest

from harness import caught_up, run, start_cluster, wait_until, write

from mars.engine import marsadm
from mars.engine.marsadm import COMMANDS


def logs(node, res: str = "r") -> list[str]:
    return sorted(p.name for p in (node.mars_dir / f"resource-{res}").glob("log-*"))


def lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return r.stderr.splitlines()


# --- cron ----------------------------------------------------------------------------------------

def test_cron_on_a_single_node_rotates_then_deletes(resource):
    node, res, _ = resource
    r = node.marsadm("cron")
    assert len(lines(r)) == 2, r.stderr
    assert lines(r)[0] == f"marsadm: {res}: log-000000001-a is empty; nothing to rotate"
    assert lines(r)[1].startswith(f"marsadm: {res}: no log file can be deleted (1 present;")
    write(node, "write -P 0x01 0 1M", res=res)
    r = node.marsadm("cron", res)
    assert "rotating log-000000001-a (1.0 MiB) -> log-000000002-a" in r.stderr
    # It waited for marsd to switch: the finished file has its version entry.
    assert node.tree_value(f"resource-{res}/version-000000001-a")
    assert "log-000000002-a" in logs(node)
    # log-000000001-a goes once every member (here: a alone) has replayed it: in this run already
    # when the switch took long enough for a's replay position to move on, else in the next.
    wait_until(lambda: (node.tree_value(f"resource-{res}/replay-a") or "").startswith("log-000000002-a"),
               10, "replay position in log 2")
    again = node.marsadm("cron")
    assert f"marsadm: {res}: log-000000002-a is empty; nothing to rotate" in lines(again)
    assert f"marsadm: {res}: deleted log-000000001-a" in lines(r) + lines(again)
    assert logs(node) == ["log-000000002-a"]
    # The data is still all there.
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x01 0 1M", node.uri(res)])


def test_cron_in_a_trio_deletes_everywhere_and_secondaries_only_say_so(trio):
    a, b, c = trio
    old = logs(a)[-1]
    write(a, "write -P 0x22 1M 512K")
    first = a.marsadm("cron")
    assert f"rotating {old} " in first.stderr, first.stderr
    new = logs(a)[-1]
    assert new > old
    write(a, "write -P 0x33 2M 64K")  # into the new file: every member's replay moves there
    for n in (b, c):
        wait_until(lambda n=n: caught_up(a, n, "r"), 30, f"{n.host} to replay into {new}")
        r = n.marsadm("cron")
        assert lines(r) == [(f"marsadm: r: host {n.host} is a secondary (primary: a); nothing to do here, "
                             "marsd deletes its log copies after the primary's cron")]
    wait_until(lambda: (a.tree_value("resource-r/replay-a") or "").startswith(new), 10, f"a's replay in {new}")
    r = a.marsadm("cron")
    assert f"marsadm: r: deleted {old}" in lines(first) + lines(r), first.stderr + r.stderr
    assert old not in logs(a)
    # The secondaries follow the primary's deletion with their own copies.
    # (This cron rotated again, since the new file had a write; on a slow machine every replay
    # may have moved on into the newest file before its delete phase, and then it deleted the
    # new file too. Either way the secondaries keep a copy of every file the primary keeps.)
    for n in (b, c):
        wait_until(lambda n=n: old not in logs(n), 20, f"{n.host} to delete its copy of {old}")
        wait_until(lambda n=n: set(logs(a)) <= set(logs(n)), 20, f"{n.host} to keep what a keeps")


def test_cron_on_a_primary_that_does_not_serve_and_without_marsd(resource):
    node, res, _ = resource
    node.marsadm("down", res)
    r = node.marsadm("cron")
    assert lines(r) == [(f"marsadm: {res}: host a is the designated primary but does not serve {res} "
                         f"(NotYetPrimary, Detached); nothing to rotate or delete until it does "
                         f"('marsadm attach {res}')")]
    node.stop()
    r = node.marsadm("cron", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("marsadm: cron: marsd is not running on host a") and "marsd --mars-dir" in r.stderr


def test_only_one_cron_at_a_time(resource):
    node, res, _ = resource
    write(node, "write -P 0x03 0 64K", res=res)
    fd = os.open(node.mars_dir / "cron.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4242\n", 0)
        r = node.marsadm("cron")
        assert r.returncode == 0
        assert lines(r) == [(f"marsadm: another marsadm cron (pid 4242) runs on {node.mars_dir}; "
                             "this one leaves the work to it")]
        assert logs(node) == ["log-000000001-a"]  # it did nothing
    finally:
        os.close(fd)
    r = node.marsadm("cron")
    assert "rotating log-000000001-a" in r.stderr


def test_cron_names_a_resource_that_does_not_exist(resource):
    node, _, _ = resource
    r = node.marsadm("cron", "nosuch", check=False)
    assert r.returncode == 1 and "resource nosuch does not exist" in r.stderr


# --- wait-cluster --------------------------------------------------------------------------------

def test_wait_cluster_hears_every_node_and_names_the_silent_one(workdir):
    base, nodes = workdir
    a, b, c = start_cluster(base, nodes, "abc")
    r = a.marsadm("wait-cluster")
    assert lines(r)[-1] == "marsadm: 3/3 nodes reported", r.stderr
    a.marsadm("create-resource", "r", str(base / "a.img"), "4M")
    c.kill()
    r = a.marsadm("--timeout", "3", "wait-cluster", check=False)
    assert r.returncode == 1
    assert "wait-cluster: 2/3 nodes reported within 3 s; no report from c; start marsd there" in r.stderr, r.stderr
    assert "127.0.0.4" in r.stderr
    # With a resource: only its members count (r has only a).
    r = a.marsadm("--timeout", "3", "wait-cluster", "r")
    assert lines(r)[-1] == "marsadm: 1/1 nodes reported"
    r = a.marsadm("wait-cluster", "nosuch", check=False)
    assert r.returncode == 1 and "resource nosuch does not exist" in r.stderr
    c.start()
    r = b.marsadm("--timeout", "30", "wait-cluster")  # the alias of the original
    assert lines(r)[-1] == "marsadm: 3/3 nodes reported"
    r = b.marsadm("--timeout", "30", "wait-connect")
    assert lines(r)[-1] == "marsadm: 3/3 nodes reported"


def test_wait_cluster_without_marsd_says_so(node):
    node.stop()
    r = node.marsadm("wait-cluster", check=False)
    assert r.returncode == 1
    assert "marsd is not running on host a" in r.stderr and "marsd --mars-dir" in r.stderr
    r = node.marsadm("--no-wait", "wait-cluster", check=False)
    assert r.returncode == 2 and "only waits" in r.stderr


# --- wait-resource --------------------------------------------------------------------------------

def test_wait_resource_on_switches_and_reports(resource):
    node, res, _ = resource
    for cond in ("attach-on", "is-attach-on", "is-device-on", "is-primary-on", "primary-on", "fetch-on",
                 "connect-on", "replay-on", "sync-on", "is-sync-off", "is-replay-off", "has-attach-on"):
        r = node.marsadm("wait-resource", res, cond)
        assert lines(r)[-1] == f"marsadm: {res}: {cond}", (cond, r.stderr)
    node.marsadm("--no-wait", "detach", res)
    node.marsadm("wait-resource", res, "is-attach-off")
    assert node.tree_value(f"resource-{res}/actual-a/is-attached") == "0"
    r = node.marsadm("--timeout", "1", "wait-resource", res, "is-attach-on", check=False)
    assert r.returncode == 1
    assert f"wait-resource {res}: is-attach-on not reached within 1 s: is-attach is off (Detached " in r.stderr, \
        r.stderr
    # It really waits: started first, it returns once an attach makes the export appear.
    waiter = subprocess.Popen([str(node.bin / "marsadm"), "--mars-dir", str(node.mars_dir), "--host", "a",
                               "--timeout", "60", "wait-resource", res, "is-device-on"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=node.env())
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(1.0)
        node.marsadm("attach", res)
        _, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, err
        assert err.splitlines()[-1] == f"marsadm: {res}: is-device-on"
    finally:
        if waiter.poll() is None:
            waiter.send_signal(signal.SIGKILL)
            waiter.wait()
    r = node.marsadm("--timeout", "0.5", "wait-resource", res, "secondary-on", check=False)
    assert r.returncode == 1 and "secondary-on not reached within 0.5 s: secondary is off" in r.stderr


def test_wait_resource_refusals(resource):
    node, res, _ = resource
    r = node.marsadm("wait-resource", res, "attached", check=False)
    assert r.returncode == 2
    assert "unknown condition 'attached'" in r.stderr
    for name in ("attach", "fetch", "connect", "replay", "sync", "primary", "secondary", "is-attach", "is-fetch",
                 "is-copy", "is-replay", "is-sync", "is-primary", "is-device"):
        assert name in r.stderr
    r = node.marsadm("wait-resource", res, "is-frobnicate-on", check=False)
    assert r.returncode == 2
    node.stop()
    r = node.marsadm("wait-resource", res, "is-attach-off")  # true without marsd: nothing runs
    assert r.returncode == 0
    r = node.marsadm("wait-resource", res, "is-attach-on", check=False)
    assert r.returncode == 1 and "marsd is not running on host a" in r.stderr


# --- help ------------------------------------------------------------------------------------------

def test_help_is_the_same_text_as_dash_dash_help(node):
    plain = node.marsadm("--help")
    via = node.marsadm("help")
    assert via.stdout == plain.stdout and "wait-resource" in via.stdout and "cron" in via.stdout
    assert node.marsadm("help", "wait-cluster").stdout == node.marsadm("wait-cluster", "--help").stdout
    r = node.marsadm("help", "frobnicate", check=False)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_of_every_command(tmp_path, capsys, name):
    common = ["--mars-dir", str(tmp_path), "--host", "a"]
    with pytest.raises(SystemExit) as e:
        marsadm.main([*common, name, "--help"])
    assert e.value.code == 0
    want = capsys.readouterr().out
    assert marsadm.main([*common, "help", name]) == 0
    assert capsys.readouterr().out == want
