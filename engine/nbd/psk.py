"""TLS-PSK for the NBD export: pre-shared keys as qemu (tls-creds-psk), libnbd (tls-psk-file) and
nbdkit (--tls-psk) use them, in their file format: one ``identity:hexkey`` a line.

Python's ssl module has no PSK API before 3.13, and even 3.13's cannot choose the TLS 1.3 cipher
suites, which a PSK server needs: OpenSSL uses an external PSK only in a SHA-256 suite, and by
default a server picks TLS_AES_256_GCM_SHA384 first, so the PSK would be declined. No maintained
library fills the gap for asyncio's TLS (pyOpenSSL has no PSK and no asyncio transport; sslpsk3
is a C extension built at install time that patches each SSL object at handshake time). So this
module calls the two OpenSSL functions that are missing, ``SSL_CTX_set_psk_server_callback`` and
``SSL_CTX_set_ciphersuites``, through ctypes on the SSL_CTX of an ordinary ``ssl.SSLContext``:
TLS itself stays OpenSSL's, asyncio's start_tls runs it as for X.509. The SSL_CTX pointer is the
first field of CPython's context object; that is checked against OpenSSL before anything is set
(SSL_CTX_get_options must return the context's options), so a Python whose layout differs gets a
clear refusal, never a crash.

The same context keeps the node's X.509 certificate: a client that offers a known PSK is let in
by it (TLS 1.3 then sends no certificates at all), any other must show a certificate of the
cluster CA as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import ssl
import stat
from pathlib import Path

from ..errors import MarsError

log = logging.getLogger("mars.nbd")

#: OpenSSL takes an external PSK only with a SHA-256 TLS 1.3 suite (RFC 8446 4.2.11: its hash
#: defaults to SHA-256), and the server chooses the suite before it looks at the PSK.
PSK_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
#: What OpenSSL copies a key into (PSK_MAX_PSK_LEN).
MAX_KEY_BYTES = 512
_LINE = re.compile(r"^([^:\s]+):([0-9A-Fa-f]+)$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                             ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)


class PskError(MarsError):
    """The PSK file is unusable, or this Python's ssl module cannot be given PSKs."""


def load_psk_file(path: Path) -> dict[str, bytes]:
    """identity -> key. Refused when others may read it (as ssh refuses a private key), when a
    line is not ``identity:hexkey``, or when an identity repeats (which key would count?)."""
    path = Path(path)
    remedy = f"write it as qemu and nbdkit read it, one 'identity:hexkey' a line, mode 0600 (psktool -u NAME -p {path})"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read().decode("ascii")
    except FileNotFoundError:
        raise PskError(f"PSK file {path} does not exist", remedy) from None
    except UnicodeDecodeError:
        raise PskError(f"PSK file {path} is not ASCII text", remedy) from None
    except OSError as e:
        raise PskError(f"cannot read PSK file {path}: {e.strerror}", "run marsd as the user that owns it") from None
    if stat.S_IMODE(mode) & 0o077:
        raise PskError(f"PSK file {path} is accessible by other users (mode {stat.S_IMODE(mode):04o})",
                       f"run 'chmod 600 {path}'; if others may have read it, make new keys")
    keys: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None or len(m.group(2)) % 2 or not _NAME.match(m.group(1)):
            raise PskError(f"PSK file {path} line {n} is not 'identity:hexkey'", remedy)
        name, key = m.group(1), bytes.fromhex(m.group(2))
        if not 16 <= len(key) <= MAX_KEY_BYTES:
            raise PskError(f"PSK file {path} line {n}: the key of {name!r} is {len(key)} bytes",
                           "use 16 to 512 bytes of random key (psktool makes 32)")
        if name in keys:
            raise PskError(f"PSK file {path} names {name!r} twice", "keep one line per identity")
        keys[name] = key
    if not keys:
        raise PskError(f"PSK file {path} holds no key", remedy)
    return keys


def _libssl() -> ctypes.CDLL:
    """The libssl the ssl module itself uses: already loaded, so dlopen hands out the same one."""
    import _ssl  # noqa: F401  (loads libssl into the process first)
    for name in ("libssl.so.3", ctypes.util.find_library("ssl")):
        if name:
            try:
                lib = ctypes.CDLL(name)
                lib.SSL_CTX_get_options  # noqa: B018  (raises if this is not libssl)
                return lib
            except (OSError, AttributeError):
                continue
    raise PskError("cannot find libssl for TLS-PSK", "install OpenSSL 3 (libssl3), or use X.509 client certificates")


def _ssl_ctx_pointer(lib: ctypes.CDLL, ctx: ssl.SSLContext) -> int:
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    if not ptr or lib.SSL_CTX_get_options(ptr) != ctx.options:
        raise PskError("this Python's ssl module does not lay out its contexts as expected, so TLS-PSK "
                       "cannot be switched on", "use X.509 client certificates ('marsadm export-client-cert')")
    return ptr


def add_psk(ctx: ssl.SSLContext, keys: dict[str, bytes]) -> None:
    """Let ``ctx`` (a TLS 1.3 server context) accept the clients of ``keys`` by PSK as well.

    The callback object is kept on the context: OpenSSL holds only its address.
    """
    lib = _libssl()
    ptr = _ssl_ctx_pointer(lib, ctx)
    lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    if lib.SSL_CTX_set_ciphersuites(ptr, PSK_SUITES.encode()) != 1:
        raise PskError("OpenSSL refused the TLS 1.3 cipher suites for PSK", "use X.509 client certificates")

    # SSL pointer -> identity, for psk_identity(): OpenSSL keeps no identity for a TLS 1.3
    # external PSK. Entries of failed handshakes are dropped oldest first, so it stays small.
    seen: dict[int, str] = {}

    def find(ssl_ptr: int, identity: bytes | None, out, max_len: int) -> int:
        # Never let an exception out: ctypes would print a traceback and return garbage.
        try:
            name = (identity or b"").decode("utf-8", "replace")
            key = keys.get(name)
            if key is None or len(key) > max_len:
                log.warning("nbd client: unknown PSK identity %r; it falls back to a certificate, or fails", name)
                return 0
            ctypes.memmove(out, key, len(key))
            seen.pop(ssl_ptr, None)
            seen[ssl_ptr] = name
            while len(seen) > 1024:
                del seen[next(iter(seen))]
            return len(key)
        except Exception:  # noqa: BLE001
            return 0

    callback = _CALLBACK(find)
    lib.SSL_CTX_set_psk_server_callback.restype = None
    lib.SSL_CTX_set_psk_server_callback.argtypes = [ctypes.c_void_p, _CALLBACK]
    lib.SSL_CTX_set_psk_server_callback(ptr, callback)
    ctx._mars_psk_callback = callback  # type: ignore[attr-defined]
    ctx._mars_psk_ctx = ptr  # type: ignore[attr-defined]
    ctx._mars_psk_seen = seen  # type: ignore[attr-defined]


def psk_identity(ssl_object: ssl.SSLObject) -> str | None:
    """The PSK identity an established connection was let in by, None if by certificate.

    The SSL pointer of CPython's SSL object is its field after the socket reference; checked
    the same way as the context pointer (the SSL must belong to our SSL_CTX), else None. A TLS
    1.3 handshake that used a PSK counts as a resumed session in OpenSSL.
    """
    ctx_ptr = getattr(ssl_object.context, "_mars_psk_ctx", None)
    inner = getattr(ssl_object, "_sslobj", None)
    if ctx_ptr is None or inner is None:
        return None
    lib = _libssl()
    ssl_ptr = ctypes.c_void_p.from_address(id(inner) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)).value
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    if not ssl_ptr or lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
        return None
    name = ssl_object.context._mars_psk_seen.pop(ssl_ptr, None)
    lib.SSL_session_reused.restype = ctypes.c_int
    lib.SSL_session_reused.argtypes = [ctypes.c_void_p]
    return name if lib.SSL_session_reused(ssl_ptr) == 1 else None
