"""How marsadm and marsd find each other on one host, without a control protocol.

* ``<mars-dir>/marsd.lock`` is flock'ed by the running marsd. A held lock means marsd runs; a stale
  file after a crash means nothing, because the kernel drops the lock with the process. This also
  keeps a second marsd off the same tree.
* ``<mars-dir>/trigger.sock`` is a datagram socket marsd listens on. marsadm sends one byte after
  changing desired state so marsd reconciles at once instead of at its next periodic round (the
  original's ``/proc/sys/mars/trigger``). A lost trigger costs at most one round, never correctness.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = "marsd.lock"
TRIGGER_NAME = "trigger.sock"


def marsd_running(mars_dir: Path, host: str | None = None) -> int | None:
    """The pid of the marsd holding this tree (for ``host``, if given), or None when none runs.

    ``marsadm --host <dead> ...`` on a survivor works on the survivor's tree, where the running
    marsd is the survivor's: for the dead host no marsd runs here, and nothing is waited for.
    """
    path = mars_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            words = os.pread(fd, 256, 0).decode(errors="replace").split()
            if host is not None and len(words) > 1 and words[1] != host:
                return None
            try:
                return int(words[0]) if words else -1
            except ValueError:
                return -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def take_lock(mars_dir: Path, host: str = "") -> int | None:
    """For marsd: hold the lock for the life of the process; None when another marsd has it."""
    fd = os.open(mars_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {host}\n".encode(), 0)
    return fd


def poke(mars_dir: Path) -> None:
    """Ask marsd to reconcile now; silently nothing when it does not run."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(b"t", str(mars_dir / TRIGGER_NAME))
    except OSError:
        pass
    finally:
        s.close()
