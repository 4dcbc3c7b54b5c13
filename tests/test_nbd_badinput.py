"""Bad NBD input over a real socket: an error reply or a closed connection, logged once; others go on."""

from __future__ import annotations

import os
import socket
import struct
import subprocess

import pytest

from harness import run, wait_until

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQ = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
EINVAL, ENOSPC = 22, 28


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _closed(s: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset) within the deadline."""
    s.settimeout(10)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def connect(node, name="r") -> socket.socket:
    """Fixed newstyle handshake by hand, ending with OPT_EXPORT_NAME (NO_ZEROES)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(node.nbd_sock))
    magic, opt, flags = struct.unpack(">QQH", _recv_exact(s, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags & 1
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", IHAVEOPT, 1, len(name)) + name.encode())
    size, tflags = struct.unpack(">QH", _recv_exact(s, 10))
    assert size == 64 << 20
    return s


def reply(s: socket.socket) -> tuple[int, int]:
    magic, err, handle = struct.unpack(">IIQ", _recv_exact(s, 16))
    assert magic == 0x67446698
    return err, handle


@pytest.fixture
def served(resource):
    node, res, img = resource
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64k", node.uri(res)])
    return node


def _healthy(node):
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 64k", node.uri("r")])


def test_garbage_before_handshake(served):
    node = served
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(node.nbd_sock))
    _recv_exact(s, 18)
    s.sendall(os.urandom(64) + b"GET / HTTP/1.1\r\n\r\n")
    assert _closed(s)
    s.close()
    _healthy(node)
    assert node.proc.poll() is None


def test_garbage_in_transmission_closes_only_that_client(served):
    node = served
    other = connect(node)
    bad = connect(node)
    bad.sendall(b"\xde\xad\xbe\xef" * 16)
    assert _closed(bad)
    bad.close()
    wait_until(lambda: node.log().count("bad request magic") + node.log().count("magic") >= 1, 10, "the log line")
    # The other connection is still served.
    other.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_READ, 7, 0, 16))
    assert reply(other) == (0, 7)
    assert _recv_exact(other, 16) == b"\x3c" * 16
    other.close()
    lines = [l for l in node.log().splitlines() if "closing that connection" in l]
    assert len(lines) == 1, lines  # logged once, not once per byte


def test_requests_beyond_the_end_get_errors_and_the_connection_goes_on(served):
    node = served
    s = connect(node)
    end = 64 << 20
    s.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_READ, 1, end - 512, 4096))
    assert reply(s) == (EINVAL, 1)
    s.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_WRITE, 2, end, 4096) + b"z" * 4096)
    assert reply(s) == (ENOSPC, 2)
    s.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_READ, 3, 0, 64 << 20))  # oversized read: EINVAL, not served
    assert reply(s) == (EINVAL, 3)
    s.sendall(REQ.pack(REQUEST_MAGIC, 0, 99, 4, 0, 0))  # unknown command
    assert reply(s) == (EINVAL, 4)
    s.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_READ, 5, 0, 4))
    assert reply(s) == (0, 5) and _recv_exact(s, 4) == b"\x3c" * 4
    s.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_DISC, 6, 0, 0))
    assert _closed(s)
    s.close()
    # Nothing of the refused write reached the log: the image's last 4 KiB is still a hole.
    _healthy(node)


def test_oversized_write_closes_the_connection(served):
    node = served
    s = connect(node)
    s.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 64 << 20))
    assert _closed(s)
    s.close()
    _healthy(node)


def test_client_disconnecting_mid_request_loses_nothing_acknowledged(served):
    node = served
    log = node.mars_dir / "resource-r" / "log-000000001-a"
    before = log.stat().st_size
    s = connect(node)
    s.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 1 << 20) + b"\x99" * (300 << 10))
    s.close()
    # A half-received write is never logged nor applied.
    _healthy(node)
    assert log.stat().st_size == before
    # Many clients vanishing at once do not disturb marsd either.
    socks = [connect(node) for _ in range(20)]
    for i, c in enumerate(socks):
        c.sendall(REQ.pack(REQUEST_MAGIC, 0, CMD_READ, i, 0, 1 << 20)[: 10 + i])
        c.close()
    _healthy(node)
    assert node.proc.poll() is None
    assert "Traceback" not in node.log()


def test_unknown_export_name_is_refused(served):
    node = served
    r = subprocess.run(["nbdinfo", f"nbd+unix:///nope?socket={node.nbd_sock}"], capture_output=True, text=True)
    assert r.returncode != 0
    _healthy(node)
