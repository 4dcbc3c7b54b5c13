"""`make install` as docs/install.md describes it, staged under a temporary DESTDIR.

What a host gets: a venv at /opt/mars with the wheel of this tree, the three commands and the
man pages linked into /usr/local, and the systemd unit, whose ExecStart must name a file that
exists (it once named a path nothing installed). The staged root is used in place: the installed
commands run from it, and marsd from it serves a one-node cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from harness import Node, run, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.host_network  # pip fetches the dependencies from the package index
def test_make_install_into_destdir(workdir):
    base, nodes = workdir
    dest = base / "root"
    r = run(["make", "-C", str(ROOT), "install", f"DESTDIR={dest}"], timeout=900)
    assert f"installed MARS into {dest}/opt/mars" in r.stdout

    bindir = dest / "usr/local/bin"
    for cmd in ("marsd", "marsadm", "mars-status", "mars-exporter", "mars-zabbix", "check_mars"):
        link = bindir / cmd
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), cmd  # right in the final root too
        assert link.resolve() == (dest / "opt/mars/bin" / cmd).resolve(), cmd
    assert "usage: marsadm" in run([str(bindir / "marsadm"), "--help"]).stdout
    assert "--log-file PATH" in run([str(bindir / "marsd"), "--help"]).stdout
    where = run([str(dest / "opt/mars/bin/python"), "-c", "import mars; print(mars.__file__)"], cwd=base).stdout
    assert where.startswith(str(dest / "opt/mars/lib")), where  # the wheel, not this work tree

    for page, title in (("man8/marsadm.8", "MARSADM(8)"), ("man8/marsd.8", "MARSD(8)"),
                        ("man1/mars-status.1", "MARS-STATUS(1)"), ("man8/mars-exporter.8", "MARS-EXPORTER(8)")):
        path = dest / "usr/local/share/man" / page
        assert path.resolve().is_file(), page
        shown = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, MANWIDTH="100", LC_ALL="C.UTF-8"))
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        assert shown.stdout.startswith(title), shown.stdout[:200]

    for name, prog in (("marsd.service", "marsd"), ("mars-exporter.service", "mars-exporter")):
        unit = (dest / "etc/systemd/system" / name).read_text()
        [exec_start] = re.findall(r"^ExecStart=(\S+)", unit, re.MULTILINE)
        assert exec_start == f"/opt/mars/bin/{prog}"
        assert os.access(dest / exec_start.lstrip("/"), os.X_OK)

    # The installed commands work: a one-node cluster, marsd from the staged root, logging to a file.
    n = Node(base, "a", "127.0.0.2", bin_dir=bindir)
    nodes.append(n)
    n.create_cluster()
    n.start("--log-file", str(base / "marsd-file.log"))
    wait_until(lambda: "marsd 0.1.0 on host a started" in (base / "marsd-file.log").read_text(), 20, "the start line")
    assert n.stop() == 0

    run(["make", "-C", str(ROOT), "uninstall", f"DESTDIR={dest}"])
    assert not (bindir / "marsadm").exists() and not (dest / "opt/mars").exists()
    assert not (dest / "etc/systemd/system/marsd.service").exists()
    assert not (dest / "etc/systemd/system/mars-exporter.service").exists()
