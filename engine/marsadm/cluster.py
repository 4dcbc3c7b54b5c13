"""Cluster-level commands. They work while marsd is down: they only write the tree."""

from __future__ import annotations

import ipaddress
import os

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
    tree.set("uuid", f"{ctx.host}_{tree.clock.now() / 1e9:.9f}")
    ctx.say(f"created cluster {tree.get('uuid')} in {root} with host {ctx.host} at {ip}")
