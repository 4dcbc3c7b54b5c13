"""Three real marsd processes on 127.0.0.2-4: join, fast full sync, fetch and replay until identical."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess

import pytest

from harness import Node, caught_up, run, start_cluster, wait_until
from harness import sha256 as sha

SIZE = 64 << 20


@pytest.fixture
def cluster(workdir):
    return start_cluster(*workdir, "abc")


def test_join_cluster_shares_the_tree(cluster):
    a, b, c = cluster
    for n in (a, b, c):
        for other in (a, b, c):
            wait_until(lambda: n.tree_value(f"ips/ip-{other.host}") == other.ip, 20,
                       f"{n.host} to know {other.host}'s address")
        assert n.tree_value("uuid") == a.tree_value("uuid")
    # Liveness of every node is visible everywhere.
    wait_until(lambda: c.tree_value("actual-b/alive") == "1", 20, "c to see b alive")


def test_a_tree_larger_than_one_frame_is_exchanged(cluster):
    """A listing over the 4 MiB frame limit arrives whole, in several frames."""
    from mars.engine.peer import protocol as P
    from mars.engine.tree import Tree
    a, b, _ = cluster
    t = Tree(a.mars_dir, "a")
    n, value = 2500, "x" * 2000  # ~5 MiB of entries
    for i in range(n):
        t.set(f"defaults-a/bulk-{i:05d}", f"{i}-{value}", durable=False)
    assert sum(len(e.value) for e in t.walk(("defaults-a/",))) > P.MAX_META

    def missing() -> list[int]:
        return [i for i in range(n) if b.tree_value(f"defaults-a/bulk-{i:05d}") != f"{i}-{value}"]
    wait_until(lambda: not missing(), 60, "b to get every entry")
    assert b.tree_value("actual-b/msg-peer-a") is None  # the exchange with a reports no error


@pytest.mark.slow
def test_three_nodes_converge_while_writing(cluster):
    """1 GiB of random data written through NBD on a while b and c join; all three end identical."""
    a, b, c = cluster
    size = 1 << 30
    a.marsadm("create-resource", "r", str(a.base / "a.img"), str(size))
    src = a.base / "src.img"
    with open(src, "wb") as f:
        for _ in range(size // (16 << 20)):
            f.write(os.urandom(16 << 20))
    load = subprocess.Popen(["nbdcopy", str(src), a.uri("r")], stderr=subprocess.PIPE)
    try:
        for n in (b, c):
            wait_until(lambda: n.tree_value("resource-r/size") == str(size), 20, f"{n.host} to learn resource r")
            n.marsadm("join-resource", "r", str(n.base / f"{n.host}.img"), "--create")
        assert load.wait(300) == 0, load.stderr.read()
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    a.marsadm("log-rotate", "r")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 50M 2M", "-c", "write -P 0x55 1M 1M", a.uri("r")])
    for n in (b, c):
        wait_until(lambda: caught_up(a, n, "r"), 240, f"{n.host} to catch up")
    want = sha(a.base / "a.img")
    for n in (b, c):
        assert sha(n.base / f"{n.host}.img") == want, f"{n.host} differs from the primary"


def test_a_host_without_the_credential_gets_nothing(cluster, tmp_path):
    a, b, c = cluster
    # Plain TCP: the TLS handshake never completes, no tree byte comes back.
    s = socket.create_connection((a.ip, a.port), timeout=5)
    s.sendall(b"\x00\x00\x00\x10" + b"\x02" + b"\x00\x00\x00\x02{}" + b"x" * 9)
    s.settimeout(5)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    assert b"ips/" not in got and b"uuid" not in got
    # TLS with a certificate of another cluster: refused at the handshake.
    other = Node(a.base, "x", "127.0.0.9")
    other.create_cluster()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(other.mars_dir / "cluster" / "node-x.pem", other.mars_dir / "cluster" / "node-x.key")
    raw = socket.create_connection((a.ip, a.port), timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        tls = ctx.wrap_socket(raw)
        tls.sendall(b"\x00" * 64)
        assert tls.recv(4096) == b""
        raise ConnectionResetError("closed without data")
    raw.close()
    # join-cluster with the wrong credential fails with a message, not a traceback.
    wrong = other.marsadm("export-secret").stdout
    (a.base / "wrong.pem").write_text(wrong)
    d = Node(a.base, "d", "127.0.0.5")
    r = d.marsadm("--ip", d.ip, "join-cluster", f"{a.ip}:{a.port}", "--secret-file", str(a.base / "wrong.pem"),
                  check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert d.tree_value("uuid") is None
