"""Cluster-level commands. They work while marsd is down: they only write the tree."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys

from ..peer import protocol as P
from ..credentials import (client_context, create_cluster_credential, ensure_node_cert, export_nbd_client,
                           export_secret, install_secret, secret_to_token, token_to_secret)
from ..errors import UsageError
from ..peer.link import DEFAULT_PORT, PeerClient, PeerError
from ..tree import NONE, make_dirs, nodes_of, tree_host
from ..trigger import marsd_running
from .base import Ctx, command


@command("create-cluster", "make this host the first node of a new cluster (marsd may be down)", node=False)
def create_cluster(ctx: Ctx) -> None:
    tree = ctx.tree
    root = tree.root
    if tree.get("uuid") is not None:
        if not ctx.force:
            raise ctx.fail(f"{root} already holds cluster {tree.get('uuid')}",
                           "nothing to do; to start over on a tree no other node knows, pass --force")
        _refuse_to_replace(ctx)
    ip = _own_ip(ctx)
    make_dirs(root)
    os.chmod(root, 0o700)  # the tree will hold credentials; as in the original it is root-only
    for d in ("ips", "userspace", "defaults", "todo-global", f"actual-{ctx.host}", f"defaults-{ctx.host}"):
        tree.mkdir(d)
    tree.set(f"ips/ip-{ctx.host}", ip)
    tree.set(f"defaults-{ctx.host}/sync-limit", 0)
    tree.set(f"defaults-{ctx.host}/sync-pref-list", NONE)
    uuid = f"{ctx.host}_{tree.clock.now() / 1e9:.9f}"
    create_cluster_credential(root, uuid, force=ctx.force)
    ensure_node_cert(root, ctx.host)
    tree.set("uuid", uuid)
    how = "" if ctx.args.ip else " (the address of this machine's default route; give --ip to choose another)"
    ctx.say(f"created cluster {tree.get('uuid')} in {root} with host {ctx.host} at {ip}{how}")


def _refuse_to_replace(ctx: Ctx) -> None:
    """--force over a cluster: only a tree that no marsd uses and no other node knows.

    A new cluster id and CA under a running marsd, or on a tree other nodes share, replicate to
    those nodes and cut this one off from all of them at its next restart (their certificates no
    longer verify): the whole cluster, not this node, would have to start over.
    """
    tree = ctx.tree
    why = []
    pid = marsd_running(tree.root)
    if pid is not None:
        why.append(f"marsd runs on {tree.root} (pid {pid})")
    others = [h for h in nodes_of(tree) if h != ctx.host]
    if others:
        why.append(f"the tree knows other nodes ({', '.join(others)})")
    if why:
        raise ctx.fail(f"refusing to replace cluster {tree.get('uuid')}: {' and '.join(why)}",
                       "a new cluster id and CA would reach the other nodes and cut every link; to start "
                       "this node over, stop marsd, leave its resources ('marsadm leave-resource'), run "
                       "'marsadm leave-cluster' here, then remove the tree by hand and create or join again")


def _own_ip(ctx: Ctx) -> str:
    """--ip, or the source address of this machine's default route (what other hosts reach)."""
    ip = ctx.args.ip
    if ip is None:
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect(("192.0.2.1", DEFAULT_PORT))  # TEST-NET-1: picks a route, sends nothing
            ip = s.getsockname()[0]
        except OSError:
            raise ctx.fail("no --ip given and this machine has no route to pick its address from",
                           "give --ip <the address other nodes reach this host on>") from None
        finally:
            s.close()
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ctx.fail(f"--ip {ip!r} is not an IP address", "give the address peers reach this host on") from None
    return ip


@command("join-cluster", "join the cluster of a peer: fetch its tree over an authenticated link (marsd may be down)",
         ("peer", {"help": "address of any node of the cluster (IP, optionally IP:PORT)"}),
         ("--secret-file", {"help": "the cluster credential (from 'marsadm export-secret' on a member)"}),
         ("--token", {"help": "the cluster credential as one line (from 'marsadm export-secret --token')"}),
         node=False)
def join_cluster(ctx: Ctx) -> None:
    tree = ctx.tree
    if tree.get("uuid") is not None and not ctx.force:
        raise ctx.fail(f"{tree.root} already belongs to cluster {tree.get('uuid')}",
                       "a node joins once; use --force only to overwrite a broken tree")
    if bool(ctx.args.secret_file) == bool(ctx.args.token):
        raise UsageError("give the cluster credential with exactly one of --secret-file F or --token T",
                         "get it on a member with 'marsadm export-secret' (it is the cluster's one secret)")
    if ctx.args.secret_file:
        try:
            secret = open(ctx.args.secret_file, "rb").read()
        except OSError as e:
            raise ctx.fail(f"cannot read {ctx.args.secret_file}: {e.strerror}", "give the path of the secret file")
    else:
        secret = token_to_secret(ctx.args.token)
    peer_ip, _, port = ctx.args.peer.partition(":")
    root = tree.root
    make_dirs(root)
    os.chmod(root, 0o700)
    install_secret(root, secret)
    ensure_node_cert(root, ctx.host)
    got, ip = asyncio.run(_join(ctx, peer_ip, int(port or DEFAULT_PORT)))
    how = "" if ctx.args.ip else " (the local address of the link to it; give --ip to choose another)"
    ctx.say(f"joined cluster {tree.get('uuid')} through {got} at {peer_ip}; this host is {ctx.host} at {ip}{how}")
    ctx.poke()


async def _join(ctx: Ctx, peer_ip: str, port: int) -> tuple[str, str]:
    """Connect first: without --ip, this host registers the address its link to the peer left from."""
    tree = ctx.tree
    hello = P.Hello(host=ctx.host, cluster="", proto=P.PROTO_VERSION, lamport_ns=tree.clock.now())
    client = PeerClient(peer_ip, port, hello, client_context(tree.root, ctx.host), cluster=None)
    try:
        await client.connect()
        assert client.peer_hello is not None
        ip = ctx.args.ip or client.local_address or ""
        if not ctx.args.ip and ipaddress.ip_address(ip).is_loopback:
            raise ctx.fail(f"this host would register as {ip}, the local end of its link to {peer_ip}, which no "
                           f"other host can reach", "give --ip <the address other nodes reach this host on>")
        for d in ("ips", "userspace", "defaults", "todo-global", f"actual-{ctx.host}", f"defaults-{ctx.host}"):
            tree.mkdir(d)
        tree.set(f"ips/ip-{ctx.host}", ip)
        tree.set(f"defaults-{ctx.host}/sync-limit", 0)
        own = tree.walk((f"ips/ip-{ctx.host}", f"defaults-{ctx.host}", f"actual-{ctx.host}"))
        reply = await client.request(lambda req: P.TreeRequest(req=req, prefixes=()), timeout=30)
        tree.apply_all(reply.entries)
        await client.request(lambda req: P.TreeEntries(req=req, entries=tuple(own)), timeout=30)
        return client.peer or peer_ip, ip
    except PeerError as e:
        raise ctx.fail(str(e.what), e.remedy) from None
    finally:
        await client.close()


@command("export-secret", "print the cluster credential a new node needs for join-cluster (keep it secret)",
         ("--token", {"action": "store_true", "help": "as one line for --token instead of a PEM file"}))
def export_secret_cmd(ctx: Ctx) -> None:
    secret = export_secret(ctx.tree.root)
    if ctx.args.token:
        print(secret_to_token(secret))
    else:
        sys.stdout.write(secret.decode())


@command("export-client-cert", "write a TLS client certificate for the NBD export (qemu tls-creds-x509, "
         "libnbd tls-certificates, nbd-client), signed by the cluster CA",
         ("--out", {"metavar": "DIR", "default": None,
                    "help": "directory for ca-cert.pem, client-cert.pem, client-key.pem (default ./nbd-tls-NAME)"}),
         ("--name", {"default": "nbd-client",
                     "help": "the client's name in its certificate, shown in marsd's log (default nbd-client)"}))
def export_client_cert_cmd(ctx: Ctx) -> None:
    """Any member can do this, marsd up or down: every member holds the cluster CA's key (the
    credential join-cluster installs). The certificate admits to the NBD export of every member
    with --nbd-tls, and to nothing else (peer links refuse it)."""
    out = ctx.args.out or f"nbd-tls-{ctx.args.name}"
    paths = export_nbd_client(ctx.tree.root, ctx.args.name, out, force=ctx.args.force)
    d = paths[0].parent.resolve()
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(f"qemu:   --object tls-creds-x509,id=tls0,endpoint=client,dir={d} "
          f"--image-opts driver=nbd,host=HOST,port=PORT,export=RES,tls-creds=tls0")
    print(f"libnbd: nbdinfo 'nbds://HOST:PORT/RES?tls-certificates={d}'")
    print(f"nbd-client: nbd-client HOST PORT /dev/nbd0 -N RES -cacertfile {d}/ca-cert.pem "
          f"-certfile {d}/client-cert.pem -keyfile {d}/client-key.pem")


@command("leave-cluster", "remove this host from the cluster (no resource memberships left; --host <dead> --force "
         "on a survivor removes a dead node)")
def leave_cluster(ctx: Ctx) -> None:
    tree = ctx.tree
    own = tree_host(tree.root)
    if own is not None and ctx.host != own:
        # Removing another node: only one that is gone, and only when said so.
        from ..model import build
        node = build(tree.root, own).nodes.get(ctx.host)
        if node is not None and node.alive:
            raise ctx.fail(f"host {ctx.host} is alive (it reported {node.seen_age_s or 0:.0f} s ago)",
                           f"run 'marsadm leave-cluster' on {ctx.host} itself; a survivor removes only a dead node")
        if not ctx.force:
            raise ctx.fail(f"this removes host {ctx.host}, another node, from the cluster",
                           f"if {ctx.host} is gone for good, pass --force")
    member_of = [r for r in tree.resources() if ctx.host in tree.members(r)]
    if member_of and not ctx.force:
        raise ctx.fail(f"host {ctx.host} is still a member of {', '.join(member_of)}",
                       "run 'marsadm leave-resource' for each first (with --host and --force for a dead node)")
    tree.delete(f"ips/ip-{ctx.host}")
    for n in tree.names(f"actual-{ctx.host}"):
        tree.delete(f"actual-{ctx.host}/{n}", durable=False)
    for h in nodes_of(tree):  # what the other nodes said about it goes too; their marsd also drop it
        tree.delete(f"actual-{h}/msg-peer-{ctx.host}", durable=False)
    ctx.poke()
    ctx.say(f"host {ctx.host} left the cluster; the others forget it on their next exchange")
