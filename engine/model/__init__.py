"""The public status model: the one snapshot of the cluster, its findings, and what a face needs
to show them. A face (mars-status, ``marsadm view``, the exporters) imports this package and
nothing else of the engine; a test over the import graph holds that rule
(``tests/test_layers.py``).

What is here, by module:

* :mod:`.snapshot` — :func:`build` turns the tree into one typed, frozen :class:`Snapshot`;
  :meth:`Snapshot.to_json` and :meth:`Snapshot.from_json` are its wire form.
* :mod:`.findings` — :func:`findings`, the one verdict (WORK / TODO / HINT) on a snapshot.
* :mod:`.check` — :func:`verdict`, the monitor's verdict on the findings (exit code 0..3, its
  word, a summary line and the counts as typed :class:`PerfFigure` values), shared by
  ``mars-status --check`` and ``check_mars``.
* :mod:`.states` — the original's state names (diskstate, replstate, flags, role) of a
  :class:`Member`, :func:`held_back`: why a transfer cannot move, and :func:`role_lines`: a
  handover, a forced primary and a split brain's sides as every face shows them.
* :mod:`.units` — bytes, seconds and percentages as every face prints them; sizes as typed.
* :mod:`.client` — marsd's control socket, and :func:`read_snapshot`: the snapshot a face shows,
  also while marsd is down.
* the typed values of tree entries that the snapshot carries (log positions, versions, replay
  codes) and the few engine facts a face names (errors, the default port and state tree).
"""

from ..errors import MarsError, UsageError
from ..log.values import LogPos, ReplayCode, ReplayLink, Version
from ..peer.protocol import DEFAULT_PORT as DEFAULT_PEER_PORT
from ..tree import DEFAULT_MARS_DIR, check_name, default_host, mars_dir_from
from .check import (CHECK_CRITICAL, CHECK_LISTED, CHECK_OK, CHECK_STATES, CHECK_UNITS, CHECK_UNKNOWN, CHECK_WARNING,
                    PerfFigure, Verdict, number_text, relevant, verdict)
from .client import (CONTROL_NAME, check_readable, control_path, live_snapshot, read_snapshot, request_snapshot,
                     stream_events)
from .findings import CODES, HANDOVER_STALL_WINDOWS, LEVELS, URGENT, Finding, findings, worst
from .snapshot import (ALIVE_WINDOW_S, Actual, Counters, Histogram, LogFileStatus, Message, NodeResource, NodeStatus,
                       ExchangeCounters, Progress, ResourceCounters, ResourceStatus, Snapshot, SplitBrain, Switches, TreeCache, Tunable,
                       build)
from .states import DISKSTATES, REPLSTATES, ROLES, Member, held_back, role_lines, state_name
from .tunables import SPECS as TUNABLES
from .units import figure, human_bytes, human_seconds, parse_size, percent_shown, value_text

__all__ = [
    "CHECK_CRITICAL", "CHECK_LISTED", "CHECK_OK", "CHECK_STATES", "CHECK_UNITS", "CHECK_UNKNOWN", "CHECK_WARNING",
    "PerfFigure", "Verdict", "number_text", "relevant", "verdict",
    "ALIVE_WINDOW_S", "CODES", "CONTROL_NAME", "DEFAULT_MARS_DIR", "DEFAULT_PEER_PORT", "DISKSTATES", "LEVELS",
    "REPLSTATES", "ROLES", "URGENT", "HANDOVER_STALL_WINDOWS", "Counters", "ExchangeCounters", "Histogram", "ResourceCounters", "state_name",
    "Actual", "Finding", "LogFileStatus", "LogPos", "MarsError", "Member", "Message", "NodeResource", "NodeStatus",
    "Progress", "ReplayCode", "ReplayLink", "ResourceStatus", "Snapshot", "SplitBrain", "Switches", "TreeCache",
    "Tunable", "TUNABLES",
    "UsageError", "Version",
    "build", "check_name", "check_readable", "control_path", "default_host", "figure", "findings", "held_back",
    "human_bytes", "human_seconds", "role_lines",
    "live_snapshot", "mars_dir_from", "parse_size", "percent_shown", "read_snapshot", "request_snapshot",
    "stream_events", "value_text", "worst",
]
