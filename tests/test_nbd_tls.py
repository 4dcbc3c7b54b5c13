"""TLS on the NBD TCP export, with real clients against a real marsd.

libnbd's nbdinfo and nbdcopy (``nbds://...?tls-certificates=DIR``) and qemu-img (``--object
tls-creds-x509``) connect with a certificate from ``marsadm export-client-cert`` and copy; a
client without a certificate, with one of another cluster, or in plain text learns nothing of a
TLS-only export, not even its name or size; a listen address other than loopback is refused
without TLS; an NBD client certificate opens no peer link.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

from harness import BIN, Node, free_port, run, sha256, wait_until

from mars.engine.peer import protocol as P
from mars.engine.peer.link import PeerClient, PeerError

RES = "secretdisk"  # distinctive: no refusal may echo it to a client that did not name it
SIZE = 64 << 20
SIZE_TEXTS = (str(SIZE), "64M", "64 MiB", "67108864")


@pytest.fixture
def tls_export(workdir):
    """Node a serving RES on a sparse 64 MiB image, NBD on TCP with TLS required, and a client
    certificate directory from export-client-cert."""
    base, nodes = workdir
    a = Node(base, "a", "127.0.0.2")
    nodes.append(a)
    a.create_cluster()
    port = free_port(a.ip)
    a.start("--nbd-listen", f"{a.ip}:{port}", "--nbd-tls", "require", "--nbd-tls-name", "mars-a.example")
    a.marsadm("create-resource", RES, str(base / "r.img"), "64M")
    certs = base / "client"
    r = a.marsadm("export-client-cert", "--out", str(certs), "--name", "vm1")
    assert "tls-certificates=" in r.stdout
    return a, port, certs


def nbds(a: Node, port: int, certs: Path, res: str = RES) -> str:
    return f"nbds://{a.ip}:{port}/{res}?tls-certificates={certs}"


def other_cluster_certs(base: Path) -> Path:
    """A client certificate signed by a second cluster's CA."""
    z = Node(base, "z", "127.0.0.9")
    z.create_cluster()
    out = base / "other-client"
    z.marsadm("export-client-cert", "--out", str(out))
    return out


def test_export_client_cert_writes_the_files_qemu_and_libnbd_read(tls_export):
    a, port, certs = tls_export
    assert sorted(os.listdir(certs)) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert os.stat(certs / "client-key.pem").st_mode & 0o077 == 0
    subject = run(["openssl", "x509", "-in", str(certs / "client-cert.pem"), "-noout", "-subject"]).stdout
    assert "CN = vm1" in subject and "MARS NBD client" in subject
    run(["openssl", "verify", "-CAfile", str(certs / "ca-cert.pem"), str(certs / "client-cert.pem")])
    # A second run would replace a key a client may be using: refused unless --force.
    r = a.marsadm("export-client-cert", "--out", str(certs), check=False)
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr
    a.marsadm("export-client-cert", "--out", str(certs), "--force")


def test_export_client_cert_refused_without_the_cluster_credential(workdir):
    base, nodes = workdir
    stranger = Node(base, "s", "127.0.0.8")
    r = stranger.marsadm("export-client-cert", "--out", str(base / "c"), check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "join-cluster" in r.stderr  # the reason (no credential here) and the remedy
    assert not (base / "c" / "client-key.pem").exists()


def test_nbdinfo_and_nbdcopy_over_nbds(tls_export):
    a, port, certs = tls_export
    info = json.loads(run(["nbdinfo", "--json", nbds(a, port, certs)]).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-name"] == RES and info["exports"][0]["export-size"] == SIZE
    listing = json.loads(run(["nbdinfo", "--list", "--json",
                              f"nbds://{a.ip}:{port}?tls-certificates={certs}"]).stdout)
    assert [e["export-name"] for e in listing["exports"]] == [RES]
    src = a.base / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(16 << 20))
    run(["nbdcopy", str(src), nbds(a, port, certs)])
    out = a.base / "out.img"
    run(["nbdcopy", nbds(a, port, certs), str(out)])
    with open(out, "r+b") as f:
        f.truncate(16 << 20)
    assert sha256(out) == sha256(src)
    assert "TLS up, certificate of vm1" in a.log()
    # The unix socket stays plain (local, root only).
    assert json.loads(run(["nbdinfo", "--json", a.uri(RES)]).stdout)["TLS"] is False


def test_qemu_img_over_tls_creds_x509(tls_export):
    a, port, certs = tls_export
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"
    opts = f"driver=nbd,host={a.ip},port={port},export={RES},tls-creds=tls0"
    r = run(["qemu-img", "info", "--output=json", "--object", obj, "--image-opts", opts])
    assert json.loads(r.stdout)["virtual-size"] == SIZE
    # The server's certificate is really checked: a name it holds passes, another does not.
    r = run(["qemu-img", "info", "--object", obj, "--image-opts", opts + ",tls-hostname=mars-a.example"])
    assert str(SIZE) in r.stdout
    r = run(["qemu-img", "info", "--object", obj, "--image-opts", opts + ",tls-hostname=elsewhere"], check=False)
    assert r.returncode != 0 and "does not match the hostname" in r.stderr
    # TLS 1.2 only, as the kernel's nbd-client asks for it by default (its -priority).
    tls12 = obj + ",priority=NORMAL:-VERS-TLS-ALL:+VERS-TLS1.2"
    r = run(["qemu-img", "info", "--output=json", "--object", tls12, "--image-opts", opts])
    assert json.loads(r.stdout)["virtual-size"] == SIZE
    src = a.base / "q.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.truncate(SIZE)
    run(["qemu-img", "convert", "-n", "--object", obj, "-f", "raw", str(src), "--target-image-opts", opts])
    # --image-opts applies to both images here.
    r = run(["qemu-img", "compare", "--object", obj, "--image-opts", f"driver=file,filename={src}", opts])
    assert "Images are identical" in r.stdout


def _learns_nothing(r: subprocess.CompletedProcess[str], named: bool) -> str:
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    for text in SIZE_TEXTS:
        assert text not in out, out
    if not named:  # a client may echo the name it asked for, but must not learn it
        assert RES not in out, out
    assert "Traceback" not in out
    return out


@pytest.mark.parametrize("client", ["plain", "no-certificate", "other-cluster"])
def test_client_without_the_right_credential_learns_nothing(tls_export, client):
    a, port, certs = tls_export
    env = {**os.environ, "LIBNBD_DEBUG": "1"}  # the server's refusal text shows in libnbd's debug lines
    if client == "plain":
        uri, query = f"nbd://{a.ip}:{port}", ""
    elif client == "no-certificate":
        uri, query = f"nbds://{a.ip}:{port}", f"?tls-certificates={a.base / 'empty'}"
        (a.base / "empty").mkdir()
        run(["cp", str(certs / "ca-cert.pem"), str(a.base / "empty")])  # trusts the server, shows nothing
    else:
        uri, query = f"nbds://{a.ip}:{port}", f"?tls-certificates={other_cluster_certs(a.base)}"
    named = run(["nbdinfo", "--json", f"{uri}/{RES}{query}"], check=False, env=env)
    listed = run(["nbdinfo", "--list", "--json", f"{uri}{query}"], check=False, env=env)
    _learns_nothing(named, named=True)
    out = _learns_nothing(listed, named=False)
    if client == "plain":
        assert "TLS is required" in out  # ERR_TLS_REQD, and nothing else
    else:
        assert "gnutls" in out.lower()  # the handshake is where it ends
    if client == "no-certificate":
        wait_until(lambda: "the client shows no certificate" in a.log(), 10, "marsd to log the refusal")
    obj = ([] if client == "plain" else
           ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={query.partition('=')[2]}"])
    opts = f"driver=nbd,host={a.ip},port={port},export={RES}" + ("" if client == "plain" else ",tls-creds=tls0")
    _learns_nothing(run(["qemu-img", "info", *obj, "--image-opts", opts], check=False), named=True)
    # The export still serves the right client.
    assert json.loads(run(["nbdinfo", "--json", nbds(a, port, certs)]).stdout)["exports"][0]["export-size"] == SIZE


def test_tls_on_serves_plain_and_tls_clients(workdir):
    base, nodes = workdir
    a = Node(base, "a", "127.0.0.2")
    nodes.append(a)
    a.create_cluster()
    port = free_port(a.ip)
    a.start("--nbd-listen", f"{a.ip}:{port}", "--nbd-tls", "on")
    a.marsadm("create-resource", RES, str(base / "r.img"), "64M")
    a.marsadm("export-client-cert", "--out", str(base / "c"))
    plain = json.loads(run(["nbdinfo", "--json", f"nbd://{a.ip}:{port}/{RES}"]).stdout)
    secured = json.loads(run(["nbdinfo", "--json", nbds(a, port, base / "c")]).stdout)
    assert (plain["TLS"], secured["TLS"]) == (False, True)
    assert plain["exports"][0]["export-size"] == secured["exports"][0]["export-size"] == SIZE


@pytest.mark.parametrize("address, tls, ok", [
    ("0.0.0.0", "off", False),
    ("0.0.0.0", "on", False),
    ("[::]", "off", False),
    ("127.0.0.2", "off", True),
    ("0.0.0.0", "require", True),
])
def test_non_loopback_listen_needs_tls_required_or_insecure(workdir, address, tls, ok):
    base, nodes = workdir
    a = Node(base, "a", "127.0.0.2")
    nodes.append(a)
    a.create_cluster()
    listen = f"{address}:{free_port('127.0.0.2')}"
    if ok:
        a.start("--nbd-listen", listen, "--nbd-tls", tls)
        assert a.stop() == 0
        return
    cmd = [str(BIN / "marsd"), "--mars-dir", str(a.mars_dir), "--host", "a", "--port", str(a.port),
           "--nbd-listen", listen, "--nbd-tls", tls]
    r = run(cmd, check=False, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "is not a loopback address" in r.stderr and "--nbd-tls require" in r.stderr
    assert "--nbd-insecure" in r.stderr and "export-client-cert" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not a.nbd_sock.exists()  # refused before serving anything
    # The explicit opt-out starts it.
    a.start("--nbd-listen", listen, "--nbd-tls", tls, "--nbd-insecure")
    assert a.stop() == 0


def test_nbd_client_certificate_opens_no_peer_link(tls_export):
    """The certificate handed to a VM host admits to the export, not to the cluster's tree and logs."""
    a, port, certs = tls_export
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(certs / "ca-cert.pem")
    ctx.load_cert_chain(certs / "client-cert.pem", certs / "client-key.pem")
    hello = P.Hello(host="vm1", cluster="", proto=P.PROTO_VERSION, lamport_ns=0)

    async def attempt():
        client = PeerClient(a.ip, a.port, hello, ctx, cluster=None)
        try:
            await client.connect()
            return await client.request(lambda req: P.TreeRequest(req=req, prefixes=()), timeout=10)
        finally:
            await client.close()

    with pytest.raises((PeerError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        asyncio.run(attempt())
    wait_until(lambda: "NBD client certificate" in a.log(), 10, "marsd to log the refusal")
    assert "Traceback" not in a.log()


# --- PSK ---------------------------------------------------------------------------------------


def write_psk(path, identity: str, key: bytes | None = None, mode: int = 0o600) -> bytes:
    key = key if key is not None else os.urandom(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# made by the test\n{identity}:{key.hex()}\n")
    os.chmod(path, mode)
    return key


@pytest.fixture
def psk_export(workdir):
    """Node a serving RES with TLS required, admitting the PSK identity alice besides X.509
    clients; qemu wants the key file as keys.psk in a directory, libnbd as a file."""
    base, nodes = workdir
    a = Node(base, "a", "127.0.0.2")
    nodes.append(a)
    a.create_cluster()
    server_keys = base / "server.psk"
    key = write_psk(server_keys, "alice")
    client = base / "qemu-psk" / "keys.psk"
    write_psk(client, "alice", key)
    port = free_port(a.ip)
    a.start("--nbd-listen", f"{a.ip}:{port}", "--nbd-tls", "require", "--nbd-tls-psk", str(server_keys))
    a.marsadm("create-resource", RES, str(base / "r.img"), "64M")
    return a, port, client


def test_psk_with_libnbd_and_qemu(psk_export):
    a, port, keys = psk_export
    uri = f"nbds://alice@{a.ip}:{port}/{RES}?tls-psk-file={keys}"
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
    src = a.base / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(8 << 20))
    run(["nbdcopy", str(src), uri])
    out = a.base / "out.img"
    run(["nbdcopy", uri, str(out)])
    with open(out, "r+b") as f:
        f.truncate(8 << 20)
    assert sha256(out) == sha256(src)
    obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={keys.parent},username=alice"
    r = run(["qemu-img", "info", "--output=json", "--object", obj, "--image-opts",
             f"driver=nbd,host={a.ip},port={port},export={RES},tls-creds=tls0"])
    assert json.loads(r.stdout)["virtual-size"] == SIZE
    wait_until(lambda: "TLS up, PSK identity alice" in a.log(), 10, "marsd to log the PSK identity")
    # Certificates from the cluster still work on the same export.
    a.marsadm("export-client-cert", "--out", str(a.base / "c"))
    assert json.loads(run(["nbdinfo", "--json", nbds(a, port, a.base / "c")]).stdout)["TLS"] is True


@pytest.mark.parametrize("who", ["wrong-key", "unknown-identity"])
def test_psk_client_with_a_wrong_key_learns_nothing(psk_export, who):
    a, port, keys = psk_export
    bad = a.base / "bad" / "keys.psk"
    identity = "alice" if who == "wrong-key" else "mallory"
    write_psk(bad, identity)
    named = run(["nbdinfo", "--json", f"nbds://{identity}@{a.ip}:{port}/{RES}?tls-psk-file={bad}"], check=False)
    listed = run(["nbdinfo", "--list", f"nbds://{identity}@{a.ip}:{port}?tls-psk-file={bad}"], check=False)
    assert "gnutls" in _learns_nothing(named, named=True).lower()
    _learns_nothing(listed, named=False)
    obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={bad.parent},username={identity}"
    _learns_nothing(run(["qemu-img", "info", "--object", obj, "--image-opts",
                         f"driver=nbd,host={a.ip},port={port},export={RES},tls-creds=tls0"], check=False), named=True)
    hint = "is not the one in --nbd-tls-psk" if who == "wrong-key" else "unknown PSK identity 'mallory'"
    wait_until(lambda: hint in a.log(), 10, "marsd to log why")


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"),
    ("mode", "accessible by other users"),
    ("line", "line 2 is not 'identity:hexkey'"),
    ("short", "is 4 bytes"),
    ("twice", "names 'alice' twice"),
    ("no-tls", "--nbd-tls-psk without TLS"),
])
def test_marsd_refuses_a_bad_psk_file(workdir, problem, message):
    base, nodes = workdir
    a = Node(base, "a", "127.0.0.2")
    a.create_cluster()
    keys = base / "keys.psk"
    if problem == "mode":
        write_psk(keys, "alice", mode=0o644)
    elif problem == "line":
        keys.write_text("# comment\nalice=00112233\n")
    elif problem == "short":
        keys.write_text("alice:00112233\n")
    elif problem == "twice":
        keys.write_text(f"alice:{os.urandom(16).hex()}\nalice:{os.urandom(16).hex()}\n")
    elif problem == "no-tls":
        write_psk(keys, "alice")
    if problem != "mode" and keys.exists():
        os.chmod(keys, 0o600)
    tls = "off" if problem == "no-tls" else "require"
    r = run([str(BIN / "marsd"), "--mars-dir", str(a.mars_dir), "--host", "a", "--port", str(a.port),
             "--nbd-listen", f"{a.ip}:{free_port(a.ip)}", "--nbd-tls", tls, "--nbd-tls-psk", str(keys)],
            check=False, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _raw_client(a: Node, port: int, then: bytes) -> bytes:
    """Greeting, client flags, STARTTLS and ``then`` in one write; everything the server says."""
    s = socket.create_connection((a.ip, port), timeout=10)
    got = b""
    try:
        assert len(s.recv(18)) == 18
        s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 5, 0) + then)
        while chunk := s.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    finally:
        s.close()
    return got


def test_plain_bytes_behind_starttls_are_refused_not_injected(tls_export):
    """Options sent in plain text right behind STARTTLS must not count as sent under TLS (an
    attacker on the path could add them): the server closes without even acknowledging STARTTLS."""
    a, port, certs = tls_export
    go = struct.pack(">I", len(RES)) + RES.encode() + struct.pack(">H", 0)
    got = _raw_client(a, port, b"IHAVEOPT" + struct.pack(">II", 7, len(go)) + go)
    assert got == b""
    wait_until(lambda: "plain-text bytes after NBD_OPT_STARTTLS" in a.log(), 10, "marsd to log the refusal")
    # Not TLS at all after the ACK: logged, that connection closed, the export serves on.
    s = socket.create_connection((a.ip, port), timeout=10)
    s.recv(18)
    s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 5, 0))
    ack = s.recv(20)
    assert struct.unpack(">QIII", ack)[2] == 1  # NBD_REP_ACK
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert s.recv(100) == b""
    s.close()
    wait_until(lambda: "TLS handshake failed: HTTP_REQUEST" in a.log(), 10, "marsd to log the bad handshake")
    assert json.loads(run(["nbdinfo", "--json", nbds(a, port, certs)]).stdout)["exports"][0]["export-size"] == SIZE
    assert "Traceback" not in a.log()
