from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Node, cleanup, short_tempdir  # noqa: E402


@pytest.fixture
def workdir():
    base = short_tempdir()
    nodes: list[Node] = []
    base_nodes = nodes
    yield base, base_nodes
    cleanup(base, base_nodes)


@pytest.fixture
def node(workdir):
    """A one-node cluster with marsd running and no resource yet."""
    base, nodes = workdir
    n = Node(base, "a", "127.0.0.2")
    nodes.append(n)
    n.create_cluster()
    n.start()
    return n


@pytest.fixture
def resource(node):
    """Node ``a`` serving resource ``r`` on a fresh 64 MiB sparse image."""
    img = node.base / "r.img"
    node.marsadm("create-resource", "r", str(img), "64M")
    return node, "r", img
