"""mars-zabbix on real nodes: what the Zabbix agent and the cron job get from a running cluster.

On the ``trio`` fixture (a primary of r, b and c secondaries, caught up): the discoveries give
the right macros, ``value`` says what ``marsadm view-<macro>`` says on the same node, ``status``
is one JSON document whose findings are ``marsadm view --json``'s, and it keeps answering when
marsd is dead (marsd_up 0, MARSD_DOWN; NODE_DOWN for a dead peer) and when there is no state
at all (ok 0 with the reason, never a traceback, never a word on stderr: the agent would mix it
into the value). ``send`` is checked against a stand-in trapper that speaks zabbix_sender's
protocol, and for its failures: no zabbix_sender, a server that does not listen, one that
refuses the value. The agent side runs for real: zabbix_agentd -t as user zabbix, through the
shipped UserParameters and sudo rule (rewritten for this test's paths).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mars.exporters.zabbix as zx
import pytest
from harness import BIN, Node, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "zabbix-templates"
MZ = BIN / "mars-zabbix"


def mz(node: Node | Path, *args: str, env: dict[str, str] | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    mars_dir = node.mars_dir if isinstance(node, Node) else node
    e = dict(os.environ if env is None else env)
    e.pop("MARS_DIR", None)
    return subprocess.run([str(MZ), "--mars-dir", str(mars_dir), *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


def status(node: Node | Path, *args: str) -> dict:
    r = mz(node, *args, "status")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", "status must write nothing on stderr: the agent hands it to Zabbix with stdout"
    assert r.stdout.count("\n") == 1, "one line"
    return json.loads(r.stdout)


def view_findings(node: Node) -> list[dict]:
    doc = json.loads(node.marsadm("view", "--json").stdout)
    return [{"code": f["code"], "level": f["level"], "resource": f["res"], "host": f["node"], "text": f["text"],
             "remedy": f["remedy"]} for f in doc["findings"]]


# --- discovery, value, status on a live cluster ------------------------------------------------------

def test_discovery_gives_the_macros(trio):
    a, b, c = trio
    for n in trio:
        r = mz(n, "discovery", "resources")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [{"{#RESOURCE}": "r"}]
        assert json.loads(mz(n, "discovery", "members").stdout) == [{"{#RESOURCE}": "r", "{#HOST}": n.host}]
        peers = [{"{#PEER}": h} for h in "abc" if h != n.host]
        assert json.loads(mz(n, "discovery", "peers").stdout) == peers
    every = json.loads(mz(a, "--members", "all", "discovery", "members").stdout)
    assert every == [{"{#RESOURCE}": "r", "{#HOST}": h} for h in "abc"]


MEMBER_MACROS = ("sync-rest", "fetch-rest", "replay-rest", "work-rest", "sync-pos", "replay-pos", "sync-size",
                 "role", "diskstate", "replstate", "flags", "is-primary", "is-consistent", "todo-attach",
                 "device-opened")


def value_vs_view(n: Node) -> list[tuple[list[str], list[str]]]:
    """(mars-zabbix value args, marsadm args) pairs: each member macro, two resource keys, marsd-up."""
    pairs = [(["value", f"r/{n.host}/{m}"], [f"view-{m}", "r"]) for m in MEMBER_MACROS]
    pairs += [(["value", key], [f"view-{m}", "r"]) for key, m in (("r/resource-size", "resource-size"),
                                                                    ("r/get-primary", "get-primary"))]
    return pairs + [(["value", "marsd-up"], ["view-is-module-loaded"])]


def test_value_is_what_marsadm_view_says_on_that_node(trio):
    for n in trio:
        def same(n: Node = n) -> bool | list:
            def both(pair):
                mine = mz(n, *pair[0])
                assert mine.returncode == 0, mine.stderr
                return pair[0][1], mine.stdout.strip(), n.marsadm(*pair[1]).stdout.strip()
            # Two answers per key, each a process start: run them side by side (the test's cost).
            with ThreadPoolExecutor(4) as pool:
                diff = [d for d in pool.map(both, value_vs_view(n)) if d[1] != d[2]]
            return diff if diff else True
        # the tree moves a little (stamps, free space) between the two calls: agree within a deadline
        wait_until(lambda: same() is True, 30, f"mars-zabbix value and marsadm view to agree on {n.host}")
    a = trio[0]
    assert mz(a, "value", "r/a/role").stdout.strip() == "Primary"
    assert mz(a, "value", "r/b/replstate").stdout.strip() == "Replaying"  # any member this tree knows
    assert mz(a, "value", "b:alive").stdout.strip() == "1"


def test_value_refuses_what_it_does_not_know(trio):
    a = trio[0]
    r = mz(a, "value", "r/a/no-such-macro")
    assert r.returncode == 2 and "has no value 'no-such-macro'" in r.stderr and "replay-rest" in r.stderr
    assert "Traceback" not in r.stderr
    r = mz(a, "value", "r/x/role")
    assert r.returncode == 1 and "the members are: r/a, r/b, r/c" in r.stderr
    r = mz(a, "value", "nope/resource-size")
    assert r.returncode == 1 and "the resources are: r" in r.stderr
    r = mz(a, "value", "a/b/c/d")
    assert r.returncode == 2 and "r/b/replay-rest" in r.stderr


def test_status_is_the_document_and_its_findings_are_marsadm_views(trio):
    a, b, c = trio
    for n in trio:
        doc = status(n)
        assert doc["ok"] == 1 and doc["format"] == zx.FORMAT and doc["host"] == n.host
        assert doc["marsd_up"] == 1 and doc["node"]["marsd_up"] == 1
        assert doc["counts"]["nodes"] == 3 and doc["counts"]["nodes_alive"] == 3
        [m] = doc["members"]
        assert (m["resource"], m["host"]) == ("r", n.host)
        assert m["role"] == ("Primary" if n is a else "Secondary")
        assert m["sync_rest_bytes"] == 0 and m["replay_rest_bytes"] == 0 and isinstance(m["replay_lag_s"], int)
        assert m["disk_state"] == "UpToDate"

        def agree(n: Node = n) -> bool:
            return status(n)["findings"] == view_findings(n)
        wait_until(agree, 30, f"mars-zabbix status and marsadm view --json to agree on {n.host}")


def test_status_answers_with_marsd_dead(trio):
    a, b, c = trio
    b.kill()
    doc = wait_until(lambda: (d := status(a, "--window", "2")) and any(
        f["code"] == "NODE_DOWN" and f["host"] == "b" for f in d["findings"]) and d, 30, "a to see b down")
    assert doc["marsd_up"] == 1
    peer_b = next(p for p in doc["peers"] if p["peer"] == "b")
    assert peer_b["alive"] == 0 and peer_b["findings"]["NODE_DOWN"].startswith("node b ")
    assert "remedy: start marsd on b" in peer_b["findings"]["NODE_DOWN"]

    a.kill()
    doc = status(a)
    assert doc["ok"] == 1, "the tree is still there: the document says what it last knew"
    assert doc["marsd_up"] == 0 and doc["node"]["marsd_up"] == 0
    assert any(f["code"] == "MARSD_DOWN" and f["host"] == "a" for f in doc["findings"])
    assert "marsd is not running on a" in doc["node"]["findings"]["MARSD_DOWN"]
    assert doc["members"][0]["repl_state"] == "MarsdNotRunning"
    doc = wait_until(lambda: (d := status(a, "--window", "2")) and any(
        f["code"] == "NODE_DOWN" and f["host"] == "b" for f in d["findings"]) and d, 30, "b down, seen from dead a")
    assert any(f["code"] == "MARSD_DOWN" for f in doc["findings"])


def test_an_unreadable_state_is_a_document_with_the_reason(tmp_path):
    for where, said in ((tmp_path / "nothing", "does not exist"), (tmp_path, "holds no cluster")):
        doc = status(where)
        assert doc["ok"] == 0 and said in doc["error"] and "; " in doc["error"], doc  # what, then the remedy
        assert "resources" not in doc and "members" not in doc, "no arrays: the discoveries must fail, not find none"
    r = mz(tmp_path / "nothing", "value", "marsd-up")
    assert r.returncode == 1 and r.stderr.startswith("mars-zabbix: ") and "create-cluster" in r.stderr
    assert "Traceback" not in r.stderr
    r = mz(tmp_path, "--window", "-1", "status")
    assert r.returncode == 0 and json.loads(r.stdout)["error"].startswith("--window -1 is not a positive")


# --- send: zabbix_sender to a trapper --------------------------------------------------------------

class Trapper:
    """A stand-in Zabbix trapper: zabbix_sender's protocol (ZBXD header, JSON), taking every
    value or refusing every one, as a server does for a host or item it does not know."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.received: list[dict] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("short read")
            buf += chunk
        return buf

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = self._recv(conn, 5)
                assert head[:4] == b"ZBXD", head
                flags = head[4]
                size = 8 if flags & 0x04 else 4
                length, reserved = struct.unpack("<QQ" if size == 8 else "<II", self._recv(conn, 2 * size))
                body = self._recv(conn, length)
                if flags & 0x02:
                    body = zlib.decompress(body)
                req = json.loads(body)
                self.received.append(req)
                n = len(req["data"])
                done, failed = (0, n) if self.refuse else (n, 0)
                answer = json.dumps({"response": "success", "info": f"processed: {done}; failed: {failed}; total: {n}; "
                                                                    f"seconds spent: 0.000100"}).encode()
                conn.sendall(b"ZBXD\x01" + struct.pack("<II", len(answer), 0) + answer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def trapper():
    t = Trapper()
    yield t
    t.close()


def test_send_pushes_the_status_document(trio, trapper):
    a = trio[0]
    # The secondaries caught up by their own trees; a learns it with their next feed. The document
    # sent and the one read after it are compared, so both must be of the settled cluster.
    wait_until(lambda: status(a)["counts"]["findings"] == 0, 20, "a's view of the cluster to settle")
    r = mz(a, "send", "--zabbix-server", "127.0.0.1", "--zabbix-port", str(trapper.port), "--zabbix-host", "mars-a",
           "--zabbix-config", "/dev/null")
    assert r.returncode == 0, r.stderr
    assert "sent the status" in r.stdout
    [req] = trapper.received
    assert req["request"] == "sender data"
    [item] = req["data"]
    assert (item["host"], item["key"]) == ("mars-a", zx.TRAP_KEY)
    sent = json.loads(item["value"])
    now = status(a)
    assert sent["ok"] == 1 and sent["host"] == "a"
    assert {k: v for k, v in sent.items() if k not in ("taken_at_s", "node", "peers", "findings", "members")} == \
        {k: v for k, v in now.items() if k not in ("taken_at_s", "node", "peers", "findings", "members")}


def test_send_without_zabbix_sender_says_what_to_install(trio, tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no zabbix_sender anywhere
    r = mz(trio[0], "send", "--zabbix-server", "127.0.0.1", env=env)
    assert r.returncode == 1
    assert "zabbix_sender is not installed" in r.stderr and "apt-get install zabbix-agent" in r.stderr
    assert "Traceback" not in r.stderr


def test_send_to_an_unreachable_server_says_so(trio):
    if shutil.which("zabbix_sender") is None:
        pytest.fail("zabbix_sender sends the status: apt-get install zabbix-agent")
    port = free_port()
    r = mz(trio[0], "send", "--zabbix-server", "127.0.0.1", "--zabbix-port", str(port), "--zabbix-host", "mars-a",
           "--zabbix-config", "/dev/null")
    assert r.returncode == 1
    assert f"could not send to 127.0.0.1:{port}" in r.stderr and "--zabbix-server" in r.stderr
    assert "Traceback" not in r.stderr


def test_send_to_a_server_that_refuses_names_the_template(trio):
    t = Trapper(refuse=True)
    try:
        r = mz(trio[0], "send", "--zabbix-server", "127.0.0.1", "--zabbix-port", str(t.port), "--zabbix-host",
               "no-such-host", "--zabbix-config", "/dev/null")
    finally:
        t.close()
    assert r.returncode == 1
    assert "refused the status of host no-such-host" in r.stderr and zx.TEMPLATE_TRAPPER in r.stderr


def test_a_large_document_goes_on_stdin(trapper):
    """Above one argv string's limit (128 KiB) the document goes to zabbix_sender as an input file."""
    payload = json.dumps({"ok": 1, "pad": "x\\\"y " * 40000})
    assert len(payload) > zx.SENDER_ARG_MAX
    said = zx.send(payload, "127.0.0.1", trapper.port, "mars-big", None)
    assert "processed: 1" in said
    [req] = trapper.received
    assert req["data"][0]["value"] == payload and req["data"][0]["host"] == "mars-big"


def test_send_needs_a_server(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(zx, "DEFAULT_AGENT_CONFIG", str(tmp_path / "no-agent.conf"))
    assert zx.main(["--mars-dir", str(tmp_path), "send"]) == 2
    assert "give --zabbix-server HOST" in capsys.readouterr().err


# --- the agent side, for real: zabbix_agentd as user zabbix, sudo, the shipped files ---------------------

@pytest.fixture
def agent_files(trio):
    """The shipped UserParameters and sudo rule, with this test's mars-zabbix and MARS directory;
    in a directory user zabbix can read (pytest's own are root's alone)."""
    for tool in ("zabbix_agentd", "sudo", "runuser"):
        if shutil.which(tool) is None:
            pytest.fail(f"this test runs {tool}: apt-get install zabbix-agent sudo")
    a = trio[0]

    def ours(text: str) -> str:
        return text.replace("/usr/local/bin/mars-zabbix", str(MZ)).replace("--mars-dir /mars ", f"--mars-dir {a.mars_dir} ")

    conf_dir = Path(tempfile.mkdtemp(prefix="mars-zabbix-agent-", dir="/tmp"))
    (conf_dir / "userparameter_mars.conf").write_text(ours((DIR / "userparameter_mars.conf").read_text()))
    conf = conf_dir / "zabbix_agentd.conf"
    conf.write_text(f"LogType=console\nTimeout=20\nInclude={conf_dir}/userparameter_mars.conf\n")
    for p in (conf_dir, conf, conf_dir / "userparameter_mars.conf"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    rule = Path(f"/etc/sudoers.d/mars-zabbix-test-{os.getpid()}")
    rule.write_text(ours((DIR / "sudoers.d/mars-zabbix").read_text()))
    os.chmod(rule, 0o440)
    try:
        r = subprocess.run(["visudo", "-c", "-f", str(rule)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        yield a, conf
    finally:
        rule.unlink(missing_ok=True)
        shutil.rmtree(conf_dir, ignore_errors=True)


def agent_test(conf: Path, key: str) -> str:
    """``zabbix_agentd -t KEY`` as user zabbix: the value the agent would send."""
    r = subprocess.run(["runuser", "-u", "zabbix", "--", "zabbix_agentd", "-c", str(conf), "-t", key],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(key), r.stdout
    m = re.fullmatch(r"\s+\[(\w)\|(.*)\]\s*", r.stdout[len(key):], re.DOTALL)  # "<key>   [t|<value>]"
    assert m and m[1] == "t", r.stdout
    return m[2]


def test_the_agent_reads_mars_through_sudo(agent_files):
    a, conf = agent_files
    denied = subprocess.run(["runuser", "-u", "zabbix", "--", "ls", str(a.mars_dir)], capture_output=True, text=True)
    assert denied.returncode != 0, "the MARS directory must be root's alone, or this test proves nothing"
    doc = json.loads(agent_test(conf, "mars.status"))
    assert doc["ok"] == 1 and doc["host"] == "a" and doc["marsd_up"] == 1
    assert json.loads(agent_test(conf, "mars.discovery[members]")) == [{"{#RESOURCE}": "r", "{#HOST}": "a"}]
    assert agent_test(conf, "mars.value[r/a/role]") == "Primary"
    assert agent_test(conf, "mars.value[r/b/replay-rest]") == "0"


def test_the_sudo_rule_lets_nothing_else_through(agent_files):
    a, conf = agent_files
    for key in ("mars.value[x --members all]", "mars.discovery[everything]"):
        assert "password is required" in agent_test(conf, key), key
    for args in (["template", "/tmp/mars-zabbix-evil.xml"], ["send", "--zabbix-server", "127.0.0.1"],
                 ["--members", "all", "status"]):
        r = subprocess.run(["runuser", "-u", "zabbix", "--", "sudo", "-n", str(MZ), "--mars-dir", str(a.mars_dir),
                            *args], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "password is required" in r.stderr, args
    assert not Path("/tmp/mars-zabbix-evil.xml").exists()
