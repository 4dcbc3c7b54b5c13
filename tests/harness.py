"""Real marsd processes for integration tests: start, kill, restart, run marsadm, wait on conditions.

Paths are kept short on purpose: unix socket paths (``<mars-dir>/nbd.sock``) must fit in 108 bytes,
which pytest's nested tmp_path names can exceed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
DEBIAN_PY = "/usr/bin/python3"


def wait_until(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition", interval: float = 0.02):
    """Poll ``cond`` until it returns a truthy value or the deadline passes (then fail naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # poll


def events_until(conn, terminal: tuple[type, ...]) -> list:
    """Every event a sans-I/O core yields from its buffered bytes, up to NEED_DATA or the first
    event of a ``terminal`` type (inclusive): the NBD, peer and log cores are all driven so."""
    from mars.engine.sansio import NEED_DATA
    events = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
        if isinstance(ev, terminal):
            return events


class Node:
    """One MARS node: its tree under ``base/<host>``, its marsd process, its marsadm."""

    def __init__(self, base: Path, host: str = "a", ip: str = "127.0.0.2", port: int | None = None,
                 bin_dir: Path = BIN, netns: str | None = None) -> None:
        self.base = base
        # The network namespace marsd and marsadm run in (tests/faults/netns.py), None: the
        # machine's own. The control and NBD sockets are files, reached from anywhere.
        self.netns = netns
        self.bin = bin_dir  # where marsd and marsadm are: the test venv's, or a fresh install's
        self.host = host
        self.ip = ip
        # One peer port per test directory: nodes of one cluster share it (as they share 7777 in
        # production), and test runs that happen side by side on one machine do not collide.
        self.port = port if port is not None else cluster_port(base)
        self.mars_dir = base / host
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = base / f"marsd-{host}.log"
        self.extra_args: list[str] = []

    @property
    def nbd_sock(self) -> Path:
        return self.mars_dir / "nbd.sock"

    def in_netns(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def uri(self, res: str) -> str:
        return f"nbd+unix:///{res}?socket={self.nbd_sock}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MARS_DIR", None)
        return env

    def marsadm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / "marsadm"), "--mars-dir", str(self.mars_dir), "--host", self.host, *args]
        r = subprocess.run(self.in_netns(cmd), capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and r.returncode != 0:
            raise AssertionError(f"marsadm {' '.join(args)} failed ({r.returncode}):\n{r.stderr}{r.stdout}\n"
                                 f"--- marsd log ---\n{self.log()}")
        return r

    def create_cluster(self) -> None:
        self.marsadm("--ip", self.ip, "create-cluster")

    def join_cluster(self, other: "Node") -> None:
        """Join ``other``'s cluster with the credential it exports (other's marsd must run)."""
        secret = self.base / f"secret-{self.host}.pem"
        secret.write_text(other.marsadm("export-secret").stdout)
        os.chmod(secret, 0o600)
        self.marsadm("--ip", self.ip, "join-cluster", f"{other.ip}:{other.port}", "--secret-file", str(secret))

    def start(self, *extra: str) -> None:
        assert self.proc is None or self.proc.poll() is not None, "marsd already running"
        args = [str(self.bin / "marsd"), "--mars-dir", str(self.mars_dir), "--host", self.host,
                "--port", str(self.port), "--interval", "0.2", *self.extra_args, *extra]
        # A killed marsd leaves its socket behind; its presence must mean the new one listens.
        self.nbd_sock.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        # ip netns exec execs marsd in place: proc is marsd itself, for kill() and stop().
        self.proc = subprocess.Popen(self.in_netns(args), stdout=self._log, stderr=subprocess.STDOUT, env=self.env(),
                                     start_new_session=True)
        wait_until(lambda: self.nbd_sock.exists() or self.proc.poll() is not None, 30, f"marsd {self.host} to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"marsd {self.host} exited with {self.proc.returncode}:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> int:
        """SIGTERM: the orderly case; returns the exit code."""
        code = 0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(60)
        self.proc = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def tree_value(self, rel: str) -> str | None:
        try:
            v = os.readlink(self.mars_dir / rel)
        except (FileNotFoundError, OSError):
            return None
        return None if v == ".deleted" else v

    def wait_value(self, rel: str, value: str, timeout: float = 30) -> None:
        wait_until(lambda: self.tree_value(rel) == value, timeout, f"{rel} == {value} on {self.host}")


def start_pair(base: Path, nodes: list[Node], size: str, a_args: tuple[str, ...] = ()) -> tuple[Node, Node]:
    """a (127.0.0.2) primary of resource r on a sparse image, b (127.0.0.3) joined to it."""
    a, b = Node(base, "a", "127.0.0.2"), Node(base, "b", "127.0.0.3")
    nodes.extend([a, b])
    a.extra_args = list(a_args)
    a.create_cluster()
    a.start()
    b.join_cluster(a)
    b.start()
    a.marsadm("create-resource", "r", str(a.base / "a.img"), size)
    wait_until(lambda: b.tree_value("resource-r/size") is not None, 20, "b to learn r")
    b.marsadm("join-resource", "r", str(b.base / "b.img"), "--create")
    return a, b


def log_end(primary: Node, res: str) -> str:
    """Where the primary's log ends now, as a replay position: log-N-<host>,<size>,0.

    Not the primary's own replay-<host>, which trails its log by up to a checkpoint interval.
    """
    d = primary.mars_dir / f"resource-{res}"
    newest = max(p for p in d.glob(f"log-*-{primary.host}"))
    return f"{newest.name},{newest.stat().st_size},0"


def caught_up(primary: Node, sec: Node, res: str) -> bool:
    want = log_end(primary, res)
    return (sec.tree_value(f"resource-{res}/syncstatus-{sec.host}") == primary.tree_value(f"resource-{res}/size")
            and sec.tree_value(f"resource-{res}/replay-{sec.host}") == want)


def write(node: Node, *cmds: str, res: str = "r") -> None:
    """qemu-io commands (e.g. ``write -P 0x11 0 1M``) against ``node``'s export of ``res``."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    run(args + [node.uri(res)])


def sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB pieces (images are up to GiBs)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def cluster_port(base: Path) -> int:
    """A free TCP port, the same for every node created under ``base``."""
    f = base / ".port"
    try:
        return int(f.read_text())
    except (FileNotFoundError, ValueError):
        pass
    port = free_port()
    f.write_text(str(port))
    return port


#: Ports the tests listen on: below the kernel's ephemeral range (32768-60999 here), from which
#: every outgoing connection takes its source port. A port the kernel handed out by bind(0) was
#: once taken by another test's connection before the marsd meant for it could listen.
TEST_PORTS = range(20000, 32000)


def free_port(ip: str = "0.0.0.0") -> int:
    """A port nothing listens on at ``ip`` (every address by default), outside the ephemeral range."""
    import random
    import socket
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(TEST_PORTS)
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {TEST_PORTS} on {ip}")


def short_tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="mars-", dir="/tmp"))


def cleanup(base: Path, nodes: list[Node]) -> None:
    for n in nodes:
        n.kill()
    shutil.rmtree(base, ignore_errors=True)


def run(cmd: list[str], timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
    return r


def start_cluster(base: Path, nodes: list[Node], hosts: str = "ab", net=None) -> list[Node]:
    """Nodes a, b, c... on 127.0.0.2, .3, .4...: the first creates the cluster, the others join it.

    With ``net`` (a tests/faults/netns.Net) each node gets a network namespace of its own and
    the address ``net.add(host)`` gives it instead."""
    if net is None:
        made = [Node(base, h, f"127.0.0.{2 + i}") for i, h in enumerate(hosts)]
    else:
        made = [Node(base, h, addr, netns=ns) for h in hosts for addr, ns in [net.add(h)]]
    nodes.extend(made)
    made[0].create_cluster()
    made[0].start()
    for n in made[1:]:
        n.join_cluster(made[0])
        n.start()
    return made


class Partition:
    """iptables rules that drop everything between two loopback addresses, both ways."""

    def __init__(self) -> None:
        self.rules: list[list[str]] = []

    def cut(self, x: Node, y: Node) -> None:
        for s, d in ((x.ip, y.ip), (y.ip, x.ip)):
            rule = ["INPUT", "-s", s, "-d", d, "-j", "DROP"]
            run(["iptables", "-I", *rule])
            self.rules.append(rule)

    def heal(self) -> None:
        while self.rules:
            run(["iptables", "-D", *self.rules.pop()], check=False)


@contextlib.contextmanager
def three_members(size: str, image: Callable[[Node], Path],
                  synced: Callable[[Node, Node, Node], bool]) -> Iterator[tuple[Node, Node, Node, Partition]]:
    """a primary of resource r (``size``), b and c secondaries, until ``synced``; at the end the
    iptables rules go, every process stops, and no marsd log may hold a traceback."""
    base = short_tempdir()
    nodes: list[Node] = []
    part = Partition()
    try:
        a, b, c = start_cluster(base, nodes, "abc")
        a.marsadm("create-resource", "r", str(image(a)), size)
        for n in (b, c):
            wait_until(lambda n=n: n.tree_value("resource-r/size") is not None, 20, f"{n.host} to learn r")
            n.marsadm("join-resource", "r", str(image(n)), "--create")
        wait_until(lambda: synced(a, b, c), 60, "b and c to sync")
        yield a, b, c, part
    finally:
        part.heal()
        logs = {n.host: n.log() for n in nodes if n.proc is not None}
        cleanup(base, nodes)
    for host, text in logs.items():
        assert "Traceback" not in text, f"marsd {host}:\n{text}"
