"""marsd's NBD export under the NBD reference project's own test client (issue 18).

``nbd-tester-client`` (vendored in tests/nbdtester/, built by tests/nbdtester.py) is what
upstream runs against nbd-server in its tests/run/simple_test; here it runs against a real
marsd, over TCP (``--nbd-listen``) and over the unix socket, with upstream's flags:

* ``-h``: the fixed-newstyle handshake, an unknown option (answered NBD_REP_ERR_UNSUP), ABORT;
* ``-N r`` (read), ``-w`` (write), ``-w -f`` (write with FUA and FLUSH, which the export must
  announce): 1 KiB requests over the whole export, pipelined;
* ``-o``: requests of 1 MiB, 1 MiB + 14 and 2 MiB + 28 bytes, all to be served alike;
* ``-i -t FILE``: the integrity test, a replay of a transaction file (random reads, writes, FUA
  writes, flushes, then a read of every block) in which the tester checks every block it reads
  against the last write it was acknowledged;
* TLS (``-C -K -A [-H]``, upstream's tls and tlshuge): the integrity and write tests under
  STARTTLS against ``--nbd-tls require``, with the client certificate from ``marsadm
  export-client-cert``; a self-signed certificate or one of another cluster is refused
  (upstream's tlswrongcert, ``-F``: the failure is expected), and so is a plain tester.

Where the tester writes, the export is read back afterwards (nbdcopy) and compared byte for
byte with what the tester must have left, and after the integrity test also after a SIGKILL of
marsd and a restart: what the tester was acknowledged is in the log.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Node, run, sha256, wait_until
from nbdtester import (CMD_FLAG_FUA, CMD_READ, CMD_WRITE, SRC, Result, Tester, Trace, build, make_self_signed,
                       make_trace, read_trace, write_trace)
from test_nbd_tls import free_port, other_cluster_certs

RES = "r"
SIZE = 16 << 20
TRANSACTIONS = 3000  # with the closing read of every block: ~2 s over TCP, ~3 s over TLS
# Upstream's integrity and tls tests replay this trace (mkfs.ext3, tar and dbench on a 50 MB
# export, 68990 requests moving 310 MiB) against an export of exactly this size.
UPSTREAM_TRACE = SRC / "integrity-test.tr"
UPSTREAM_SIZE = 52428800
MAX_PAYLOAD = 32 << 20  # the spec's default maximum payload, marsd's limit (engine/nbd/protocol.py)


@pytest.fixture(scope="session")
def tester():
    """nbd-tester-client, compiled once per session (per pytest-xdist worker) into a temp dir."""
    d = Path(tempfile.mkdtemp(prefix="nbdtester-"))
    try:
        yield Tester(build(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Served:
    """Node a serving RES (SIZE bytes, sparse) on its unix socket and on TCP ``ip:port``."""

    node: Node
    port: int
    args: tuple[str, ...]  # marsd's NBD options, to restart it with the same
    size: int = SIZE
    certs: Path | None = None  # export-client-cert's directory, when TLS is on

    def target(self, transport: str) -> list[str]:
        """The tester's arguments that say where to connect."""
        if transport == "unix":
            return ["-u", str(self.node.nbd_sock)]
        return [self.node.ip, str(self.port)]

    def tls(self, certs: Path | None = None) -> list[str]:
        c = certs or self.certs
        assert c is not None
        return ["-C", str(c / "client-cert.pem"), "-K", str(c / "client-key.pem"), "-A", str(c / "ca-cert.pem")]

    def uri(self, transport: str) -> str:
        if transport == "unix":
            return self.node.uri(RES)
        if self.certs is not None and "require" in self.args:
            return f"nbds://{self.node.ip}:{self.port}/{RES}?tls-certificates={self.certs}"
        return f"nbd://{self.node.ip}:{self.port}/{RES}"

    def image_sha256(self, transport: str = "unix") -> str:
        """sha256 of the whole export as a client reads it now."""
        out = self.node.base / "readback.img"
        out.unlink(missing_ok=True)
        run(["nbdcopy", self.uri(transport), str(out)])
        assert out.stat().st_size == self.size
        try:
            return sha256(out)
        finally:
            out.unlink()

    def crash_and_restart(self) -> None:
        """SIGKILL marsd, start it again, wait until it serves RES."""
        self.node.kill()
        mark = self.node.log_path.stat().st_size
        self.node.start(*self.args)

        def serving() -> bool:
            r = run(["nbdinfo", "--size", self.node.uri(RES)], check=False, timeout=30)
            if r.returncode != 0 and " ERROR " in self.node.log_path.read_bytes()[mark:].decode(errors="replace"):
                raise AssertionError(f"marsd did not serve {RES} after the restart:\n{self.node.log()}")
            return r.returncode == 0 and r.stdout.strip() == str(self.size)

        wait_until(serving, 60, f"marsd to serve {RES} again")

    def assert_clean_log(self) -> None:
        assert "Traceback" not in self.node.log(), self.node.log()


def _serve(workdir, *args: str, certs: bool = False, size: int = SIZE) -> Served:
    base, nodes = workdir
    a = Node(base, "a", "127.0.0.2")
    nodes.append(a)
    a.create_cluster()
    port = free_port(a.ip)
    nbd_args = ("--nbd-listen", f"{a.ip}:{port}", *args)
    a.start(*nbd_args)
    a.marsadm("create-resource", RES, str(base / "r.img"), str(size))
    served = Served(a, port, nbd_args, size)
    if certs:
        served.certs = base / "client"
        a.marsadm("export-client-cert", "--out", str(served.certs), "--name", "vm1")
    return served


@pytest.fixture
def served(workdir) -> Served:
    return _serve(workdir)


@pytest.fixture
def tls_served(workdir) -> Served:
    """TLS required on TCP, a client certificate for vm1; the server's certificate also names
    mars-a.example (upstream's tlshuge test gives the name to check with -H)."""
    return _serve(workdir, "--nbd-tls", "require", "--nbd-tls-name", "mars-a.example", certs=True)


def passed(r: Result, message: str) -> Result:
    assert r.returncode == 0, str(r)
    assert message in r.stderr, str(r)
    assert "WARNING" not in r.output and "CRITICAL" not in r.output, str(r)  # g_warning: a failed check
    return r


def failed(r: Result, reason: str) -> Result:
    assert r.returncode == 1, str(r)
    assert reason in r.output, str(r)
    return r


def x_image() -> str:
    """What the throughput write test leaves: 'X' in every byte of every whole KiB."""
    return hashlib.sha256(b"X" * SIZE).hexdigest()


def trace(kind: str, base: Path, seed: int) -> Trace:
    """upstream: integrity-test.tr as upstream runs it; generated: make_trace's mix, which
    reads back every block at the end."""
    if kind == "upstream":
        return read_trace(UPSTREAM_TRACE, UPSTREAM_SIZE)
    return make_trace(base / "t.tr", SIZE, TRANSACTIONS, seed=seed)


TRACES = ["upstream", "generated"]


TRANSPORTS = ["tcp", "unix"]


# --- plain text: TCP and the unix socket -----------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_handshake(tester, served, transport):
    """Upstream's handshake test: fixed newstyle, an unknown option refused with ERR_UNSUP
    (anything else, or a dropped connection, fails it), then NBD_OPT_ABORT."""
    passed(tester.run("-h", "-N", RES, *served.target(transport)), "Handshake test completed. No errors encountered.")
    served.assert_clean_log()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_read(tester, served, transport):
    before = served.image_sha256()
    r = passed(tester.run("-N", RES, *served.target(transport)), "Throughput read test (without flushes) complete")
    assert "Requests: 0 " in r.stdout, str(r)  # every reply arrived
    assert served.image_sha256() == before
    served.assert_clean_log()


@pytest.mark.parametrize("flush", [False, True], ids=["write", "flush"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_write(tester, served, transport, flush):
    """-w writes 'X' over the whole export in 1 KiB requests; with -f every 16th is FUA and a
    FLUSH follows every 16th, and the export must announce both (else the tester fails)."""
    args = ["-w", "-f"] if flush else ["-w"]
    r = passed(tester.run("-N", RES, *args, *served.target(transport)),
               f"Throughput write test ({'with' if flush else 'without'} flushes) complete")
    assert "Requests: 0 " in r.stdout, str(r)
    assert served.image_sha256(transport) == x_image()
    served.assert_clean_log()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_oversize(tester, served, transport):
    """Upstream's cfgsize test: a 1 MiB read must work; 1 MiB + 14 and 2 MiB + 28 bytes must
    both work or both fail. marsd serves up to 32 MiB a request, so all three work."""
    r = tester.run("-o", "-N", RES, *served.target(transport))
    assert r.returncode == 0, str(r)
    assert r.stdout.count(": OK") == 3, str(r)
    for length in (1 << 20, (1 << 20) + 14, (2 << 20) + 28):
        assert f"testing oversized request: {length}: OK" in r.stdout, str(r)
    assert "unexpected" not in r.output, str(r)
    served.assert_clean_log()


# Upstream's trace over TCP, as upstream runs it; the generated one over both transports.
@pytest.mark.parametrize("transport, kind", [("tcp", "upstream"), ("tcp", "generated"), ("unix", "generated")])
def test_integrity(tester, workdir, transport, kind):
    """Upstream's integrity test (-i -t integrity-test.tr against a 50 MB export), and the same
    with a generated trace; then the export holds exactly what the trace's writes leave, also
    after a SIGKILL of marsd and a restart: what the tester was acknowledged is durable."""
    t = trace(kind, workdir[0], seed=18 + len(transport))
    s = _serve(workdir, size=t.size)
    assert t.reads > 100 and t.fua > 50 and t.flushes > 50
    r = passed(tester.run("-N", RES, "-i", "-t", str(t.path), *s.target(transport)),
               "Integrity read test complete")
    assert f"Done: {t.requests:08d}" in r.stdout, str(r)  # every request answered, none failed
    want = t.expected_sha256()
    assert s.image_sha256(transport) == want
    s.crash_and_restart()
    assert s.image_sha256(transport) == want
    s.assert_clean_log()


def test_integrity_sees_a_wrong_block(tester, served):
    """The integrity check can fail. The tester takes every block it has not written in this run
    for zeroes; a second run of the same file finds the first run's data where it reads before
    writing, and must report it, with the block and the sequence numbers."""
    trace = make_trace(served.node.base / "t.tr", SIZE, 200, seed=7)
    passed(tester.run("-N", RES, "-i", "-t", str(trace.path), *served.target("tcp")), "Integrity read test complete")
    failed(tester.run("-N", RES, "-i", "-t", str(trace.path), *served.target("tcp")), "Bad reply data")
    served.assert_clean_log()


def test_requests_beyond_32_mib_are_refused_as_the_spec_allows(tester, workdir):
    """Why upstream's integrityhuge and tlshuge traces (requests of up to 47.5 MiB) are not run:
    the spec's default maximum payload is 32 MiB, which a client that did not negotiate block
    sizes should keep to. marsd serves a request of exactly 32 MiB, refuses a READ beyond it
    with an error and a WRITE beyond it by closing the connection (its payload is not read), as
    the spec allows; the tester reports both, and marsd serves on."""
    size = 40 << 20
    s = _serve(workdir, size=size)
    base = workdir[0]
    at_limit = write_trace(base / "at.tr", size, [(CMD_WRITE | CMD_FLAG_FUA, 0, MAX_PAYLOAD), (CMD_READ, 0, MAX_PAYLOAD)])
    passed(tester.run("-N", RES, "-i", "-t", str(at_limit.path), *s.target("unix")), "Integrity read test complete")
    over = MAX_PAYLOAD + 512
    read = write_trace(base / "read.tr", size, [(CMD_READ, 0, over)])
    failed(tester.run("-N", RES, "-i", "-t", str(read.path), *s.target("unix")), "Server errored a transaction")
    wait_until(lambda: f"READ of {over} bytes (limit {MAX_PAYLOAD})" in s.node.log(), 10, "marsd to log the READ")
    written = write_trace(base / "write.tr", size, [(CMD_WRITE, 0, over)])
    r = tester.run("-N", RES, "-i", "-t", str(written.path), *s.target("unix"))
    assert r.returncode == 1 and "complete" not in r.output, str(r)
    wait_until(lambda: f"WRITE of {over} bytes" in s.node.log(), 10, "marsd to log the WRITE")
    assert s.image_sha256() == at_limit.expected_sha256()  # nothing of the refused WRITE landed
    s.assert_clean_log()


# --- TLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRACES)
def test_tls_integrity(tester, workdir, kind):
    """Upstream's tls test (-i -t integrity-test.tr -C -K -A): the integrity test under
    STARTTLS, the server's certificate checked against the cluster CA and the address dialled."""
    t = trace(kind, workdir[0], seed=1018)
    s = _serve(workdir, "--nbd-tls", "require", certs=True, size=t.size)
    r = passed(tester.run("-N", RES, "-i", "-t", str(t.path), *s.tls(), *s.target("tcp")),
               "Integrity read test complete")
    assert f"Done: {t.requests:08d}" in r.stdout, str(r)
    assert s.image_sha256("tcp") == t.expected_sha256()
    wait_until(lambda: "TLS up, certificate of vm1" in s.node.log(), 10, "marsd to log the TLS client")
    s.assert_clean_log()


def test_tls_write_with_flushes_and_the_servers_name(tester, tls_served):
    """Upstream's tlshuge flags: -H names the server (a name its certificate holds, not the
    address dialled); a name it does not hold fails the tester's certificate check."""
    s = tls_served
    r = passed(tester.run("-N", RES, "-w", "-f", *s.tls(), "-H", "mars-a.example", *s.target("tcp")),
               "Throughput write test (with flushes) complete")
    assert "Requests: 0 " in r.stdout, str(r)
    assert s.image_sha256("tcp") == x_image()
    r = tester.run("-N", RES, *s.tls(), "-H", "elsewhere.example", *s.target("tcp"))
    # The reason ("does not match hostname") shows only in a -DDODBG build; gnutls's verdict:
    failed(r, "TLS handshake failed: Error in the certificate.")
    assert "complete" not in r.output, str(r)
    s.assert_clean_log()


def test_tls_requests_up_to_the_32_mib_limit(tester, workdir):
    """Upstream's tlshuge idea (big operations under TLS, its -H flags) within the spec's default
    maximum payload: requests of up to 32 MiB on a 64 MiB export, every block read back."""
    size = 64 << 20
    s = _serve(workdir, "--nbd-tls", "require", "--nbd-tls-name", "mars-a.example", certs=True, size=size)
    t = make_trace(workdir[0] / "big.tr", size, 24, seed=5, max_len=MAX_PAYLOAD)
    assert t.writes >= 10
    r = passed(tester.run("-N", RES, "-i", "-t", str(t.path), *s.tls(), "-H", "mars-a.example", *s.target("tcp")),
               "Integrity read test complete")
    assert f"Done: {t.requests:08d}" in r.stdout, str(r)
    assert s.image_sha256("tcp") == t.expected_sha256()
    s.assert_clean_log()


@pytest.mark.parametrize("cert", ["self-signed", "other-cluster"])
def test_tls_wrong_client_certificate_is_refused(tester, tls_served, cert):
    """Upstream's tlswrongcert: a certificate the cluster CA did not sign gets no export. With
    -F the tester expects exactly that; without it the same run is a failure."""
    s = tls_served
    base = s.node.base
    if cert == "self-signed":
        cert_path, key_path = make_self_signed(base / "wrong")
    else:
        other = other_cluster_certs(base)
        cert_path, key_path = other / "client-cert.pem", other / "client-key.pem"
    trace = make_trace(base / "t.tr", SIZE, 50, seed=3)
    wrong = ["-C", str(cert_path), "-K", str(key_path)]
    before = s.image_sha256("unix")
    r = tester.run("-N", RES, "-t", str(trace.path), *wrong, "-F", *s.target("tcp"))
    assert r.returncode == 0 and "Test failed, as expected" in r.stderr, str(r)
    r = tester.run("-N", RES, "-w", *wrong, *s.target("tcp"))
    failed(r, "Could not open socket")
    assert "complete" not in r.output, str(r)
    refused = "TLS handshake failed: CERTIFICATE_VERIFY_FAILED: the client's certificate is not signed by this cluster's CA"
    wait_until(lambda: s.node.log().count(refused) >= 2, 10, "marsd to log both refused handshakes")
    assert s.image_sha256("unix") == before  # the write test wrote nothing
    # The right certificate still gets in.
    passed(tester.run("-N", RES, *s.tls(), *s.target("tcp")), "Throughput read test (without flushes) complete")
    s.assert_clean_log()


def test_plain_tester_learns_nothing_from_a_tls_only_export(tester, tls_served):
    """Without STARTTLS the tester gets no export: NBD_OPT_EXPORT_NAME cannot be answered with
    an error, so marsd closes, and the unknown option of the handshake test is answered
    NBD_REP_ERR_TLS_REQD, not ERR_UNSUP."""
    s = tls_served
    before = s.image_sha256("unix")
    for args in (["-w"], []):
        r = failed(tester.run("-N", RES, *args, *s.target("tcp")), "Could not read size")
        assert "complete" not in r.output, str(r)
    failed(tester.run("-h", "-N", RES, *s.target("tcp")), "status does not match")
    closed = "NBD_OPT_EXPORT_NAME before TLS on a TLS-only export; closing that connection"
    wait_until(lambda: s.node.log().count(closed) >= 2, 10, "marsd to log why it closed")
    assert s.image_sha256("unix") == before
    # The unix socket stays plain: the same plain tester passes there.
    passed(tester.run("-h", "-N", RES, *s.target("unix")), "Handshake test completed")
    s.assert_clean_log()


def test_tls_on_serves_the_plain_and_the_tls_tester(tester, workdir):
    s = _serve(workdir, "--nbd-tls", "on", certs=True)
    passed(tester.run("-N", RES, "-w", *s.target("tcp")), "Throughput write test (without flushes) complete")
    passed(tester.run("-N", RES, "-w", "-f", *s.tls(), *s.target("tcp")),
           "Throughput write test (with flushes) complete")
    passed(tester.run("-h", "-N", RES, *s.target("tcp")), "Handshake test completed")
    assert s.image_sha256("tcp") == x_image()
    s.assert_clean_log()


def test_the_vendored_tester_is_upstreams_unchanged():
    """The README's promise: every upstream file is byte-identical to the commit it names (the
    git blob ids below are upstream's, from that commit's tree)."""
    src = Path(__file__).parent / "nbdtester"
    assert UPSTREAM_COMMIT in (src / "README.md").read_text()
    for name, blob in UPSTREAM_BLOBS.items():
        data = (src / name).read_bytes()
        got = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert got == blob, f"tests/nbdtester/{name} differs from upstream {UPSTREAM_COMMIT[:7]}"
    ours = {"config.h", "README.md"}
    assert {p.name for p in src.iterdir()} == set(UPSTREAM_BLOBS) | ours


UPSTREAM_COMMIT = "89ba7b5379548d6ebbfa36db15f2b8e3787a09ea"
UPSTREAM_BLOBS = {
    "nbd-tester-client.c": "6daa848104dc4e1a3266ee10d60668c6681fba9b",  # tests/run/ upstream
    "cliserv.c": "651145f8bdd59fe2ff99ddc461fba8a825cc9132",
    "cliserv.h": "9e2d8c01a2b7240728c2b0773914e3344f5a4980",
    "nbd.h": "049e74552e6d1f0ef7d9abe7184330386ee03475",
    "nbd-debug.h": "f2b1af57fc7cb562d8b320ed4d56a55aeaa5bbc5",
    "lfs.h": "ff39691c9ca0b57e084aa1e6d5857602f12b2dca",
    "buffer.c": "7009615dda4043fe2a3d997aafcddbed4e47ffc3",
    "buffer.h": "c92b9a684d912cabd2c3700c6996c2993a70af88",
    "crypto-gnutls.c": "0d342db9aa9af06eb89aa46bb6b9ce61436539ec",
    "crypto-gnutls.h": "6215e32b4f62bcf55e1d805825e73403430b6310",
    "COPYING": "d159169d1050894d3ea3b98e1c965c4058208fe1",
    "integrity-test.tr": "5d222aaffc54e1a6fa9fcf048b65e161b87cd811",  # tests/run/ upstream
}
