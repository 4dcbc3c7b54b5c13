from __future__ import annotations

import ctypes
import os
import subprocess

import pytest

from harness import Node, caught_up, cleanup, run, short_tempdir, start_cluster, wait_until, write

TRIO_SIZE = "32M"

CLONE_NEWNET = 0x40000000


_HOST_NET: int | None = None  # the network namespace pytest started in, kept open by a worker


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns: {os.strerror(ctypes.get_errno())}")


def pytest_configure(config) -> None:
    """Each pytest-xdist worker (`make test` runs two) gets a network namespace of its own.

    Every test puts its nodes on the same loopback addresses (127.0.0.2, .3, ...), cuts links with
    iptables rules on them, and starts its servers (Prometheus, Zabbix) on fixed ports. In its own
    namespace a worker has its own loopback, its own iptables tables and its own ports, so the
    tests of two workers can never cut or answer each other's clusters; unix sockets, files, mounts
    and loop devices are shared as before. The worker's processes (marsd, servers) inherit it.
    A test that needs the machine's network (pip fetching dependencies) is marked host_network.
    """
    global _HOST_NET
    config.addinivalue_line("markers", "host_network: runs in the machine's network namespace (pip needs "
                                       "the package index), also under pytest -n")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    _HOST_NET = os.open("/proc/self/ns/net", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise pytest.UsageError(f"pytest -n needs a network namespace per worker (root): "
                                f"unshare: {os.strerror(ctypes.get_errno())}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


@pytest.fixture(autouse=True)
def _network_namespace(request):
    """A host_network test runs (and starts its processes) in the namespace pytest started in."""
    if _HOST_NET is None or request.node.get_closest_marker("host_network") is None:
        yield
        return
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    _setns(_HOST_NET)
    try:
        yield
    finally:
        _setns(own)
        os.close(own)


@pytest.fixture
def workdir():
    base = short_tempdir()
    nodes: list[Node] = []
    yield base, nodes
    cleanup(base, nodes)


@pytest.fixture
def node(workdir):
    """A one-node cluster with marsd running and no resource yet."""
    base, nodes = workdir
    n = Node(base, "a", "127.0.0.2")
    nodes.append(n)
    n.create_cluster()
    n.start()
    return n


@pytest.fixture
def resource(node):
    """Node ``a`` serving resource ``r`` on a fresh 64 MiB sparse image."""
    img = node.base / "r.img"
    node.marsadm("create-resource", "r", str(img), "64M")
    return node, "r", img


@pytest.fixture
def trio(workdir):
    """Three nodes on 127.0.0.2-4: a primary of resource r (32 MiB, rotating at 2 MiB), b and c
    secondaries, 1 MiB written and both caught up."""
    base, nodes = workdir
    a, b, c = start_cluster(base, nodes, "abc")
    for n in (a, b, c):
        run(["truncate", "-s", TRIO_SIZE, str(base / f"{n.host}.img")])
    a.stop()
    a.extra_args = ["--logrot-auto", "2M"]
    a.start()
    a.marsadm("create-resource", "r", str(base / "a.img"), TRIO_SIZE)
    for n in (b, c):
        wait_until(lambda: n.tree_value("resource-r/size") is not None, 20, f"{n.host} to learn r")
        n.marsadm("join-resource", "r", str(base / f"{n.host}.img"), "--create")
    write(a, "write -P 0x11 0 1M")
    for n in (b, c):
        wait_until(lambda: caught_up(a, n, "r"), 30, f"{n.host} to catch up")
    return a, b, c


@pytest.fixture
def sparse_8t(workdir):
    """Three nodes; a is primary of resource r on an 8 TiB sparse image, b has one too and knows r
    but has not joined: its join syncs for seconds (holes are skipped), long enough to watch."""
    base, nodes = workdir
    a, b, c = start_cluster(base, nodes, "abc")
    for n in (a, b):
        run(["truncate", "-s", "8T", str(base / f"{n.host}.img")])
    a.marsadm("create-resource", "r", str(base / "a.img"), "8T")
    wait_until(lambda: b.tree_value("resource-r/size") is not None, 20, "b to learn r")
    return a, b, c
