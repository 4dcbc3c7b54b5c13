"""What a user gets: the wheel built from this tree, installed with pip into a fresh venv.

``make test`` installs the project editable, which finds every module in the work tree whether
the wheel has it or not; a package missing from pyproject's list once made every installed
command crash on import while every test passed. So this test builds the wheel from a copy of
the source (no stray build artefacts), installs it into a new venv that sees nothing of the
work tree, and runs the installed commands: each ``--help``, then a one-node cluster
(create-cluster, marsd, create-resource, ``marsadm view``, ``mars-status --once``) and the
Textual app headless, which needs the stylesheet shipped as package data.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from harness import Node

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", ".hypothesis",
                                ".pytest_cache", "demo-run", "snapshot_report.html")

TUI_CHECK = r"""
import asyncio, sys, time
from mars.status.app import MarsStatusApp
from mars.status.render import Options

async def main():
    app = MarsStatusApp(sys.argv[1], "a", Options(), interval=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 60
        while app.refreshes == 0:
            assert time.monotonic() < deadline, "no refresh within 60 s"
            await pilot.pause(0.05)  # poll
        hint = app.get_css_variables()["mars-hint"]
        print("refreshed", "check resource r" in app.screen_text, hint)

asyncio.run(main())
"""


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.host_network  # pip fetches the dependencies from the package index
def test_the_wheel_installs_and_every_command_runs(workdir):
    base, nodes = workdir
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE, symlinks=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"), str(src)])
    [wheel] = (base / "dist").glob("mars_replication-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for top in ("engine", "status", "exporters")
                for p in (ROOT / top).rglob("__init__.py")}
    for folder in packages:
        parts = Path(folder).parts
        assert f"mars/{parts[0]}/{'/'.join(parts[1:]) + '/' if parts[1:] else ''}__init__.py" in names, folder
    assert "mars/status/mars_status.tcss" in names

    # A fresh venv from the interpreter the tests run on, seeing nothing of the work tree.
    venv = base / "venv"
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], timeout=900)
    where = run([str(venv / "bin" / "python"), "-c", "import mars; print(mars.__file__)"], cwd=base).stdout
    assert str(venv) in where and str(ROOT) not in where

    for cmd in ("marsd", "marsadm", "mars-status", "mars-exporter"):
        r = run([str(venv / "bin" / cmd), "--help"])
        assert f"usage: {cmd}" in r.stdout

    n = Node(base, "a", "127.0.0.2", bin_dir=venv / "bin")
    nodes.append(n)
    n.create_cluster()
    n.start()
    n.marsadm("create-resource", "r", str(base / "r.img"), "64M")
    view = n.marsadm("view", "all").stdout
    assert "resource r 64.0 MiB" in view and "UpToDate Replicating" in view
    status = subprocess.run([str(venv / "bin" / "mars-status"), "--mars-dir", str(n.mars_dir), "--host", "a", "--once"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr  # OK: nothing to do
    assert "-> check resource r" in status.stdout and status.stdout.rstrip().splitlines()[-1].startswith("MARS OK")

    scrape = run([str(venv / "bin" / "mars-exporter"), "--mars-dir", str(n.mars_dir), "--once"]).stdout
    assert "mars_snapshot_ok 1.0" in scrape and 'mars_member_repl_state{host="a",mars_member_repl_state="Replicating"' \
        ',resource="r"} 1.0' in scrape and "mars_nbd_requests_total" in scrape

    tui = run([str(venv / "bin" / "python"), "-c", TUI_CHECK, str(n.mars_dir)], timeout=300, cwd=base)
    assert tui.stdout.split() == ["refreshed", "True", "#c678dd"], tui.stdout + tui.stderr
