"""The cluster credential and the TLS contexts of peer links (port 7777).

The original accepted any connection on 7777, so anyone who could reach the port could feed a
node tree entries and log data and, through them, act as root on it. Here every peer link is
mutually authenticated TLS 1.3 against a CA that belongs to the cluster alone:

* ``marsadm create-cluster`` makes the cluster CA (EC P-256: accepted for TLS 1.3 by every
  OpenSSL 3 and cheap to sign and verify, unlike RSA).
* The *cluster credential* is the CA certificate plus the CA private key (``secret.pem``). A
  joining node gets it as a file or as a pasteable token and then issues its own node
  certificate locally.
* A link is accepted only if the other side presents a certificate signed by the same CA; a host
  without the credential does not get past the handshake, so it learns nothing and changes
  nothing.

Why the CA key travels instead of an enrollment protocol (a CSR signed by a member): enrollment
needs a round trip over a channel that is not yet authenticated, plus a way to authorise it, which
would be a shared secret anyway. Shipping the CA key keeps exactly one secret to protect, makes
joining work while every other node is down, and needs no code that talks to unauthenticated
peers. The price is that every member can mint certificates: membership *is* full trust, as it
was for root on any node of the original. Node certificates still name their host (CN and SAN),
so the name a peer claims on a link is the name a member certified for it (``peer_host``), and a
node cannot pass itself off as another host by accident or by a stale tree.

Files, in ``<mars-dir>/cluster`` (never replicated, see ``tree.LOCAL_DIRS``), directory 0700,
every file 0600: ``ca.pem`` (the trust anchor), ``secret.pem`` (CA certificate + CA key),
``node-<host>.pem`` / ``node-<host>.key`` (this node's identity).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import os
import re
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import MarsError
from .tree import check_name, fsync_dir, make_dirs

CRED_DIR = "cluster"
CA_FILE = "ca.pem"
SECRET_FILE = "secret.pem"
LOCK_FILE = ".lock"
TOKEN_PREFIX = "mars1."
#: The subject's OU of NBD client certificates ('marsadm export-client-cert'): peer links refuse it.
NBD_CLIENT_OU = "MARS NBD client"

# The CA outlives any node certificate it signs, so the only renewal ever needed is a node's own,
# which each node does by itself.
CA_VALIDITY = dt.timedelta(days=100 * 365)
NODE_VALIDITY = dt.timedelta(days=10 * 365)
RENEW_BEFORE = dt.timedelta(days=30)
# Certificates are checked against the *peer's* clock: back-date them so that a node whose clock
# is a little behind the issuer's does not reject a certificate issued a moment ago.
BACKDATE = dt.timedelta(days=1)

_JOIN_HINT = "run 'marsadm create-cluster' for a new cluster, or 'marsadm join-cluster <peer> --secret-file F'"
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----\r?\n?", re.S)


class CredentialError(MarsError):
    """The cluster credential is missing, damaged or unusable; the remedy says how to get a good one."""


# -- paths and files ----------------------------------------------------------------------------


def cred_dir(mars_dir: Path) -> Path:
    return Path(mars_dir) / CRED_DIR


def node_paths(mars_dir: Path, host: str) -> tuple[Path, Path]:
    d = cred_dir(mars_dir)
    check_name("host", host)  # it becomes a file name
    return d / f"node-{host}.pem", d / f"node-{host}.key"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _not_after(cert: x509.Certificate) -> dt.datetime:
    # cryptography >= 42 has the aware variant and deprecates the naive one; older ones only
    # have the naive one (which is UTC).
    aware = getattr(cert, "not_valid_after_utc", None)
    return aware if aware is not None else cert.not_valid_after.replace(tzinfo=dt.timezone.utc)


def _read(path: Path, what: str, *, private: bool = False) -> bytes:
    """Read a credential file; a key others can read is refused, as ssh does, because by then it
    may already be in someone else's hands and silently using it would hide that."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except FileNotFoundError:
        raise CredentialError(f"no {what} in {path.parent} ({path.name} is missing)", _JOIN_HINT) from None
    except OSError as e:
        raise CredentialError(f"cannot read {what} {path}: {e.strerror}",
                              "run as the user that owns the mars directory (normally root)") from None
    if private and stat.S_IMODE(mode) & 0o077:
        raise CredentialError(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):04o})",
            f"run 'chmod 600 {path}'; if others may have read it, treat the credential as leaked")
    return data


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with mode 0600: a crash or a concurrent reader sees the old or
    the new file, never a half-written key."""
    tmp = path.with_name(f".tmp-{path.name}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # independent of the umask
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(mars_dir: Path, *, create: bool) -> Iterator[Path]:
    """Serialise writers (marsadm and marsd both call ``ensure_node_cert``): without it two
    issuers could leave one's key next to the other's certificate."""
    d = cred_dir(mars_dir)
    if create:
        try:
            make_dirs(d)
            os.chmod(d, 0o700)
        except OSError as e:
            raise CredentialError(f"cannot create {d}: {e.strerror}",
                                  "run as root, or give a writable --mars-dir") from None
    elif not d.is_dir():
        raise CredentialError(f"no cluster credential in {d}", _JOIN_HINT)
    try:
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise CredentialError(f"cannot lock {d}: {e.strerror}",
                              "run as the user that owns the mars directory (normally root)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield d
    finally:
        os.close(fd)


# -- parsing and checking -----------------------------------------------------------------------


def _pem_blocks(data: bytes) -> dict[bytes, list[bytes]]:
    blocks: dict[bytes, list[bytes]] = {}
    for m in _PEM_RE.finditer(data):
        blocks.setdefault(m.group(1), []).append(m.group(0))
    return blocks


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_der(key: object) -> bytes:
    """The public half in one comparable form, whether given a private or a public key."""
    pub = key.public_key() if hasattr(key, "private_bytes") else key  # type: ignore[attr-defined]
    return pub.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_cert(data: bytes, where: str) -> x509.Certificate:
    certs = _pem_blocks(data).get(b"CERTIFICATE", [])
    if len(certs) != 1:
        raise ValueError(f"{where} holds {len(certs)} certificates, expected exactly one")
    return x509.load_pem_x509_certificate(certs[0])


def _parse_secret(secret: bytes, where: str = "the secret") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key of a cluster credential, or a CredentialError saying what is
    wrong with it in terms an operator can check (truncated paste, wrong file, wrong key)."""
    remedy = ("export it again on a member with 'marsadm export-secret' (or --token) and copy it whole; "
              "it must be the cluster secret, not a node certificate")
    if not isinstance(secret, bytes | bytearray) or not secret.strip():
        raise CredentialError(f"{where} is empty", remedy)
    blocks = _pem_blocks(bytes(secret))
    certs = blocks.get(b"CERTIFICATE", [])
    keys = blocks.get(b"PRIVATE KEY", []) + blocks.get(b"EC PRIVATE KEY", [])
    if b"ENCRYPTED PRIVATE KEY" in blocks:
        raise CredentialError(f"{where} holds an encrypted key", "give the secret as exported, unencrypted")
    if len(certs) != 1 or len(keys) != 1:
        truncated = b"-----BEGIN" in secret and secret.count(b"-----BEGIN") != secret.count(b"-----END")
        what = (f"{where} is truncated" if truncated else
                f"{where} is not a MARS cluster secret (found {len(certs)} certificate(s) and {len(keys)} "
                f"private key(s), expected one CA certificate and its key)")
        raise CredentialError(what, remedy)
    try:
        cert = x509.load_pem_x509_certificate(certs[0])
    except ValueError as e:
        raise CredentialError(f"{where}: the CA certificate does not parse ({e})", remedy) from None
    try:
        key = serialization.load_pem_private_key(keys[0], password=None)
    except (ValueError, TypeError) as e:
        raise CredentialError(f"{where}: the CA key does not parse ({e})", remedy) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{where}: the CA key is a {type(key).__name__}, not an EC key", remedy)
    if _public_der(key) != _public_der(cert.public_key()):
        raise CredentialError(f"{where}: the private key does not belong to the CA certificate",
                              "the two halves come from different clusters; " + remedy)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CredentialError(f"{where}: the certificate is not a CA certificate "
                              f"(subject {cert.subject.rfc4514_string()})", remedy)
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CredentialError(f"{where}: the CA certificate may not sign certificates", remedy)
    except x509.ExtensionNotFound:
        pass
    if _not_after(cert) <= _now():
        raise CredentialError(f"{where}: the cluster CA expired on {_not_after(cert):%Y-%m-%d}",
                              "create a new cluster ('marsadm create-cluster') and join every node to it")
    return cert, key


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    pub = ca.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except InvalidSignature:
        return False
    return True


def _sans(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


def _pair_ok(cert_path: Path, key_path: Path, ca: x509.Certificate, host: str,
             sans: set[x509.GeneralName] | None = None) -> bool:
    """Whether the files are a usable pair for ``host`` (and exactly ``sans``, when given) under
    ``ca``; anything else, including a half-written pair from a crash, is simply issued again."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = _load_cert(cert_path.read_bytes(), str(cert_path))
        key = serialization.load_pem_private_key(_read(key_path, "node key", private=True), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if _public_der(key) != _public_der(cert.public_key()):
        return False
    if not _issued_by(cert, ca):
        return False
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [host]:
        return False
    if sans is not None and _sans(cert) != sans:
        return False
    # Renew 30 days ahead, but never chase a date the CA itself cannot reach.
    return _not_after(cert) >= min(_now() + RENEW_BEFORE, _not_after(ca))


# -- issuing ------------------------------------------------------------------------------------


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _make_ca(cluster_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MARS"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"MARS cluster {cluster_name}"[:64])])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(_ski(key), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _issue_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, subject: x509.Name,
                sans: list[x509.GeneralName], usages: list[x509.ObjectIdentifier],
                validity: dt.timedelta = NODE_VALIDITY) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + validity, _not_after(ca))
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(ca.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(not_after))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = (builder
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(_ski(key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _issue_node_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, host: str,
                     validity: dt.timedelta = NODE_VALIDITY) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    # Every node is both a server (it accepts links) and a client (it opens them).
    return _issue_cert(ca, ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]),
                       [x509.DNSName(host)], [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                       validity)


def _install(d: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
    # secret.pem first: if we crash in between, ca.pem still names the old CA and the next
    # install or ensure_node_cert notices the mismatch instead of trusting a CA without its key.
    _write(d / SECRET_FILE, _pem(ca) + _pem(ca_key))
    _write(d / CA_FILE, _pem(ca))
    fsync_dir(d)


# -- the API ------------------------------------------------------------------------------------


def create_cluster_credential(mars_dir: Path, cluster_name: str, force: bool = False) -> None:
    """Make a new cluster CA. Refused over an existing one unless ``force``: replacing it cuts
    this node off from every node that still holds the old one."""
    with _locked(mars_dir, create=True) as d:
        if not force and ((d / CA_FILE).exists() or (d / SECRET_FILE).exists()):
            raise CredentialError(f"{d} already holds a cluster credential (CA {_fingerprint_file(d)})",
                                  "nothing to do; pass --force to replace it, which cuts this node off "
                                  "from the nodes of the old cluster")
        ca, ca_key = _make_ca(cluster_name)
        _install(d, ca, ca_key)


def export_secret(mars_dir: Path) -> bytes:
    """The cluster credential, checked, so that a damaged one fails here and not on the joining node."""
    path = cred_dir(mars_dir) / SECRET_FILE
    data = _read(path, "cluster secret", private=True)
    _parse_secret(data, str(path))
    return data


def secret_to_token(secret: bytes) -> str:
    """One line without padding or characters a shell or terminal would mangle, with a prefix so
    that a wrong paste is recognised as such and the format can change later."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")


def token_to_secret(token: str) -> bytes:
    remedy = "copy the whole line printed by 'marsadm export-secret --token' on a member"
    t = "".join(str(token).split())  # a terminal may have wrapped it
    if not t.startswith(TOKEN_PREFIX):
        raise CredentialError(f"the token does not start with {TOKEN_PREFIX!r}, so it is not a MARS cluster token",
                              remedy)
    body = t[len(TOKEN_PREFIX):]
    if not body or not re.fullmatch(r"[A-Za-z0-9_-]+", body) or len(body) % 4 == 1:
        raise CredentialError("the token is damaged (not base64url, or cut short)", remedy)
    try:
        secret = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise CredentialError("the token is damaged (not base64url)", remedy) from None
    try:
        _parse_secret(secret, "the token")
    except CredentialError as e:
        raise CredentialError(e.what, remedy) from None
    return secret


def install_secret(mars_dir: Path, secret: bytes) -> None:
    """Make this node hold the cluster credential (join-cluster). Checked first, so a bad paste
    never replaces a working credential."""
    ca, ca_key = _parse_secret(secret)
    with _locked(mars_dir, create=True) as d:
        _install(d, ca, ca_key)


def _load_ca(d: Path) -> x509.Certificate:
    path = d / CA_FILE
    try:
        return _load_cert(_read(path, "cluster CA certificate"), str(path))
    except ValueError as e:
        raise CredentialError(f"the cluster CA certificate {path} is damaged ({e})",
                              "install the credential again: 'marsadm join-cluster <peer> --force --secret-file F'"
                              ) from None


def _ca_key(d: Path, ca: x509.Certificate) -> ec.EllipticCurvePrivateKey:
    """The CA key from secret.pem, checked to belong to the CA in ca.pem (the one peers trust)."""
    secret_path = d / SECRET_FILE
    ca2, ca_key = _parse_secret(_read(secret_path, "cluster secret", private=True), str(secret_path))
    if ca2 != ca:
        raise CredentialError(f"{secret_path} and {d / CA_FILE} belong to different cluster CAs",
                              "install the credential again: 'marsadm join-cluster <peer> --force --secret-file F'")
    return ca_key


def _ensure_pair(mars_dir: Path, host: str, cert_path: Path, key_path: Path, sans: list[x509.GeneralName],
                 usages: list[x509.ObjectIdentifier], exact_sans: bool) -> tuple[Path, Path]:
    with _locked(mars_dir, create=False) as d:
        ca = _load_ca(d)
        if _pair_ok(cert_path, key_path, ca, host, set(sans) if exact_sans else None):
            return cert_path, key_path
        ca_key = _ca_key(d, ca)
        cert, key = _issue_cert(ca, ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]), sans, usages)
        # Key first: a crash between the two leaves a pair that fails the check above and is
        # issued again, never an old certificate presented with a key it does not match.
        _write(key_path, _pem(key))
        _write(cert_path, _pem(cert))
        fsync_dir(d)
    return cert_path, key_path


def ensure_node_cert(mars_dir: Path, host: str) -> tuple[Path, Path]:
    """This node's certificate and key, issued (again) when missing, damaged, from another CA
    (the cluster credential was replaced) or within 30 days of expiry; otherwise untouched.
    Every node is both a server (it accepts links) and a client (it opens them)."""
    cert_path, key_path = node_paths(mars_dir, host)
    return _ensure_pair(mars_dir, host, cert_path, key_path, [x509.DNSName(host)],
                        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], exact_sans=False)


def ensure_nbd_cert(mars_dir: Path, host: str, addresses: list[str]) -> tuple[Path, Path]:
    """The certificate the NBD export shows its clients: the node's name plus the addresses (IP
    or DNS) they dial. qemu, libnbd and nbd-client (GnuTLS, all of them) check the server's certificate
    against the address they connected to, and MARS nodes have no DNS names of their own, so the
    addresses must be in it. Issued again when the set of addresses changes. Server-only, so a
    stolen copy of it opens no peer link."""
    d = cred_dir(mars_dir)
    check_name("host", host)
    sans: list[x509.GeneralName] = [x509.DNSName(host)]
    for a in dict.fromkeys(addresses):
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(a))
        except ValueError:
            san = x509.DNSName(a)
        if san not in sans:
            sans.append(san)
    return _ensure_pair(mars_dir, host, d / f"nbd-{host}.pem", d / f"nbd-{host}.key", sans,
                        [ExtendedKeyUsageOID.SERVER_AUTH], exact_sans=True)


def issue_nbd_client_cert(mars_dir: Path, name: str) -> tuple[bytes, bytes, bytes]:
    """A client certificate for the NBD export: (CA certificate, certificate, key), all PEM.

    Signed by the cluster CA, which every member holds (see the module docstring), so any member
    can issue one, with marsd up or down. The subject carries NBD_CLIENT_OU: peer links refuse
    such a certificate (``peer_host``), so a VM host that can reach a disk cannot read the tree or
    the logs of every resource, as a node certificate would let it."""
    check_name("client", name)
    with _locked(mars_dir, create=False) as d:
        ca = _load_ca(d)
        ca_key = _ca_key(d, ca)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MARS"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, NBD_CLIENT_OU),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert, key = _issue_cert(ca, ca_key, subject, [], [ExtendedKeyUsageOID.CLIENT_AUTH])
    return _pem(ca), _pem(cert), _pem(key)


#: The file names qemu's tls-creds-x509 (endpoint=client) and libnbd's tls-certificates=DIR read.
CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def export_nbd_client(mars_dir: Path, name: str, out: Path, force: bool = False) -> list[Path]:
    """Issue an NBD client certificate into directory ``out`` (made 0700 if missing) as qemu and
    libnbd expect it; the key 0600, the certificates 0644. An existing key is not overwritten
    unless ``force``: a client may be using it, and it would be cut off without a word."""
    out = Path(out)
    paths = [out / n for n in CLIENT_FILES]
    if not force and paths[2].exists():
        raise CredentialError(f"{paths[2]} already exists",
                              "choose another --out directory, or pass --force to replace the client's key")
    ca, cert, key = issue_nbd_client_cert(mars_dir, name)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, data, mode in zip(paths, (ca, cert, key), (0o644, 0o644, 0o600)):
            _write(path, data)
            os.chmod(path, mode)
    except OSError as e:
        raise CredentialError(f"cannot write {e.filename or out}: {e.strerror}",
                              "give a writable --out directory") from None
    return paths


#: TLS 1.2 suites the NBD export also takes: forward-secret key exchange and AEAD only.
NBD_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _context(mars_dir: Path, side: int, cert_path: Path, key_path: Path, tls12: bool = False) -> ssl.SSLContext:
    """TLS 1.3 only: one protocol whose handshake encrypts the certificates (host names stay off
    the wire) and leaves no cipher or version to negotiate down. ``tls12``: TLS 1.2 as well, with
    NBD_TLS12_CIPHERS (see nbd_server_context). The other side must show a certificate of the
    cluster CA, whichever side it is."""
    d = cred_dir(mars_dir)
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if tls12 else ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if tls12:
        ctx.set_ciphers(NBD_TLS12_CIPHERS)
    # Client: the name in the peer's certificate is checked by the caller against the host it
    # claims (peer_host), since peers are reached by IP address, not by a DNS name.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if side == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = 0  # links are long-lived; resumption would only add state to get wrong
    try:
        with _locked(mars_dir, create=False):  # not while another process swaps the pair
            ctx.load_verify_locations(cadata=_read(d / CA_FILE, "cluster CA certificate").decode("ascii"))
            _read(key_path, "node key", private=True)
            ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, UnicodeDecodeError) as e:
        raise CredentialError(f"cannot use the credential in {d}: {e}",
                              "install it again: 'marsadm join-cluster <peer> --force --secret-file F'") from None
    return ctx


def _node_context(mars_dir: Path, host: str, side: int) -> ssl.SSLContext:
    """The node certificate is checked (and renewed) on every call, so a long-running marsd
    never presents an expired one."""
    return _context(mars_dir, side, *ensure_node_cert(mars_dir, host))


def server_context(mars_dir: Path, host: str) -> ssl.SSLContext:
    """CERT_REQUIRED is what keeps strangers out: without it a host with no credential could
    open a link and read the tree."""
    return _node_context(mars_dir, host, ssl.PROTOCOL_TLS_SERVER)


def client_context(mars_dir: Path, host: str) -> ssl.SSLContext:
    """Verifying the server too keeps a node from handing its tree or its writes to an impostor
    that took over a peer's address."""
    return _node_context(mars_dir, host, ssl.PROTOCOL_TLS_CLIENT)


def nbd_server_context(mars_dir: Path, host: str, addresses: list[str]) -> ssl.SSLContext:
    """For the NBD export on TCP: clients show a certificate of the cluster CA (from 'marsadm
    export-client-cert', or a node's own), exactly as peers do on links. TLS 1.2 is taken too,
    unlike on links: the kernel's nbd-client asks GnuTLS for TLS 1.2 only unless told otherwise
    (its -priority default is NORMAL:-VERS-TLS-ALL:+VERS-TLS1.2); qemu and libnbd get 1.3."""
    return _context(mars_dir, ssl.PROTOCOL_TLS_SERVER, *ensure_nbd_cert(mars_dir, host, addresses), tls12=True)


def peer_host(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The host name the cluster certified for the other end of an established link.

    Only meaningful with our contexts (CERT_REQUIRED): ``getpeercert()`` returns the certificate
    only once the chain has been verified against the cluster CA.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        raise CredentialError("the peer presented no verified certificate",
                              "peer links must use server_context/client_context")
    ous = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "organizationalUnitName"]
    if NBD_CLIENT_OU in ous:
        raise CredentialError("the peer presented an NBD client certificate, which admits to the NBD export only",
                              "peer links need a node certificate: join the host with 'marsadm join-cluster'")
    cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    if len(cns) != 1:
        raise CredentialError(f"the peer's certificate names {len(cns)} hosts, expected one",
                              "re-issue it: remove node-*.pem on that peer and restart marsd")
    try:
        return check_name("host", cns[0])
    except MarsError:
        raise CredentialError(f"the peer's certificate names an invalid host {cns[0]!r}",
                              "re-issue it under a valid host name") from None


def _fingerprint_file(d: Path) -> str:
    try:
        return cluster_fingerprint(d.parent)
    except CredentialError:
        return "unreadable"


def cluster_fingerprint(mars_dir: Path) -> str:
    """Short enough to compare by eye between two nodes' logs, long enough not to collide by chance."""
    path = cred_dir(mars_dir) / CA_FILE
    try:
        ca = _load_cert(_read(path, "cluster CA certificate"), str(path))
    except ValueError as e:
        raise CredentialError(f"the cluster CA certificate {path} is damaged ({e})",
                              "install the credential again: 'marsadm join-cluster <peer> --force --secret-file F'"
                              ) from None
    return hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
