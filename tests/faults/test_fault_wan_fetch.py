"""A secondary catching up over a long path keeps enough requests in flight to fill it.

Real marsd a and b; b's links to a cross bench/wanlink.py (an iptables DNAT of b -> a:port onto
the proxy) with a one-way delay. The fetcher's requests in flight must cover the bandwidth-delay
product: with three (the old DEPTH), 1 Gbit/s over 200 ms one way could reach at most 0.75 of the
rate (bench/bench_wan.py has the figures). Its links are pipelined now (engine/peer/link.py), so
it keeps eight requests in flight on at most two links instead of one on each of eight (eight
TCP and TLS handshakes per catch-up, three round trips each). The check here is the structural
one, not a timing on a shared machine: with a backlog of nine replies, b keeps eight requests in
flight, several of them on one link, over at most two new links, as its log says when the
backlog is done; and the copy that arrives is a's log byte for byte.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path as FsPath

sys.path.insert(0, str(FsPath(__file__).resolve().parents[2] / "bench"))
from wanlink import Nat, Path, WanLink  # noqa: E402

from campaign import report, size  # noqa: E402
from harness import Node, cleanup, sha256, short_tempdir, wait_until, write  # noqa: E402

MIB = 1 << 20


def log_files(n: Node) -> dict[str, FsPath]:
    return {p.name: p for p in (n.mars_dir / "resource-r").glob("log-*") if p.is_file()}


def test_catchup_over_a_long_path_fills_the_pipeline():
    mib = size(144, 1024, "MARS_WAN_FETCH_MIB")  # nine 16 MiB replies: a backlog for eight in flight
    base = short_tempdir()
    nodes: list[Node] = []
    nat = Nat()
    delay = 0.1
    try:
        a, b = Node(base, "a", "127.0.0.2"), Node(base, "b", "127.0.0.3")
        nodes += [a, b]
        a.create_cluster()
        a.start()
        b.join_cluster(a)
        with WanLink(("127.0.0.1", 0), (a.ip, a.port), Path(delay), Path(delay)).thread() as link:
            nat.dnat(b.ip, a.ip, a.port, f"127.0.0.1:{link.port}")
            b.start()
            a.marsadm("create-resource", "r", str(base / "a.img"), f"{mib + 16}M")
            wait_until(lambda: b.tree_value("resource-r/size") is not None, 30, "b to learn r")
            b.marsadm("join-resource", "r", str(base / "b.img"), "--create")
            wait_until(lambda: b.tree_value("resource-r/syncstatus-b") == a.tree_value("resource-r/size"), 60,
                       "b's sync")
            b.marsadm("disconnect", "r")
            b.wait_value("resource-r/actual-b/is-copying", "0", 30)
            write(a, *(f"write -P 0x{(i % 200) + 16:02x} {i * 16}M 16M" for i in range(mib // 16)))
            opened = link.counters.connections
            b.marsadm("connect", "r")
            want = {name: p.stat().st_size for name, p in log_files(a).items()}
            wait_until(lambda: all(p.stat().st_size >= want.get(name, 0) for name, p in log_files(b).items())
                       and set(want) <= set(log_files(b)), 120, "b to fetch a's log")
            assert link.counters.connections > 0, "b's links did not cross the WAN link: the NAT rule missed"
            new_links = link.counters.connections - opened
            caught = wait_until(lambda: re.search(r"caught up \d+ MiB from a .* at most (\d+) requests in flight, "
                                                  r"(\d+) on one link", b.log_path.read_text(errors="replace")), 30, "b to log its catch-up")
            most, on_one = int(caught.group(1)), int(caught.group(2))
            assert most >= 8, f"at most {most} requests in flight over a {delay * 2:g} s round trip: " \
                              "the fetcher did not fill the pipeline"
            assert on_one >= 4, f"at most {on_one} requests at once on one link: the link is not pipelined"
            # the fetch link and its second one; a tree link reconnecting meanwhile is allowed for
            assert new_links <= 3, f"{new_links} links opened for one catch-up (eight made eight)"
            for name in want:
                assert sha256(log_files(b)[name]) == sha256(log_files(a)[name]), f"{name} differs on b"
        report("wan-fetch", mib_caught_up=mib, round_trip_s=delay * 2, requests_in_flight=most,
               on_one_link=on_one, links_opened=new_links)
    finally:
        nat.clear()
        logs = {n.host: n.log() for n in nodes if n.proc is not None}
        cleanup(base, nodes)
    for host, text in logs.items():
        assert "Traceback" not in text, f"marsd {host}:\n{text}"
