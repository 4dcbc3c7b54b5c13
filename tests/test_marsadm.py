"""marsadm against a real marsd: the single-node commands, their refusals and exit codes."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness import BIN, Node, run, wait_until


def test_create_cluster_while_marsd_is_down(workdir):
    base, nodes = workdir
    n = Node(base, "a")
    nodes.append(n)
    r = n.marsadm("--ip", "127.0.0.2", "create-cluster")
    assert n.tree_value("ips/ip-a") == "127.0.0.2"
    assert n.tree_value("uuid").startswith("a_")
    assert oct(os.stat(n.mars_dir).st_mode & 0o777) == "0o700"
    # The entry's mtime is its Lamport stamp, close to now.
    st = os.lstat(n.mars_dir / "uuid")
    assert abs(st.st_mtime - __import__("time").time()) < 60
    again = n.marsadm("create-cluster", check=False)
    assert again.returncode == 1
    assert "already holds cluster" in again.stderr and "create-cluster" in again.stderr
    assert "Traceback" not in r.stderr + again.stderr


def test_mars_dir_from_environment(workdir):
    base, nodes = workdir
    env = dict(os.environ, MARS_DIR=str(base / "envtree"))
    r = subprocess.run([str(BIN / "marsadm"), "--host", "e", "--ip", "127.0.0.1", "create-cluster"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.readlink(base / "envtree" / "ips" / "ip-e") == "127.0.0.1"


@pytest.mark.parametrize("argv, code, words", [
    ([], 2, "no command"),
    (["frobnicate"], 2, "invalid choice"),
    (["attach"], 2, "required"),
    (["create-resource", "r"], 2, "required"),
    (["create-resource", "bad/name", "/tmp/x", "1M"], 2, "not valid"),
    (["create-resource", "all", "/tmp/x", "1M"], 2, "reserved"),
    (["create-resource", "r", "/tmp/x", "12parsecs"], 2, "not a size"),
    (["--timeout", "soon", "attach", "r"], 2, "not a number of seconds"),
    (["--timeout", "-1", "attach", "r"], 2, "not zero or a positive number of seconds"),
])
def test_usage_errors_exit_2_without_traceback(node, argv, code, words):
    r = node.marsadm(*argv, check=False)
    assert r.returncode == code, r.stderr
    assert words in r.stderr
    assert "Traceback" not in r.stderr


def test_create_resource_refusals(node):
    base = node.base
    cases = [
        (["create-resource", "r", "relative.img", "1M"], "not an absolute path"),
        (["create-resource", "r", str(base / "missing.img")], "does not exist"),
        (["create-resource", "r", str(base / "x.img"), "1000000"], "multiple of 4 KiB"),
        (["create-resource", "r", str(base / "nodir" / "x.img"), "1M"], "does not exist"),
        (["create-resource", "r", str(base / "tiny.img"), "16K"], "below the minimum"),
        (["create-resource", "r", "/dev/null"], "neither a block device nor a regular file"),
        (["attach", "nosuch"], "does not exist"),
    ]
    for argv, words in cases:
        r = node.marsadm(*argv, check=False)
        assert r.returncode == 1, (argv, r.stderr)
        assert words in r.stderr, (argv, r.stderr)
        assert r.stderr.startswith("marsadm: "), r.stderr
        assert "Traceback" not in r.stderr
    small = base / "small.img"
    small.write_bytes(b"\0" * (1 << 20))
    r = node.marsadm("create-resource", "r", str(small), "2M", check=False)
    assert r.returncode == 1 and "less than the size" in r.stderr


def test_create_resource_from_existing_image_takes_its_size(node):
    img = node.base / "exist.img"
    with open(img, "wb") as f:
        f.truncate((8 << 20) + 1000)  # not a 4 KiB multiple: the resource rounds down
    node.marsadm("create-resource", "ex", str(img))
    assert node.tree_value("resource-ex/size") == str(8 << 20)
    r = node.marsadm("create-resource", "ex", str(img), check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = node.marsadm("create-resource", "ex2", str(img), check=False)
    assert r.returncode == 1 and "already the data device" in r.stderr


def test_detach_refused_while_client_connected_unless_forced(resource):
    node, res, img = resource
    import nbd
    h = nbd.NBD()
    h.connect_uri(node.uri(res))
    try:
        h.pwrite(b"x" * 4096, 0)
        node.wait_value(f"resource-{res}/actual-a/open-count", "1")
        r = node.marsadm("detach", res, check=False)
        assert r.returncode == 1
        assert "open by 1 client" in r.stderr and "--force" in r.stderr
        assert node.tree_value(f"resource-{res}/actual-a/is-attached") == "1"
        r = node.marsadm("down", res, check=False)
        assert r.returncode == 1
        node.marsadm("detach", res, "--force")
        assert node.tree_value(f"resource-{res}/actual-a/is-attached") == "0"
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
    finally:
        del h
    node.marsadm("attach", res)
    h = nbd.NBD()
    h.connect_uri(node.uri(res))
    assert h.pread(4096, 0) == b"x" * 4096
    h.shutdown()


def test_force_prefix_and_up_down_all(node):
    for name in ("r1", "r2"):
        node.marsadm("create-resource", name, str(node.base / f"{name}.img"), "1M")
    node.marsadm("down", "all")
    for name in ("r1", "r2"):
        assert node.tree_value(f"resource-{name}/actual-a/is-attached") == "0"
        assert node.tree_value(f"resource-{name}/todo-a/allow-replay") == "0"
    r = run(["nbdinfo", node.uri("r1")], check=False)
    assert r.returncode != 0  # nothing served while down
    node.marsadm("up", "r1,r2")
    for name in ("r1", "r2"):
        assert node.tree_value(f"resource-{name}/actual-a/is-attached") == "1"
    node.marsadm("force-detach", "r2")
    assert node.tree_value("resource-r2/actual-a/is-attached") == "0"


def test_commands_while_marsd_is_down_say_so(resource):
    node, res, img = resource
    node.stop()
    # Stopping marsd detaches: the actual state says so, and detach has nothing to wait for.
    assert node.tree_value(f"resource-{res}/actual-a/is-attached") == "0"
    node.marsadm("detach", res)
    r = node.marsadm("attach", res, check=False)
    assert r.returncode == 1
    assert "marsd is not running on host a" in r.stderr and "marsd --mars-dir" in r.stderr
    assert node.tree_value(f"resource-{res}/todo-a/attach") == "1"
    node.marsadm("detach", res)
    r = node.marsadm("--no-wait", "up", res)
    assert r.returncode == 0 and node.tree_value(f"resource-{res}/todo-a/attach") == "1"
    node.start()
    node.wait_value(f"resource-{res}/actual-a/is-attached", "1")


def test_timeout_names_the_wait(resource):
    node, res, img = resource
    os.kill(node.proc.pid, __import__("signal").SIGSTOP)  # marsd alive but not answering
    try:
        r = node.marsadm("--timeout", "0.5", "detach", res, check=False)
        assert r.returncode == 1
        assert "did not detach resource r within 0.5 s" in r.stderr
    finally:
        os.kill(node.proc.pid, __import__("signal").SIGCONT)


def test_log_rotate_and_delete(resource):
    node, res, img = resource
    d = node.mars_dir / f"resource-{res}"
    r = node.marsadm("log-rotate", res)
    assert "is empty; nothing to rotate" in r.stderr
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 1M", node.uri(res)])
    node.marsadm("log-rotate", res)
    assert (d / "log-000000002-a").exists()
    version = node.tree_value(f"resource-{res}/version-000000001-a")
    assert version and ",log-000000001-a," in version
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x02 1M 1M", node.uri(res)])
    node.marsadm("log-rotate", res)
    v2 = node.tree_value(f"resource-{res}/version-000000002-a")
    # The chain: version 2 carries version 1's digest as its previous link.
    assert v2.split(":", 1)[1] == version.split(":", 1)[0]
    wait_until(lambda: (node.tree_value(f"resource-{res}/replay-a") or "").startswith("log-000000003-a"),
               10, "replay position in log 3")
    node.marsadm("log-delete-one", res)
    assert not (d / "log-000000001-a").exists() and (d / "log-000000002-a").exists()
    r = node.marsadm("log-delete-all", res)
    assert "1 log file(s) deleted" in r.stderr
    assert sorted(p.name for p in d.glob("log-*")) == ["log-000000003-a"]
    r = node.marsadm("log-delete", res)
    assert "no log file can be deleted" in r.stderr
    # The data is intact after the logs are gone and marsd restarts.
    node.restart()
    node.wait_value(f"resource-{res}/actual-a/is-attached", "1")
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x01 0 1M", "-c", "read -P 0x02 1M 1M", node.uri(res)])


def test_delete_resource(resource):
    node, res, img = resource
    r = node.marsadm("delete-resource", res, check=False)
    assert r.returncode == 1 and f"marsadm down {res}" in r.stderr
    node.marsadm("down", res)
    node.marsadm("delete-resource", res)
    assert res not in [p.name[9:] for p in node.mars_dir.glob("resource-*") if (p / "size").is_symlink()
                       and os.readlink(p / "size") != ".deleted"]
    assert not list((node.mars_dir / f"resource-{res}").glob("log-*"))
    assert img.exists()  # the data device is the operator's
    # The name can be used again.
    node.marsadm("create-resource", res, str(img))
    node.wait_value(f"resource-{res}/actual-a/is-attached", "1")
