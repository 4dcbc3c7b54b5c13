"""Cluster-level commands. They work while marsd is down: they only write the tree."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys

from ..peer import protocol as P
from ..credentials import (client_context, create_cluster_credential, ensure_node_cert, export_secret,
                           install_secret, secret_to_token, token_to_secret)
from ..errors import UsageError
from ..peer.link import DEFAULT_PORT, PeerClient, PeerError
from ..tree import NONE
from .base import Ctx, command


@command("create-cluster", "make this host the first node of a new cluster (marsd may be down)")
def create_cluster(ctx: Ctx) -> None:
    tree = ctx.tree
    root = tree.root
    if tree.get("uuid") is not None and not ctx.force:
        raise ctx.fail(f"{root} already holds cluster {tree.get('uuid')}",
                       "nothing to do; to start over remove the tree by hand, or pass --force to overwrite")
    ip = ctx.args.ip or "127.0.0.1"
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ctx.fail(f"--ip {ip!r} is not an IP address", "give the address peers reach this host on") from None
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    ctx.say(f"created cluster {tree.get('uuid')} in {root} with host {ctx.host} at {ip}")


@command("join-cluster", "join the cluster of a peer: fetch its tree over an authenticated link (marsd may be down)",
         ("peer", {"help": "address of any node of the cluster (IP, optionally IP:PORT)"}),
         ("--secret-file", {"help": "the cluster credential (from 'marsadm export-secret' on a member)"}),
         ("--token", {"help": "the cluster credential as one line (from 'marsadm export-secret --token')"}))
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
    ip = ctx.args.ip or "127.0.0.1"
    peer_ip, _, port = ctx.args.peer.partition(":")
    root = tree.root
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    install_secret(root, secret)
    ensure_node_cert(root, ctx.host)
    for d in ("ips", "userspace", "defaults", "todo-global", f"actual-{ctx.host}", f"defaults-{ctx.host}"):
        tree.mkdir(d)
    tree.set(f"ips/ip-{ctx.host}", ip)
    tree.set(f"defaults-{ctx.host}/sync-limit", 0)
    own = tree.walk((f"ips/ip-{ctx.host}", f"defaults-{ctx.host}", f"actual-{ctx.host}"))
    got = asyncio.run(_join(ctx, peer_ip, int(port or DEFAULT_PORT), own))
    ctx.say(f"joined cluster {tree.get('uuid')} through {got} at {peer_ip}; this host is {ctx.host} at {ip}")
    ctx.poke()


async def _join(ctx: Ctx, peer_ip: str, port: int, own: list) -> str:
    tree = ctx.tree
    hello = P.Hello(host=ctx.host, cluster="", proto=P.PROTO_VERSION, lamport_ns=tree.clock.now())
    client = PeerClient(peer_ip, port, hello, client_context(tree.root, ctx.host), cluster=None)
    try:
        await client.connect()
        assert client.peer_hello is not None
        reply = await client.request(lambda req: P.TreeRequest(req=req, prefixes=()), timeout=30)
        for e in reply.entries:
            tree.apply(e)
        await client.request(lambda req: P.TreeEntries(req=req, entries=tuple(own)), timeout=30)
        return client.peer or peer_ip
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


@command("leave-cluster", "remove this host from the cluster (no resource memberships left; --host <dead> --force "
         "on a survivor removes a dead node)")
def leave_cluster(ctx: Ctx) -> None:
    tree = ctx.tree
    member_of = [r for r in tree.resources() if ctx.host in tree.members(r)]
    if member_of and not ctx.force:
        raise ctx.fail(f"host {ctx.host} is still a member of {', '.join(member_of)}",
                       "run 'marsadm leave-resource' for each first (with --host and --force for a dead node)")
    tree.delete(f"ips/ip-{ctx.host}")
    for n in tree.names(f"actual-{ctx.host}"):
        tree.delete(f"actual-{ctx.host}/{n}", durable=False)
    ctx.poke()
    ctx.say(f"host {ctx.host} left the cluster; the others forget it on their next exchange")


@command("set-global-sync-limit-value", "how many full syncs may run at once on this host (0: no limit)",
         ("value", {"type": int, "help": "number of concurrent syncs, 0 = unlimited"}))
def set_sync_limit(ctx: Ctx) -> None:
    if ctx.args.value < 0:
        raise UsageError(f"sync limit {ctx.args.value} is negative", "give 0 (no limit) or a positive number")
    ctx.tree.set(f"defaults-{ctx.host}/sync-limit", ctx.args.value)
    ctx.poke()
