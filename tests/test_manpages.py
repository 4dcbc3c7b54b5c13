"""The man pages in man/ are what tools/manpages.py makes of today's parsers, and man renders them.

Stale pages mean an option or command changed without its page: regenerate with
``.venv/bin/python tools/manpages.py`` and check the result in. The rendering is real ``man -l``
(Debian's man-db) with groff's warnings on, so a page that renders with warnings or loses a
command fails here, not on an operator's terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import manpages
from mars.engine.marsadm import COMMANDS


def render_man(page: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING="", LC_ALL="C.UTF-8")
    env.pop("MANPAGER", None)
    env.pop("PAGER", None)
    return subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("page", manpages.PAGES, ids=lambda p: p.filename)
def test_checked_in_page_is_up_to_date(page):
    checked_in = (manpages.MAN_DIR / page.filename).read_text()
    assert checked_in == manpages.render(page), (
        f"man/{page.filename} is stale; run '.venv/bin/python tools/manpages.py' and commit man/")


@pytest.mark.parametrize("page", manpages.PAGES, ids=lambda p: p.filename)
def test_page_renders_cleanly_and_names_its_commands(page):
    r = render_man(manpages.MAN_DIR / page.filename)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = r.stdout
    assert text.startswith(f"{page.prog.upper()}({page.section})")
    assert f"{page.prog} - {page.summary}" in text
    for heading in ("SYNOPSIS", "DESCRIPTION", "OPTIONS", "SEE ALSO"):
        assert f"\n{heading}\n" in text, heading
    if page.prog == "marsadm":
        for name in COMMANDS:
            assert f"marsadm {name}\n" in text, name  # every command has its entry...
            assert f"usage: marsadm {name} [-h]" in text, name  # ...with its arguments
    if page.prog == "marsd":
        for option in ("--log-file PATH", "--syslog", "--mars-dir", "SIGHUP"):
            assert option in text, option
    if page.prog == "mars-status":
        for option in ("--check", "--once", "--debug", "EXIT STATUS"):
            assert option in text, option


def test_check_mode_reports_a_stale_page(tmp_path):
    assert manpages.main(["--out", str(tmp_path)]) == 0
    assert manpages.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "marsd.8").write_text(".TH MARSD 8\n")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "manpages.py"), "--check", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"manpages.py: {tmp_path / 'marsd.8'} is stale; "
                                "run '.venv/bin/python tools/manpages.py'")
