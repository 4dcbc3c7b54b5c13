"""The client half of marsd's control socket, and the one way a face gets its snapshot.

Every face (``marsadm view``, mars-status, the exporters) shows the snapshot *this* node's tree
knows, with marsd's live figures when it answers and without them when it does not: a status
tool that stops working when the daemon is down is no use on the day the daemon is the
problem. :func:`read_snapshot` is that rule, once; :func:`request_snapshot` and
:func:`stream_events` speak the socket's protocol (newline-delimited JSON, described in
:mod:`mars.engine.daemon.control`, the server half).

Blocking calls on purpose: the callers are command-line tools and worker threads.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import MarsError
from ..tree import Tree, require_cluster
from . import snapshot as model

__all__ = ["CONTROL_NAME", "check_readable", "control_path", "live_snapshot", "read_snapshot",
           "request_snapshot", "stream_events"]

CONTROL_NAME = "control.sock"


def control_path(mars_dir: str | os.PathLike[str]) -> Path:
    return Path(mars_dir) / CONTROL_NAME


def _connect(mars_dir: str | os.PathLike[str], timeout: float | None) -> socket.socket:
    """A connection to marsd's control socket; PermissionError becomes a MarsError with the remedy."""
    path = control_path(mars_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except PermissionError:
        s.close()
        raise MarsError(f"{path}: permission denied", "marsd's status is for root only; run the tool as root") from None
    except BaseException:
        s.close()
        raise
    return s


def request_snapshot(mars_dir: str | os.PathLike[str], timeout: float = 2.0,
                     cmd: str = "snapshot") -> dict[str, Any] | None:
    """marsd's latest snapshot reply, or None when marsd does not answer (not running, no socket,
    refused, no reply within ``timeout`` seconds, or a reply that is not one).

    A tool then shows what the tree knows and says marsd is down; only "permission denied" raises
    (MarsError), because then the tree is not readable either and the remedy is to be root.
    """
    deadline = time.monotonic() + timeout
    try:
        with _connect(mars_dir, timeout) as s:
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            data = _read_to_eof(s, deadline)
    except (OSError, TimeoutError):
        return None
    try:
        reply = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return None
    return reply if isinstance(reply, dict) and ("snapshot" if cmd == "snapshot" else "counters") in reply else None


def _read_to_eof(s: socket.socket, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("marsd did not finish its reply in time")
        s.settimeout(remaining)
        chunk = s.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def stream_events(mars_dir: str | os.PathLike[str], timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """The snapshot line, then every event marsd publishes, as dicts, until marsd closes the stream.

    ``timeout`` bounds each wait for a line (TimeoutError ends the stream; None waits forever).
    A ``{"kind": "lagged"}`` item means marsd dropped this reader; reconnect to resume. Raises
    MarsError when marsd's control socket does not answer at all.
    """
    try:
        s = _connect(mars_dir, timeout)
    except OSError as e:
        raise MarsError(f"marsd does not answer on {control_path(mars_dir)}: {e.strerror or e}",
                        "start marsd (the tree can still be read without it)") from None
    with s, s.makefile("rb") as f:
        s.sendall(b'{"cmd":"events"}\n')
        for line in f:
            yield json.loads(line)


def live_snapshot(mars_dir: str | os.PathLike[str], host: str, timeout: float = 2.0,
                  window_s: float | None = None, lines: bool = True,
                  cache: model.TreeCache | None = None) -> tuple[model.Snapshot, bool]:
    """The snapshot a tool shows: built from the local tree, with marsd's debug lines (unless
    ``lines`` is False: then only its counters are asked for) and counters when it answers.

    The bool says whether this host's marsd answered, so a tool can say "marsd is down; showing
    what the tree knows". A marsd that answers for another host (``--host <dead>`` on a survivor)
    does not count: its lines are not that host's.
    """
    if lines:
        reply = request_snapshot(mars_dir, timeout)
        snap_json = reply.get("snapshot") if reply else None
        answered = isinstance(snap_json, dict) and snap_json.get("local_host") == host
        debug = [str(x) for x in snap_json.get("debug_lines") or []] if isinstance(snap_json, dict) and answered else []
    else:
        reply = request_snapshot(mars_dir, timeout, cmd="counters")
        answered = reply is not None and reply.get("local_host") == host
        debug = []
    counters = _counters(reply.get("counters")) if reply and answered else None
    window = model.ALIVE_WINDOW_S if window_s is None else window_s
    return model.build(mars_dir, host, window_s=window, debug_lines=debug, counters=counters, cache=cache), answered


def _counters(doc: Any) -> model.Counters | None:
    """marsd's counters from its reply, or None when it sent none (an older marsd) or they do not
    fit: the counters are an addition to the status, never a reason to show none."""
    if doc is None:
        return None
    try:
        c: model.Counters = model._from_json(model.Counters, doc, "counters")
        return c
    except (TypeError, ValueError):
        return None


def check_readable(mars_dir: str | os.PathLike[str], host: str) -> None:
    """Raise MarsError (naming the remedy) unless ``mars_dir`` holds a cluster this user may read."""
    mars_dir = Path(mars_dir)
    if not mars_dir.exists():
        raise MarsError(f"{mars_dir} does not exist",
                        f"give the state tree with --mars-dir (or MARS_DIR), or create a cluster: "
                        f"'marsadm --mars-dir {mars_dir} create-cluster'")
    if not mars_dir.is_dir():
        raise MarsError(f"{mars_dir} is not a directory", "give the state tree with --mars-dir (or MARS_DIR)")
    if not os.access(mars_dir, os.R_OK | os.X_OK):
        raise MarsError(f"{mars_dir}: permission denied", "the state tree is for root only; run the tool as root")
    require_cluster(Tree(mars_dir, host))


def read_snapshot(mars_dir: str | os.PathLike[str], host: str, window_s: float | None = None,
                  timeout: float = 2.0, lines: bool = True,
                  cache: model.TreeCache | None = None) -> tuple[model.Snapshot, bool]:
    """The snapshot a face shows and whether this host's marsd answered; MarsError when the state
    cannot be read at all (no tree, no cluster, permission denied), never an OSError."""
    check_readable(mars_dir, host)
    try:
        return live_snapshot(mars_dir, host, timeout=timeout, window_s=window_s, lines=lines, cache=cache)
    except OSError as e:
        raise MarsError(f"{mars_dir}: cannot read the state tree: {e.strerror or e}",
                        "check the path and its permissions (run as root)") from None
