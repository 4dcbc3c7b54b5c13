"""The cluster credential and peer-link TLS, over real sockets on 127.0.0.1.

The point of the module is that a host without the credential gets nothing through port 7777,
so the refusals are tested as an attacker would meet them: on the wire, not by inspecting
contexts.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from mars.engine import credentials as C
from mars.engine.credentials import (CRED_DIR, CredentialError, client_context, cluster_fingerprint,
                                     create_cluster_credential, ensure_node_cert, export_secret, install_secret,
                                     peer_host, secret_to_token, server_context, token_to_secret)
from mars.engine.errors import MarsError

TIMEOUT = 10


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    d = tmp_path / "mars-a"
    create_cluster_credential(d, "test-cluster")
    ensure_node_cert(d, "a")
    ensure_node_cert(d, "b")
    return d


@pytest.fixture
def other_cluster(tmp_path: Path) -> Path:
    d = tmp_path / "mars-x"
    create_cluster_credential(d, "other-cluster")
    ensure_node_cert(d, "b")
    return d


class OneShotServer:
    """Accepts one connection with ``ctx`` in a thread and records what it learned: the
    authenticated peer, the application data it received (and echoed), or the error."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.peer: str | None = None
        self.data = b""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as e:
            self.error = e
            return
        conn.settimeout(TIMEOUT)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                self.peer = peer_host(s)
                while not self.data.endswith(b"\n"):
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    self.data += chunk
                s.sendall(b"echo " + self.data)
        except (OSError, CredentialError) as e:  # ssl.SSLError is an OSError
            self.error = e
        finally:
            conn.close()
            self.listener.close()

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


def tls_exchange(ctx: ssl.SSLContext, port: int, payload: bytes = b"ping\n") -> tuple[str, bytes]:
    """Connect, send ``payload``, read until the server closes; the server's certified name and reply."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    with ctx.wrap_socket(raw) as s:
        name = peer_host(s)
        s.sendall(payload)
        reply = b""
        while chunk := s.recv(100):
            reply += chunk
    return name, reply


def link(server_dir: Path, server_host: str, client_dir: Path, client_host: str) -> None:
    srv = OneShotServer(server_context(server_dir, server_host))
    name, reply = tls_exchange(client_context(client_dir, client_host), srv.port)
    srv.join()
    assert srv.error is None
    assert name == server_host
    assert srv.peer == client_host
    assert srv.data == b"ping\n"
    assert reply == b"echo ping\n"


def assert_refused(srv: OneShotServer, client_ctx: ssl.SSLContext) -> None:
    """The client fails with an SSL error (at the handshake, or with TLS 1.3 client auth at its
    first read, when the server's alert arrives) and the server got no application data."""
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        tls_exchange(client_ctx, srv.port)
    srv.join()
    assert srv.data == b""
    assert srv.peer is None
    assert isinstance(srv.error, ssl.SSLError)


# -- links ---------------------------------------------------------------------------------------


def test_mutual_handshake_names_both_peers(cluster: Path) -> None:
    link(cluster, "a", cluster, "b")
    link(cluster, "b", cluster, "a")


def test_contexts_are_tls13_only_with_required_peer_certs(cluster: Path) -> None:
    for ctx in (server_context(cluster, "a"), client_context(cluster, "a")):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client_context(cluster, "a").check_hostname is False


def test_asyncio_link_as_peerlink_uses_it(cluster: Path) -> None:
    seen: dict[str, object] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["server_peer"] = peer_host(writer.get_extra_info("ssl_object"))
        writer.write(b"echo " + await reader.readline())
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(cluster, "a"),
                                            ssl_handshake_timeout=TIMEOUT)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_context(cluster, "b")), TIMEOUT)
        seen["client_peer"] = peer_host(writer.get_extra_info("ssl_object"))
        writer.write(b"hello\n")
        seen["reply"] = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert seen == {"server_peer": "b", "client_peer": "a", "reply": b"echo hello\n"}


def test_client_with_cert_of_another_cluster_is_refused(cluster: Path, other_cluster: Path) -> None:
    # The intruder even trusts our CA, so only the server's check of its certificate stops it.
    intruder = client_context(other_cluster, "b")
    intruder.load_verify_locations(cluster / CRED_DIR / "ca.pem")
    assert_refused(OneShotServer(server_context(cluster, "a")), intruder)


def test_server_of_another_cluster_is_refused_by_client(cluster: Path, other_cluster: Path) -> None:
    srv = OneShotServer(server_context(other_cluster, "b"))
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(client_context(cluster, "a"), srv.port)
    srv.join()
    assert srv.data == b"" and srv.peer is None


def test_client_without_cert_is_refused(cluster: Path) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cluster / CRED_DIR / "ca.pem")
    assert_refused(OneShotServer(server_context(cluster, "a")), anonymous)


def test_client_limited_to_tls12_is_refused(cluster: Path) -> None:
    old = client_context(cluster, "b")
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert_refused(OneShotServer(server_context(cluster, "a")), old)


def test_plain_tcp_client_gets_nothing(cluster: Path) -> None:
    srv = OneShotServer(server_context(cluster, "a"))
    got = b""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
        s.sendall(b"give me your tree\n")
        try:
            while chunk := s.recv(100):
                got += chunk
        except ConnectionResetError:
            pass
    srv.join()
    assert got == b""
    assert srv.data == b"" and srv.peer is None
    assert isinstance(srv.error, ssl.SSLError)


def test_peer_host_needs_a_verified_certificate() -> None:
    class Unverified:
        def getpeercert(self) -> dict:
            return {}

    with pytest.raises(CredentialError, match="no verified certificate"):
        peer_host(Unverified())  # type: ignore[arg-type]


# -- the secret and the token --------------------------------------------------------------------


def test_token_round_trip(cluster: Path) -> None:
    secret = export_secret(cluster)
    token = secret_to_token(secret)
    assert "\n" not in token and " " not in token and "=" not in token
    assert token_to_secret(token) == secret
    # A terminal may wrap a long line; the paste still works.
    wrapped = "\n".join(token[i:i + 60] for i in range(0, len(token), 60))
    assert token_to_secret("  " + wrapped + "\n") == secret


@pytest.mark.parametrize("token, words", [
    ("", "not a MARS cluster token"),
    ("hello world", "not a MARS cluster token"),
    ("mars1.", "damaged"),
    ("mars1.!!!not*base64", "damaged"),
    ("mars1." + base64.urlsafe_b64encode(b"just some text").decode().rstrip("="), "not a MARS cluster secret"),
])
def test_garbage_token(token: str, words: str) -> None:
    with pytest.raises(CredentialError, match=words) as e:
        token_to_secret(token)
    assert "export-secret --token" in e.value.remedy


def test_truncated_token(cluster: Path) -> None:
    token = secret_to_token(export_secret(cluster))
    for cut in (len(token) // 2, len(token) - 30):
        with pytest.raises(CredentialError, match="truncated|damaged|does not parse"):
            token_to_secret(token[:cut])


def test_truncated_secret(cluster: Path, tmp_path: Path) -> None:
    secret = export_secret(cluster)
    with pytest.raises(CredentialError, match="truncated") as e:
        install_secret(tmp_path / "new", secret[: len(secret) - 40])
    assert "export-secret" in e.value.remedy
    assert not (tmp_path / "new" / CRED_DIR / "ca.pem").exists()


def test_secret_with_key_of_another_ca(cluster: Path, other_cluster: Path, tmp_path: Path) -> None:
    ours, theirs = export_secret(cluster), export_secret(other_cluster)
    cert = ours[: ours.index(b"-----BEGIN PRIVATE KEY")]
    key = theirs[theirs.index(b"-----BEGIN PRIVATE KEY"):]
    with pytest.raises(CredentialError, match="does not belong to the CA certificate"):
        install_secret(tmp_path / "new", cert + key)


def test_node_credential_is_not_a_cluster_secret(cluster: Path, tmp_path: Path) -> None:
    cert, key = ensure_node_cert(cluster, "a")
    with pytest.raises(CredentialError, match="not a CA certificate"):
        install_secret(tmp_path / "new", cert.read_bytes() + key.read_bytes())


def test_bad_secret_leaves_good_credential_alone(cluster: Path) -> None:
    before = export_secret(cluster)
    with pytest.raises(CredentialError):
        install_secret(cluster, b"-----BEGIN CERTIFICATE-----\nAAAA\n")
    assert export_secret(cluster) == before


def test_installed_secret_interoperates(cluster: Path, tmp_path: Path) -> None:
    joiner = tmp_path / "mars-c"
    install_secret(joiner, token_to_secret(secret_to_token(export_secret(cluster))))
    ensure_node_cert(joiner, "c")
    assert cluster_fingerprint(joiner) == cluster_fingerprint(cluster)
    link(cluster, "a", joiner, "c")
    link(joiner, "c", cluster, "b")


# -- files ---------------------------------------------------------------------------------------


def test_modes(tmp_path: Path) -> None:
    old = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        d = tmp_path / "mars"
        create_cluster_credential(d, "modes")
        cert, key = ensure_node_cert(d, "a")
        joiner = tmp_path / "mars-j"
        install_secret(joiner, export_secret(d))
        ensure_node_cert(joiner, "j")
    finally:
        os.umask(old)
    for root in (d, joiner):
        cd = root / CRED_DIR
        assert stat.S_IMODE(cd.stat().st_mode) == 0o700
        files = sorted(p.name for p in cd.iterdir())
        assert {"ca.pem", "secret.pem"} <= set(files)
        for p in cd.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert cert.parent == key.parent == d / CRED_DIR
    assert (cert.name, key.name) == ("node-a.pem", "node-a.key")


def test_node_certificate_contents(cluster: Path) -> None:
    cert_path, _ = ensure_node_cert(cluster, "a")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((cluster / CRED_DIR / "ca.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a"]
    assert cert.issuer == ca.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    life = C._not_after(cert) - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=3640) < life <= dt.timedelta(days=3651)


def test_ensure_node_cert_is_idempotent(cluster: Path) -> None:
    cert, key = ensure_node_cert(cluster, "a")
    before = [(p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in (cert, key)]
    assert ensure_node_cert(cluster, "a") == (cert, key)
    server_context(cluster, "a")
    client_context(cluster, "a")
    assert [(p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in (cert, key)] == before


def test_reissued_when_the_ca_changes(cluster: Path, tmp_path: Path) -> None:
    old_fp = cluster_fingerprint(cluster)
    old_cert = (cluster / CRED_DIR / "node-a.pem").read_bytes()
    # A stale node of the old cluster, kept to show it is locked out afterwards.
    stale = tmp_path / "stale"
    install_secret(stale, export_secret(cluster))
    ensure_node_cert(stale, "s")

    create_cluster_credential(cluster, "renamed", force=True)
    assert cluster_fingerprint(cluster) != old_fp
    cert, _ = ensure_node_cert(cluster, "a")
    assert cert.read_bytes() != old_cert
    link(cluster, "a", cluster, "b")  # b's certificate is re-issued by client_context
    srv = OneShotServer(server_context(cluster, "a"))
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(client_context(stale, "s"), srv.port)
    srv.join()
    assert srv.data == b""


def test_reissued_when_expiring_or_damaged(cluster: Path) -> None:
    d = cluster / CRED_DIR
    ca_pem = export_secret(cluster)
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_pem, password=None)

    def plant(days: int) -> bytes:
        cert, key = C._issue_node_cert(ca, ca_key, "a", dt.timedelta(days=days))  # type: ignore[arg-type]
        C._write(d / "node-a.key", C._pem(key))
        C._write(d / "node-a.pem", C._pem(cert))
        return C._pem(cert)

    kept = plant(60)
    ensure_node_cert(cluster, "a")
    assert (d / "node-a.pem").read_bytes() == kept

    expiring = plant(10)
    ensure_node_cert(cluster, "a")
    assert (d / "node-a.pem").read_bytes() != expiring

    (d / "node-a.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    ensure_node_cert(cluster, "a")
    (d / "node-a.key").unlink()
    ensure_node_cert(cluster, "a")
    # A key left from another pair (a crash between the two writes) is not used with the cert.
    plant(60)
    C._write(d / "node-a.key", (d / "node-b.key").read_bytes())
    ensure_node_cert(cluster, "a")
    link(cluster, "a", cluster, "b")


def test_concurrent_ensure_leaves_a_matching_pair(tmp_path: Path) -> None:
    d = tmp_path / "mars"
    create_cluster_credential(d, "race")
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            ensure_node_cert(d, "a")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert errors == []
    ensure_node_cert(d, "b")
    link(d, "a", d, "b")


# -- operator mistakes: a CredentialError with a remedy, never a traceback --------------------------


def test_create_refuses_to_replace_without_force(cluster: Path) -> None:
    with pytest.raises(CredentialError, match="already holds a cluster credential") as e:
        create_cluster_credential(cluster, "again")
    assert "--force" in e.value.remedy


@pytest.mark.parametrize("call", [
    lambda d: export_secret(d),
    lambda d: ensure_node_cert(d, "a"),
    lambda d: server_context(d, "a"),
    lambda d: client_context(d, "a"),
    lambda d: cluster_fingerprint(d),
])
def test_missing_credential(tmp_path: Path, call) -> None:
    for d in (tmp_path / "nothing", tmp_path):  # no mars dir at all / no cluster dir
        with pytest.raises(CredentialError, match="cluster") as e:
            call(d)
        assert "join-cluster" in e.value.remedy
        assert isinstance(e.value, MarsError)
    (tmp_path / CRED_DIR).mkdir()  # an empty cluster dir
    with pytest.raises(CredentialError) as e:
        call(tmp_path)
    assert "join-cluster" in e.value.remedy


def test_key_readable_by_others_is_refused(cluster: Path) -> None:
    secret = cluster / CRED_DIR / "secret.pem"
    secret.chmod(0o644)
    with pytest.raises(CredentialError, match="accessible by other users") as e:
        export_secret(cluster)
    assert f"chmod 600 {secret}" in e.value.remedy
    secret.chmod(0o600)
    key = cluster / CRED_DIR / "node-a.key"
    key.chmod(0o640)
    with pytest.raises(CredentialError, match="accessible by other users"):
        server_context(cluster, "a")


def test_ca_and_secret_of_different_clusters(cluster: Path, other_cluster: Path) -> None:
    (cluster / CRED_DIR / "secret.pem").write_bytes(export_secret(other_cluster))
    with pytest.raises(CredentialError, match="different cluster CAs") as e:
        ensure_node_cert(cluster, "newhost")
    assert "join-cluster" in e.value.remedy


def test_damaged_ca_certificate(cluster: Path) -> None:
    (cluster / CRED_DIR / "ca.pem").write_bytes(b"not a certificate\n")
    with pytest.raises(CredentialError, match="damaged"):
        cluster_fingerprint(cluster)
    with pytest.raises(CredentialError, match="damaged"):
        server_context(cluster, "a")


def test_host_name_cannot_escape_the_directory(cluster: Path) -> None:
    with pytest.raises(MarsError, match="not valid"):
        ensure_node_cert(cluster, "../etc")


# -- the NBD export's certificates ------------------------------------------------------------------


def _nbd_client_context(cluster: Path, out: Path, tls12_only: bool = False) -> ssl.SSLContext:
    C.export_nbd_client(cluster, "vm1", out)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(out / "ca-cert.pem")
    ctx.load_cert_chain(out / "client-cert.pem", out / "client-key.pem")
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def test_nbd_cert_names_the_addresses_and_follows_them(cluster: Path) -> None:
    cert_path, key_path = C.ensure_nbd_cert(cluster, "a", ["127.0.0.2", "mars-a.example", "127.0.0.2"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a", "mars-a.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]  # it opens no link as a client
    before = cert_path.read_bytes()
    C.ensure_nbd_cert(cluster, "a", ["127.0.0.2", "mars-a.example"])
    assert cert_path.read_bytes() == before
    C.ensure_nbd_cert(cluster, "a", ["10.0.0.1"])
    san = x509.load_pem_x509_certificate(cert_path.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_nbd_client_cert_is_refused_by_peer_links(cluster: Path, tmp_path: Path) -> None:
    srv = OneShotServer(server_context(cluster, "a"))
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
    with _nbd_client_context(cluster, tmp_path / "c").wrap_socket(raw) as s:
        try:
            s.sendall(b"ping\n")
            reply = s.recv(100)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            reply = b""
        assert reply == b""  # the server hangs up without a reply
    srv.join()
    assert isinstance(srv.error, CredentialError) and "NBD client certificate" in srv.error.what
    assert srv.peer is None and srv.data == b""


def test_nbd_export_takes_a_client_cert_also_over_tls12(cluster: Path, tmp_path: Path) -> None:
    """The kernel's nbd-client asks for TLS 1.2 by default; peer links stay 1.3 only."""
    ctx = C.nbd_server_context(cluster, "a", ["127.0.0.1"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED
    client = _nbd_client_context(cluster, tmp_path / "c", tls12_only=True)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list = []

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as s:
            seen.append((s.version(), s.cipher()[0], dict(x[0] for x in s.getpeercert()["subject"])))
            s.sendall(b"ok")
        listener.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with client.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)) as s:
        assert s.recv(2) == b"ok"
    t.join(TIMEOUT)
    version, cipher, subject = seen[0]
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    assert subject["commonName"] == "vm1" and subject["organizationalUnitName"] == C.NBD_CLIENT_OU


def test_export_client_cert_needs_the_ca_key(tmp_path: Path) -> None:
    """A node whose credential lacks secret.pem (CA certificate only) cannot issue, and says why."""
    d = tmp_path / "m"
    create_cluster_credential(d, "c")
    (d / CRED_DIR / "secret.pem").unlink()
    with pytest.raises(CredentialError, match="secret.pem is missing"):
        C.export_nbd_client(d, "vm1", tmp_path / "out")
    assert not (tmp_path / "out" / "client-key.pem").exists()
