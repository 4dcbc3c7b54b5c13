"""marsd's log: --log-file (and logrotate), --syslog, and one line for a message that repeats.

The repeat filter is tested as a unit (records in, lines out) and in a real two-node cluster,
where a killed primary used to make the secondary write the same warning every second.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time

import pytest
from harness import Node, caught_up, start_pair, wait_until
from mars.engine.daemon import logs
from mars.engine.daemon.bus import Bus
from mars.engine.errors import MarsError
from mars.engine.model.client import live_snapshot

FETCH_FAILS = "resource r: fetch from a: cannot reach peer"


class Lines(logging.Handler):
    """Keeps each formatted line, as a file would."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def collapsed():
    """A logger whose one handler collapses repeats (flushing after 0.2 s), and that handler."""
    logger = logging.getLogger("mars.test-repeats")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    h = Lines()
    logs.collapse_repeats(h, flush_after_s=0.2)
    logger.addHandler(h)
    yield logger, h
    logs.flush_repeats(h)
    logger.removeHandler(h)


def test_identical_records_become_one_line_and_a_count(collapsed):
    logger, h = collapsed
    for _ in range(10):
        logger.warning("peer %s down", "a")
    assert h.lines == ["WARNING mars.test-repeats: peer a down"]
    logger.info("peer %s back", "a")
    assert h.lines == ["WARNING mars.test-repeats: peer a down",
                       "WARNING mars.test-repeats: last message repeated 9 times",
                       "INFO mars.test-repeats: peer a back"]


def test_same_text_at_another_level_or_logger_is_another_message(collapsed):
    logger, h = collapsed
    logger.warning("x")
    logger.error("x")
    logging.getLogger("mars.test-repeats.child").error("x")
    logger.warning("y")
    logger.warning("y")
    logger.warning("z")  # a single repeat is counted too
    assert h.lines == ["WARNING mars.test-repeats: x", "ERROR mars.test-repeats: x",
                       "ERROR mars.test-repeats.child: x", "WARNING mars.test-repeats: y",
                       "WARNING mars.test-repeats: last message repeated 1 times", "WARNING mars.test-repeats: z"]


def test_debug_lines_are_never_collapsed_but_end_a_run(collapsed):
    logger, h = collapsed
    logger.warning("down")
    logger.warning("down")
    for _ in range(3):
        logger.debug("control: snapshot for pid 7")
    logger.warning("down")
    assert h.lines == ["WARNING mars.test-repeats: down", "WARNING mars.test-repeats: last message repeated 1 times"] + [
        "DEBUG mars.test-repeats: control: snapshot for pid 7"] * 3 + ["WARNING mars.test-repeats: down"]


def test_a_long_run_of_repeats_is_counted_at_the_latest_after_the_flush_interval(collapsed):
    logger, h = collapsed
    for _ in range(3):
        logger.warning("still down")
    wait_until(lambda: len(h.lines) == 2, 10, "the timed flush")
    assert h.lines[1] == "WARNING mars.test-repeats: last message repeated 2 times"
    # The run goes on: still no second copy of the message, only the next count.
    for _ in range(4):
        logger.warning("still down")
    wait_until(lambda: len(h.lines) == 3, 10, "the second timed flush")
    assert h.lines == ["WARNING mars.test-repeats: still down",
                       "WARNING mars.test-repeats: last message repeated 2 times",
                       "WARNING mars.test-repeats: last message repeated 4 times"]


def test_the_bus_lines_collapse_repeats_too():
    bus = Bus()
    logger = logging.getLogger("mars.test-bus-repeats")
    logger.setLevel(logging.INFO)
    bus.attach_logging(logger)
    try:
        for _ in range(5):
            logger.warning("fetch failed")
        logger.info("fetch resumed")
    finally:
        bus.detach_logging()
    lines = [ln.split(" ", 2)[2] for ln in bus.recent_lines()]  # without the time stamp
    assert lines == ["WARNING mars.test-bus-repeats: fetch failed",
                     "WARNING mars.test-bus-repeats: last message repeated 4 times",
                     "INFO mars.test-bus-repeats: fetch resumed"]


def test_syslog_handler_sends_ident_marsd_facility_daemon(tmp_path):
    """The handler as --syslog makes it, against a real datagram socket in place of /dev/log."""
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(10)
        h = logs.syslog_handler(path)
        try:
            h.handle(logging.makeLogRecord({"name": "mars.marsd", "levelno": logging.WARNING,
                                            "levelname": "WARNING", "msg": "peer %s down", "args": ("a",)}))
            data = s.recv(4096).decode()
        finally:
            h.close()
    # <28> = facility daemon (3) * 8 + warning (4)
    assert data.rstrip("\x00") == f"<28>marsd[{os.getpid()}]: WARNING peer a down"
    with pytest.raises(MarsError, match=r"/nonexistent/log does not exist; start the system's syslog daemon"):
        logs.syslog_handler("/nonexistent/log")


def test_log_file_is_written_and_reopened_after_logrotate(workdir):
    base, nodes = workdir
    n = Node(base, "a", "127.0.0.2")
    nodes.append(n)
    n.create_cluster()
    path = base / "marsd.log"
    n.extra_args = ["--log-file", str(path)]
    n.start()
    wait_until(lambda: path.exists() and "marsd 0.1.0 on host a started" in path.read_text(), 20, "the start line")
    assert "started" not in n.log()  # stderr has no log lines

    # logrotate's default: move the file away; the next line goes to a new file at the path.
    os.rename(path, base / "marsd.log.1")
    n.marsadm("create-resource", "r", str(base / "r.img"), "64M")
    wait_until(lambda: path.exists() and "resource r: attached" in path.read_text(), 20, "a line in the new file")
    assert "resource r: attached" not in (base / "marsd.log.1").read_text()

    # With a postrotate SIGHUP: marsd lives on and reopens the path.
    os.rename(path, base / "marsd.log.2")
    n.proc.send_signal(signal.SIGHUP)
    n.marsadm("detach", "r")
    wait_until(lambda: path.exists() and "resource r: detached" in path.read_text(), 20, "a line after SIGHUP")
    assert n.proc.poll() is None
    assert n.stop() == 0
    assert "marsd on host a stopped" in path.read_text()


def test_syslog_option(workdir):
    base, nodes = workdir
    n = Node(base, "a", "127.0.0.2")
    nodes.append(n)
    n.create_cluster()
    if os.path.exists("/dev/log"):
        n.start("--syslog")
        assert "started" not in n.log()  # the lines went to syslog
        assert n.stop() == 0
        return
    r = subprocess.run([str(n.bin / "marsd"), "--mars-dir", str(n.mars_dir), "--host", "a", "--syslog"],
                       capture_output=True, text=True, timeout=60, env=n.env())
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["marsd: cannot log to syslog: /dev/log does not exist; start the "
                                             "system's syslog daemon (rsyslog or systemd-journald), or use "
                                             "--log-file PATH instead"]


def test_a_dead_primary_is_one_warning_and_a_count_not_one_line_per_second(workdir):
    base, nodes = workdir
    a, b = start_pair(base, nodes, "32M")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    a.kill()
    killed = time.time()
    wait_until(lambda: FETCH_FAILS in b.log(), 20, "b to log the failed fetch")
    # The fetcher retries every second; let b's own clock run 4 s past the kill (its rounds
    # publish their time), so several retries have failed.
    wait_until(lambda: float(b.tree_value("actual-b/time") or 0) > killed + 4.5, 30, "b's rounds 4.5 s on")
    snap, answered = live_snapshot(b.mars_dir, "b")  # what mars-status --debug shows
    assert answered and sum(FETCH_FAILS in ln for ln in snap.debug_lines) == 1, snap.debug_lines
    assert b.stop() == 0  # its last line is a different message: the count is written before it

    lines = b.log().splitlines()
    fails = [i for i, ln in enumerate(lines) if FETCH_FAILS in ln]
    assert len(fails) == 1, "\n".join(lines)
    count = lines[fails[0] + 1]  # right after it: nothing else was logged meanwhile
    assert "WARNING last message repeated " in count, "\n".join(lines)
    assert int(count.split("last message repeated ")[1].split()[0]) >= 3, "\n".join(lines)
    assert "marsd on host b stopped" in lines[-1]
