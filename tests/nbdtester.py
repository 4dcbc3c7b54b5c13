"""The NBD reference project's own test client, ``nbd-tester-client``, against marsd.

The C sources are vendored byte-identical in ``tests/nbdtester/`` (see its README); this module
builds them with ``cc`` once per test session, runs the tester with its process group cleaned up
afterwards (in TLS mode it forks a proxy child), and writes the transaction files its integrity
test (``-i -t FILE``) replays.

The transaction file is upstream's format (``make-integrityhuge.c``): a request record
(``struct nbd_request``: magic, type, cookie, offset, length, big-endian) and a reply record
(``struct nbd_reply``) per transaction, ending with NBD_CMD_DISC. The tester gives each request
a sequence number in file order, fills every 512-byte block it writes with ``makebuf(seq,
block)``, and checks every block it reads against the sequence number of the last write to that
block that the server acknowledged. Since it holds back a request that overlaps one in flight
(and everything queued behind it), the image the server must hold at the end is a pure function
of the file: :func:`Trace.expected_image` computes it, so a test can compare the export byte for
byte after the tester is gone, also across a marsd crash.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parent / "nbdtester"
SOURCES = ("nbd-tester-client.c", "cliserv.c", "buffer.c", "crypto-gnutls.c")
#: What the build needs from Debian; the Makefile's APT_PKGS installs them (make deps).
BUILD_DEPS = "gcc pkg-config libglib2.0-dev libgnutls28-dev"

REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
CMD_FLAG_FUA = 1 << 16
BLOCK = 512  # the tester's unit: it walks every request in 512-byte blocks


class BuildError(RuntimeError):
    pass


def build(out_dir: Path) -> Path:
    """Compile nbd-tester-client with glib and GnuTLS (TLS mode) into ``out_dir``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or shutil.which("pkg-config") is None:
        raise BuildError(f"nbd-tester-client: no C compiler or pkg-config; 'make deps' installs {BUILD_DEPS}")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "glib-2.0", "gnutls"],
                           capture_output=True, text=True)
    if flags.returncode != 0:
        raise BuildError(f"nbd-tester-client: pkg-config finds no glib-2.0/gnutls ({flags.stderr.strip()}); "
                         f"'make deps' installs {BUILD_DEPS}")
    out = out_dir / "nbd-tester-client"
    # -I SRC: the sources include "config.h" (ours) and <cliserv.h> with angle brackets.
    cmd = [cc, "-O2", "-g", "-std=gnu11", "-I", str(SRC), *(str(SRC / s) for s in SOURCES), "-o", str(out),
           *flags.stdout.split()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise BuildError(f"nbd-tester-client: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return out


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return f"nbd-tester-client {' '.join(self.args)} exited {self.returncode}:\n{self.output}"


@dataclass
class Tester:
    binary: Path
    __test__ = False  # not a pytest test class, whatever its name

    def run(self, *args: str, timeout: float = 120) -> Result:
        """Run the tester; whatever it leaves behind in its process group (the TLS proxy child
        it forks) is killed, also when it times out."""
        env = {**os.environ, "NBD_TEST_SILENT": "1"}  # no progress line per request
        proc = subprocess.Popen([str(self.binary), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        return Result(list(args), proc.returncode, out, err)


_M = (1 << 64) - 1
_ADD = [(0xFEEDA1ECDEADBEEF + i + (i << 56)) & _M for i in range(BLOCK // 8)]
_PACK = struct.Struct(f"<{BLOCK // 8}Q").pack


def makebuf(seq: int, block: int) -> bytes:
    """The tester's ``makebuf()``: the 512 bytes it writes to ``block`` in request ``seq``
    (zeroes for seq 0, a block never written), in native byte order: little-endian here."""
    if seq == 0:
        return bytes(BLOCK)
    x = (block ^ (seq << 32) ^ (seq >> 32)) & _M
    mix = 0xAA55AA55AA55AA55 ^ seq
    words = []
    for add in _ADD:
        words.append(x)
        x = (x + add) & _M
        s = x & 63
        # C's x >> 64 (s == 0) is undefined; x86-64 and arm64 shift by the count mod 64: x itself.
        x ^= ((x << s) & _M) ^ ((x >> (64 - s)) if s else x) ^ mix
    return _PACK(*words)


@dataclass
class Trace:
    """A transaction file for ``nbd-tester-client -i -t`` and what it leaves on the export."""

    path: Path
    size: int
    requests: int = 0
    reads: int = 0
    writes: int = 0
    fua: int = 0
    flushes: int = 0
    last_write: dict[int, int] = field(default_factory=dict)  # block -> seq of the last write

    def expected_image(self) -> bytes:
        return b"".join(makebuf(self.last_write.get(b, 0), b) for b in range(self.size // BLOCK))

    def expected_sha256(self) -> str:
        return hashlib.sha256(self.expected_image()).hexdigest()


def read_trace(path: Path, size: int) -> Trace:
    """Account for a transaction file someone else wrote (upstream's integrity-test.tr): parsed
    the way the tester reads it, requests numbered from 1 in file order, replies skipped."""
    data = path.read_bytes()
    t = Trace(path, size)
    pos, seq = 0, 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == REPLY_MAGIC:
            pos += 16
            continue
        if magic != REQUEST_MAGIC:
            raise ValueError(f"{path}: byte {pos}: magic {magic:#010x} is neither a request nor a reply")
        _, command, _, offset, length = struct.unpack_from(">IIQQI", data, pos)
        pos += 28
        seq += 1
        if command & 0xFFFF == CMD_DISC:
            break  # the tester reads no further
        t.requests += 1
        kind = command & 0xFFFF
        if kind in (CMD_READ, CMD_WRITE):
            if length % BLOCK or offset % BLOCK or offset + length > size:
                raise ValueError(f"{path}: request {seq}: {length} bytes at {offset} do not fit {size}")
        if kind == CMD_READ:
            t.reads += 1
        elif kind == CMD_WRITE:
            t.writes += 1
            t.fua += bool(command & CMD_FLAG_FUA)
            for b in range(offset // BLOCK, (offset + length) // BLOCK):
                t.last_write[b] = seq
        elif kind == CMD_FLUSH:
            t.flushes += 1
    return t


def write_trace(path: Path, size: int, requests: list[tuple[int, int, int]]) -> Trace:
    """A transaction file of these (command, offset, length) requests, then NBD_CMD_DISC."""
    records = []
    for cookie, (command, offset, length) in enumerate(requests, 1):
        records.append(struct.pack(">IIQQI", REQUEST_MAGIC, command, cookie, offset, length))
        records.append(struct.pack(">IIQ", REPLY_MAGIC, 0, cookie))
    records.append(struct.pack(">IIQQI", REQUEST_MAGIC, CMD_DISC, 0, 0, 0))
    path.write_bytes(b"".join(records))
    return read_trace(path, size)


def make_trace(path: Path, size: int, transactions: int, seed: int, max_len: int = 256 << 10) -> Trace:
    """Random reads, writes, FUA writes and flushes over an export of ``size`` bytes, then a read
    of every block, so the tester itself checks the whole export against the last write to each
    block. Lengths and offsets are multiples of 512, as the tester requires; the mix is
    make-integrityhuge's idea at a size that replays in seconds and reads back far more of what
    it wrote (upstream's integrity-test.tr, a trace of mkfs, tar and dbench on ext3, reads 105
    times in 68990 requests)."""
    assert size % BLOCK == 0 and max_len % BLOCK == 0
    rng = random.Random(seed)
    requests = []
    for _ in range(transactions):
        roll = rng.random()
        if roll < 0.03:
            requests.append((CMD_FLUSH, 0, 0))
            continue
        length = rng.randrange(1, min(max_len, size) // BLOCK + 1) * BLOCK
        offset = rng.randrange(0, (size - length) // BLOCK + 1) * BLOCK
        command = CMD_READ if roll < 0.45 else CMD_WRITE | CMD_FLAG_FUA if roll < 0.50 else CMD_WRITE
        requests.append((command, offset, length))
    requests += [(CMD_READ, offset, min(128 << 10, size - offset)) for offset in range(0, size, 128 << 10)]
    return write_trace(path, size, requests)


def make_self_signed(out_dir: Path, name: str = "mallory") -> tuple[Path, Path]:
    """A self-signed client certificate and key, trusted by nobody (upstream's tlswrongcert test
    uses one it ships; this one is made fresh, so it never expires)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / "selfsigned-cert.pem", out_dir / "selfsigned-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path
