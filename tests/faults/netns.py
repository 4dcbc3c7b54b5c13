"""A private network for a test cluster: one network namespace per node, a switch between them.

Why not iptables on loopback in the root namespace (harness.Partition): there every node shares
one stack, one routing table and one set of rules with the machine and with the other tests
that run beside it; a rule that matches too much cuts someone else's cluster, and links made
from 127.0.0.1 do not even carry the node's address. Here each node has a stack of its own,
like a host on a LAN: its marsd runs under ``ip netns exec``, it has one interface (``eth0``,
an address in 198.18.0.0/24, the RFC 2544 benchmark range that routes nowhere) whose other end
is a port of a bridge in a "switch" namespace, so the root namespace gets no interface, no
route and no rule. Two kinds of fault:

* :meth:`Net.cut`: iptables DROP, in one node's namespace, of every packet to and from one
  peer. Nothing answers, nothing is refused: connections time out, as across a broken WAN.
* :meth:`Net.link`: the node's switch port down, the node cut off from all (a pulled cable at
  the far end: its own interface keeps its address and route, and its packets go nowhere).

The control and NBD sockets are unix sockets in the file system, so marsadm's local commands
and the tests' NBD clients reach every node from the root namespace.

Names carry the test process's pid and a counter (``marsnet-<pid>-<n>-<host>``), so runs side by
side never meet, and a run that was killed leaves namespaces that the next run removes (their
pid is gone). :meth:`Net.close` removes the namespaces, and with them every veth, the bridge and
every rule in them; it runs on every way out of :func:`network`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Iterator

PREFIX = "marsnet-"
SUBNET = "198.18.0"
_runs = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def namespaces() -> list[str]:
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove the namespaces of earlier runs whose process is gone (a run killed by a timeout or
    SIGKILL had no chance to); another live run's are left alone."""
    gone = []
    for ns in namespaces():
        if not ns.startswith(PREFIX):
            continue
        pid = ns[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            ip("netns", "del", ns, check=False)
            gone.append(ns)
    return gone


class Net:
    """A switch namespace with a bridge, and a namespace per node plugged into it by a veth pair."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{next(_runs)}"
        self.switch = f"{self.tag}-sw"
        self.made: list[str] = []  # namespaces, in the order made (removed in reverse)
        self.hosts: dict[str, tuple[str, str]] = {}  # host -> (namespace, address)
        self.rules: list[tuple[str, list[str]]] = []  # (namespace, iptables rule) in force
        self.down: set[str] = set()  # hosts whose switch port is down
        try:
            self._add_ns(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def add(self, host: str) -> tuple[str, str]:
        """A namespace for ``host``, plugged into the switch; its (address, namespace)."""
        assert host not in self.hosts, host
        ns = f"{self.tag}-{host}"
        addr = f"{SUBNET}.{2 + len(self.hosts)}"
        self._add_ns(ns)  # first: close() removes it whatever fails below
        port = f"p-{host}"[:15]
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[host] = (ns, addr)
        return addr, ns

    def ns(self, host: str) -> str:
        return self.hosts[host][0]

    def addr(self, host: str) -> str:
        return self.hosts[host][1]

    def exec(self, host: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["ip", "netns", "exec", self.ns(host), *cmd], capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in {host}'s namespace failed ({r.returncode}): {r.stderr}")
        return r

    # -- faults ------------------------------------------------------------------------------------

    def cut(self, x: str, y: str) -> None:
        """Drop everything between ``x`` and ``y``, both ways, in ``x``'s namespace."""
        peer = self.addr(y)
        for rule in (["INPUT", "-s", peer, "-j", "DROP"], ["OUTPUT", "-d", peer, "-j", "DROP"]):
            self.exec(x, "iptables", "-w", "-I", *rule)
            self.rules.append((x, rule))

    def link(self, host: str, up: bool) -> None:
        """``host``'s port on the switch up or down: down, it reaches nobody and nobody reaches it."""
        ip("-n", self.switch, "link", "set", f"p-{host}"[:15], "up" if up else "down")
        (self.down.discard if up else self.down.add)(host)

    def heal(self) -> None:
        """Every cut and every port back: the network as it was made."""
        while self.rules:
            host, rule = self.rules.pop()
            self.exec(host, "iptables", "-w", "-D", *rule)
        for host in sorted(self.down):
            self.link(host, True)

    def rules_in_force(self, host: str) -> list[str]:
        """``host``'s DROP rules as iptables lists them (to check that a heal removed them)."""
        out = self.exec(host, "iptables", "-w", "-S").stdout
        return [line for line in out.splitlines() if "DROP" in line]

    def close(self) -> None:
        """Remove every namespace made (with them go the veths, the bridge and the rules).

        The processes in them must be gone first (a namespace lives as long as one of its
        processes); ``ip netns del`` fails on none of it, so every namespace is tried.
        """
        self.rules.clear()
        while self.made:
            ip("netns", "del", self.made.pop(), check=False)


@contextlib.contextmanager
def network() -> Iterator[Net]:
    """A :class:`Net`, removed on the way out however it is left. Stop the nodes' processes
    before leaving (the fixture that starts them does, in its own ``finally``)."""
    sweep_stale()
    net = Net()
    try:
        yield net
    finally:
        net.close()
