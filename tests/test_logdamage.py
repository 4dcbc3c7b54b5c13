"""A damaged or truncated log on disk: reported with file, offset and reason; nothing inconsistent served."""

from __future__ import annotations

import os

from harness import run, wait_until

from mars.engine.log import format as lf
from mars.engine.log.files import scan_file
from mars.engine.log.values import first_record


def _records(path):
    out = []
    scan_file(path, 0, first_record(1), out.append)
    return out


def _write(node, res, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    run(args + [node.uri(res)])


def _two_resources(node):
    node.marsadm("create-resource", "r", str(node.base / "r.img"), "8M")
    node.marsadm("create-resource", "ok", str(node.base / "ok.img"), "8M")
    _write(node, "r", "write -P 0x01 0 64k", "write -P 0x02 64k 64k", "write -P 0x03 128k 64k")
    _write(node, "ok", "write -P 0x44 0 64k")
    return node.mars_dir / "resource-r" / "log-000000001-a"


def test_flipped_byte_after_replay_position_stops_replay(node):
    log = _two_resources(node)
    recs = _records(log)
    assert len(recs) == 3
    node.kill()
    # Make the crash case: the replay position back at the start, as if the device never synced.
    os.unlink(node.mars_dir / "resource-r" / "replay-a")
    os.symlink("log-000000001-a,0,0", node.mars_dir / "resource-r" / "replay-a")
    bad = recs[1].offset + lf.HEADER_SIZE + 100  # inside the second record's payload
    with open(log, "r+b") as f:
        f.seek(bad)
        b = f.read(1)
        f.seek(bad)
        f.write(bytes([b[0] ^ 0x40]))
    node.start()
    # The healthy resource is served; the damaged one is not, and says why.
    node.wait_value("resource-ok/actual-a/is-attached", "1")
    msg = wait_until(lambda: node.tree_value("resource-r/actual-a/msg-err-attach"), 15, "the damage report")
    assert "log-000000001-a" in msg and f"offset {recs[1].offset}" in msg and "payload digest" in msg
    assert "holds the state before that record" in msg
    assert node.tree_value("resource-r/actual-a/is-attached") == "0"
    assert node.tree_value("resource-r/actual-a/replay-code").startswith("-1,payload-digest,")
    assert run(["nbdinfo", node.uri("r")], check=False).returncode != 0
    assert node.proc.poll() is None
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x44 0 64k", node.uri("ok")])
    # marsadm attach repeats the reason instead of hanging.
    r = node.marsadm("attach", "r", check=False)
    assert r.returncode == 1 and "payload digest" in r.stderr and "log-truncate" in r.stderr
    # log-truncate refuses without --force and says what would be lost.
    r = node.marsadm("log-truncate", "r", check=False)
    assert r.returncode == 1 and "loses" in r.stderr and "--force" in r.stderr
    node.marsadm("log-truncate", "r", "--force")
    node.wait_value("resource-r/actual-a/is-attached", "1")
    # The first write survived; the damaged one and the one after it are gone, set aside on disk.
    _write(node, "r", "read -P 0x01 0 64k")
    assert log.stat().st_size == recs[1].offset
    kept = list((node.mars_dir / "resource-r").glob("damaged-*/*"))
    assert kept and kept[0].stat().st_size > 0
    assert "Traceback" not in node.log()


def test_flipped_byte_before_replay_position_is_reported_too(node):
    log = _two_resources(node)
    recs = _records(log)
    assert node.stop() == 0  # orderly: device synced, replay position at the end
    with open(log, "r+b") as f:
        f.seek(recs[0].offset + 20)  # a header field of the first record
        b = f.read(1)
        f.seek(recs[0].offset + 20)
        f.write(bytes([b[0] ^ 1]))
    node.start()
    msg = wait_until(lambda: node.tree_value("resource-r/actual-a/msg-err-attach"), 15, "the damage report")
    assert f"offset {recs[0].offset}" in msg and "already holds every write" in msg
    node.wait_value("resource-ok/actual-a/is-attached", "1")
    assert node.proc.poll() is None


def test_truncated_tail_is_cut_and_reported(node):
    log = _two_resources(node)
    recs = _records(log)
    node.kill()
    cut_at = recs[2].offset + 1000  # in the middle of the last record
    os.truncate(log, cut_at)
    node.start()
    node.wait_value("resource-r/actual-a/is-attached", "1")
    warn = node.tree_value("resource-r/actual-a/msg-warn-torn-tail")
    assert warn and "log-000000001-a" in warn and f"offset {recs[2].offset}" in warn
    assert "torn tail" in node.log() and f"offset {recs[2].offset}" in node.log()
    assert log.stat().st_size == recs[2].offset
    _write(node, "r", "read -P 0x01 0 64k", "read -P 0x02 64k 64k")
    # Appends continue cleanly after the cut.
    _write(node, "r", "write -P 0x07 1M 4k")
    node.restart()
    node.wait_value("resource-r/actual-a/is-attached", "1")
    _write(node, "r", "read -P 0x07 1M 4k")
    assert len(_records(log)) == 3
