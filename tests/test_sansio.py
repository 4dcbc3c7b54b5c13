"""What the three protocol cores share (engine/sansio.py), and that they share it.

The NBD server, the peer link and the log reader must agree on their sentinels and on which
errors are whose fault: a caller that catches the remote kind must be safe against any input,
and a misuse of a core must never be taken for the other side's doing.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mars.engine import sansio
from mars.engine.log import format as lf
from mars.engine.nbd import protocol as nbd
from mars.engine.peer import protocol as peer
from mars.engine.sansio import (END, NEED_DATA, LocalProtocolError, ReceiveBuffer, RemoteProtocolError, show,
                                transition)


def test_one_need_data_and_one_end_for_every_core():
    assert nbd.NEED_DATA is peer.NEED_DATA is lf.NEED_DATA is NEED_DATA
    assert lf.END is END
    assert repr(NEED_DATA) == "NEED_DATA" and repr(END) == "END"
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA and pickle.loads(pickle.dumps(END)) is END


def test_remote_errors_are_the_other_sides_fault_and_local_ones_ours():
    for remote in (nbd.NbdProtocolError, peer.PeerProtocolError, lf.LogCorruption):
        assert issubclass(remote, RemoteProtocolError) and not issubclass(remote, LocalProtocolError)
    assert peer.LocalProtocolError is LocalProtocolError and issubclass(LocalProtocolError, RuntimeError)
    e = lf.LogCorruption("log-000000001-a", 64, "header-check", "header check mismatch")
    assert e.reason == "header check mismatch" and pickle.loads(pickle.dumps(e)).offset == 64


def test_every_core_refuses_bytes_after_eof_as_a_local_error():
    cores = [nbd.NbdServerConnection(lambda n: None, list),
             peer.PeerConnection(peer.Hello(host="a", cluster="c", proto=peer.PROTO_VERSION, lamport_ns=1)),
             lf.RecordReader()]
    for core in cores:
        core.receive_data(b"")
        with pytest.raises(LocalProtocolError, match="after EOF"):
            core.receive_data(b"x")


def test_a_transition_the_table_lacks_is_a_local_error():
    table = {"a": {"go": "b"}, "b": {}}
    assert transition(table, "demo", "a", "go") == "b"
    with pytest.raises(LocalProtocolError, match="demo: no transition 'go' from state 'b'"):
        transition(table, "demo", "b", "go")


def test_show_cuts_long_values():
    assert show("x") == "'x'"
    long = show("y" * 500)
    assert len(long) == 80 and long.endswith("...")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=9000), min_size=1, max_size=12), st.data())
def test_take_after_is_skip_then_take(chunks, data):
    """The NBD hot path's one-call form gives what the two calls give, however the bytes came."""
    total = sum(map(len, chunks))
    skip = data.draw(st.integers(0, total))
    n = data.draw(st.integers(0, total - skip))
    a, b = ReceiveBuffer(), ReceiveBuffer()
    for c in chunks:
        a.append(c)
        b.append(c)
    got = a.take_after(skip, n)
    b.skip(skip)
    assert got == b.take(n)
    assert (a.avail, a.consumed) == (b.avail, b.consumed)
    assert a.take(a.avail) == b.take(b.avail)


def test_the_cores_do_not_keep_buffers_of_their_own():
    assert not hasattr(nbd, "_ReceiveBuffer") and not hasattr(peer, "_ReceiveBuffer")
    assert sansio.ReceiveBuffer is nbd.ReceiveBuffer is peer.ReceiveBuffer
