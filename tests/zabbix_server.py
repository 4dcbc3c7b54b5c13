"""A real Zabbix 6.0 on this machine for the tests: Debian's packages, everything on 127.0.0.1.

PostgreSQL 15, zabbix_server, the PHP frontend under Apache (its JSON-RPC API) and zabbix_agentd,
configured and started the way ../shared's verified set-up does it (no systemd: every daemon is
started by hand), and stopped again, with every configuration file this module wrote put back
as it was. ``make test`` installs the packages (Makefile APT_PKGS); the database is made once and
kept (loading the schema is the slow part), the daemons are not.

Used by tests/test_zabbix_server.py through :func:`zabbix` (a context manager).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness import run, wait_until

PG_VER = "15"
DB_PASS = "zabbix"
WEB_PORT = 8080
AGENT_PORT = 10050
SERVER_PORT = 10051
API_URL = f"http://127.0.0.1:{WEB_PORT}/zabbix/api_jsonrpc.php"
PACKAGES = ("postgresql", "zabbix-server-pgsql", "zabbix-frontend-php", "php-pgsql", "apache2",
            "libapache2-mod-php", "zabbix-agent", "sudo")
PIDS = {"agent": Path("/run/zabbix/zabbix_agentd.pid"), "server": Path("/run/zabbix/zabbix_server.pid")}


def missing_packages() -> list[str]:
    out = []
    for p in PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            out.append(p)
    return out


@dataclass
class Files:
    """Configuration files written for the test, each put back (or removed) afterwards."""

    saved: dict[Path, bytes | None] = field(default_factory=dict)

    def write(self, path: Path, text: str, mode: int = 0o644, group: str | None = None) -> None:
        if path not in self.saved:
            self.saved[path] = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, mode)
        if group is not None:
            shutil.chown(path, group=group)

    def restore(self) -> None:
        for path, old in self.saved.items():
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old)
        self.saved.clear()


def _psql(sql: str) -> str:
    return run(["su", "postgres", "-c", f'psql -tAc "{sql}"']).stdout.strip()


def _alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _stop_pid(pidfile: Path, timeout: float = 30) -> None:
    pid = _alive(pidfile)
    if pid is None:
        return
    os.kill(pid, 15)
    wait_until(lambda: _alive(pidfile) is None, timeout, f"{pidfile.name} to exit", interval=0.2)


def _listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def start_database() -> None:
    r = subprocess.run(["pg_ctlcluster", PG_VER, "main", "status"], capture_output=True)
    if r.returncode != 0:
        run(["pg_ctlcluster", PG_VER, "main", "start"])
    wait_until(lambda: subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode == 0, 60,
               "PostgreSQL to accept connections", interval=0.2)
    if _psql("SELECT 1 FROM pg_roles WHERE rolname='zabbix'") != "1":
        _psql(f"CREATE ROLE zabbix LOGIN PASSWORD '{DB_PASS}'")
    if _psql("SELECT 1 FROM pg_database WHERE datname='zabbix'") != "1":
        run(["su", "postgres", "-c", "createdb -O zabbix -E UTF8 -T template0 zabbix"])
    env = dict(os.environ, PGPASSWORD=DB_PASS)
    loaded = run(["psql", "-h", "127.0.0.1", "-U", "zabbix", "-d", "zabbix", "-tAc",
                  "SELECT 1 FROM pg_tables WHERE tablename='dbversion'"], env=env).stdout.strip()
    if loaded != "1":  # schema, images, data: the order README.Debian gives
        sql = "/usr/share/zabbix-server-pgsql"
        subprocess.run(f"zcat {sql}/schema.sql.gz {sql}/images.sql.gz {sql}/data.sql.gz | "
                       "psql -q -h 127.0.0.1 -U zabbix -d zabbix -v ON_ERROR_STOP=1 >/dev/null",
                       shell=True, check=True, env=env, timeout=600)


def configure(files: Files, agent_conf: str, hostname: str) -> None:
    for d in ("/run/zabbix", "/var/log/zabbix-server", "/var/log/zabbix-agent"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "zabbix", "zabbix")
    files.write(Path("/etc/zabbix/zabbix_server.conf.d/mars-test.conf"),
                f"DBHost=127.0.0.1\nDBPassword={DB_PASS}\nListenIP=127.0.0.1\nListenPort={SERVER_PORT}\n"
                "SourceIP=127.0.0.1\nCacheUpdateFrequency=2\nStartPollers=2\nStartPingers=0\n"
                "StartDiscoverers=0\nStartHTTPPollers=0\nStartTrappers=2\nHousekeepingFrequency=0\n",
                0o640, "zabbix")
    files.write(Path("/etc/zabbix/zabbix.conf.php"), f"""<?php
$DB['TYPE'] = 'POSTGRESQL'; $DB['SERVER'] = '127.0.0.1'; $DB['PORT'] = '5432'; $DB['DATABASE'] = 'zabbix';
$DB['USER'] = 'zabbix'; $DB['PASSWORD'] = '{DB_PASS}'; $DB['SCHEMA'] = '';
$DB['ENCRYPTION'] = false; $DB['KEY_FILE'] = ''; $DB['CERT_FILE'] = ''; $DB['CA_FILE'] = '';
$DB['VERIFY_HOST'] = false; $DB['CIPHER_LIST'] = '';
$DB['VAULT_URL'] = ''; $DB['VAULT_DB_PATH'] = ''; $DB['VAULT_TOKEN'] = '';
$DB['DOUBLE_IEEE754'] = true;
$ZBX_SERVER = '127.0.0.1'; $ZBX_SERVER_PORT = '{SERVER_PORT}'; $ZBX_SERVER_NAME = 'mars-test';
$IMAGE_FORMAT_DEFAULT = IMAGE_FORMAT_PNG;
""", 0o640, "www-data")
    php = next(Path("/etc/php").glob("*/apache2/conf.d"))
    files.write(php / "99-zabbix-mars-test.ini", "post_max_size = 16M\nupload_max_filesize = 16M\n"
                "max_execution_time = 300\nmax_input_time = 300\nmemory_limit = 256M\ndate.timezone = UTC\n")
    files.write(Path("/etc/apache2/ports.conf"), f"Listen 127.0.0.1:{WEB_PORT}\n")
    site = Path("/etc/apache2/sites-available/000-default.conf")
    text = site.read_text()
    files.write(site, text.replace("<VirtualHost *:80>", f"<VirtualHost 127.0.0.1:{WEB_PORT}>"))
    conf = Path("/etc/apache2/conf-enabled/zabbix-frontend-php.conf")
    if not conf.exists():
        run(["a2enconf", "-q", "zabbix-frontend-php"])
    name = Path("/etc/apache2/conf-available/servername-mars-test.conf")
    files.write(name, "ServerName 127.0.0.1\n")
    files.write(Path("/etc/apache2/conf-enabled/servername-mars-test.conf"), "ServerName 127.0.0.1\n")
    files.write(Path("/etc/zabbix/zabbix_agentd.conf.d/local-mars-test.conf"),
                f"ListenIP=127.0.0.1\nListenPort={AGENT_PORT}\nServer=127.0.0.1\nServerActive=127.0.0.1:{SERVER_PORT}\n"
                f"Hostname={hostname}\nTimeout=20\n")
    files.write(Path("/etc/zabbix/zabbix_agentd.conf.d/userparameter_mars.conf"), agent_conf)


def start_daemons() -> None:
    if _alive(PIDS["server"]) is None:
        run(["zabbix_server", "-c", "/etc/zabbix/zabbix_server.conf"])
    wait_until(lambda: _listens(SERVER_PORT), 90, "zabbix_server to listen", interval=0.3)
    run(["apache2ctl", "-t"])
    run(["apache2ctl", "start"], check=False)
    wait_until(lambda: _http_ok(f"http://127.0.0.1:{WEB_PORT}/zabbix/index.php"), 60, "the Zabbix frontend",
               interval=0.3)
    restart_agent()


def restart_agent() -> None:
    """(Re)start zabbix_agentd: it reads its UserParameters only when it starts."""
    _stop_pid(PIDS["agent"])
    run(["zabbix_agentd", "-c", "/etc/zabbix/zabbix_agentd.conf"])
    wait_until(lambda: subprocess.run(["zabbix_get", "-s", "127.0.0.1", "-k", "agent.ping"],
                                      capture_output=True).returncode == 0, 30, "zabbix_agentd", interval=0.2)


def stop_daemons() -> None:
    """Agent, then server (fully: its HA manager needs the database to exit), then Apache and
    PostgreSQL; by pid file, never by name."""
    _stop_pid(PIDS["agent"])
    _stop_pid(PIDS["server"], 60)
    subprocess.run(["apache2ctl", "stop"], capture_output=True)
    wait_until(lambda: not Path("/var/run/apache2/apache2.pid").exists(), 30, "apache2 to stop", interval=0.2)
    subprocess.run(["pg_ctlcluster", PG_VER, "main", "stop"], capture_output=True)


@contextlib.contextmanager
def zabbix(agent_conf: str, hostname: str) -> Iterator[None]:
    """A running Zabbix whose agent has ``agent_conf`` as its MARS UserParameters."""
    missing = missing_packages()
    assert not missing, f"make test installs the Zabbix packages; missing: {' '.join(missing)}"
    files = Files()
    try:
        configure(files, agent_conf, hostname)
        start_database()
        start_daemons()
        yield
    finally:
        try:
            stop_daemons()
        finally:
            files.restore()


def login():
    from pyzabbix import ZabbixAPI
    # The first requests after a start compile the frontend's PHP and, for the template import, run
    # thousands of queries; on a loaded 2-CPU CI host one took over 60 s. A hung server still fails
    # the test, later.
    api = ZabbixAPI(API_URL, timeout=300)
    api.login("Admin", "zabbix")
    return api


def until_api(fn, timeout: float, what: str):
    """Poll an API read until it gives something truthy (the server updates items every few s)."""
    return wait_until(fn, timeout, what, interval=1.0)


__all__ = ["API_URL", "Files", "login", "restart_agent", "until_api", "zabbix"]
