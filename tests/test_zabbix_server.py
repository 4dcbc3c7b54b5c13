"""The Zabbix face against a real Zabbix 6.0: the generated template imported through the API,
a host for node a of a real three-node cluster polled by a real zabbix_agentd through the
shipped UserParameters and sudoers rule, and the cron path through zabbix_sender.

What must hold (issue: the Zabbix face): the template imports on the first try; discovery
creates the items of every resource and member; their values are what `marsadm view-*` says;
a problem is raised when a node's marsd is killed and resolved when it is back; the same for
the trapper path after `mars-zabbix send`; `zabbix_agentd -t` gives a value for every
UserParameter key as user zabbix.

The master item polls every minute; the tests ask the server to check it now (``task.create``,
what "Execute now" in the frontend does) instead of waiting for the interval.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import run, wait_until
from zabbix_server import login, restart_agent, until_api, zabbix

from mars.engine.model import DISKSTATES, REPLSTATES, ROLES

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEMPLATES = ROOT / "zabbix-templates"
AGENT_TEMPLATE, TRAP_TEMPLATE = "MARS by Zabbix agent", "MARS by Zabbix trapper"
SUDOERS = Path("/etc/sudoers.d/mars-zabbix-test")
# One Zabbix (PostgreSQL, server, Apache, agent on their fixed ports) at a time: under pytest -n
# these tests stay on one worker.
pytestmark = pytest.mark.xdist_group("zabbix-server")

RULES = {"groups": {"createMissing": True}, "templates": {"createMissing": True, "updateExisting": True},
         "valueMaps": {"createMissing": True, "updateExisting": True},
         "templateDashboards": {"createMissing": True, "updateExisting": True},
         "templateLinkage": {"createMissing": True},
         "items": {"createMissing": True, "updateExisting": True},
         "discoveryRules": {"createMissing": True, "updateExisting": True},
         "triggers": {"createMissing": True, "updateExisting": True},
         "graphs": {"createMissing": True, "updateExisting": True}}


def localised(text: str, mars_dir: Path) -> str:
    """The shipped agent file or sudoers rule, for this test's cluster and this venv's command."""
    return text.replace("/usr/local/bin/mars-zabbix", str(BIN / "mars-zabbix")).replace(
        "--mars-dir /mars", f"--mars-dir {mars_dir}")


GROUP = "MARS test nodes"
# The nodes' MARS directories share this machine's disk, whose free share is whatever the machine has
# (under 30 % on a CI host once): the per-host macro the template documents switches the INFO trigger
# off, so "a healthy cluster raises nothing" is about the cluster, not the machine.
QUIET_DISK = [{"macro": "{$MARS.FREE.MIN}", "value": "0"}]


def remove_test_hosts(api) -> None:
    """Every host these tests create is named mars-*, in GROUP or, when a host.create outlived its
    client's timeout and committed after the teardown had run, maybe left without it: remove both
    by name and by group, so the next test's host.create never meets "already exists"."""
    hosts = {h["hostid"] for h in api.host.get(search={"host": "mars-"}, startSearch=True, output=["hostid"])}
    groups = [g["groupid"] for g in api.hostgroup.get(filter={"name": [GROUP]}, output=["groupid"])]
    if groups:
        hosts |= {h["hostid"] for h in api.host.get(groupids=groups, output=["hostid"])}
    if hosts:
        api.host.delete(*sorted(hosts))
    if groups:
        api.hostgroup.delete(*groups)


@pytest.fixture
def zbx(trio):
    a, b, c = trio
    agent_conf = localised((TEMPLATES / "userparameter_mars.conf").read_text(), a.mars_dir)
    SUDOERS.write_text(localised((TEMPLATES / "sudoers.d" / "mars-zabbix").read_text(), a.mars_dir))
    os.chmod(SUDOERS, 0o440)
    try:
        check = run(["visudo", "-cf", str(SUDOERS)], check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        with zabbix(agent_conf, "mars-a"):
            api = login()
            remove_test_hosts(api)  # an interrupted earlier run may have left them in the database
            result = api.configuration["import"](format="xml", source=(TEMPLATES / "mars_template.xml").read_text(),
                                                 rules=RULES)
            assert result is True  # on the first try: an error would have raised
            group = api.hostgroup.create(name=GROUP)["groupids"][0]
            templates = {t["host"]: t["templateid"] for t in api.template.get(filter={"host": [AGENT_TEMPLATE,
                                                                                                TRAP_TEMPLATE]})}
            try:
                assert set(templates) == {AGENT_TEMPLATE, TRAP_TEMPLATE}
                host = api.host.create(host="mars-a", groups=[{"groupid": group}],
                                       templates=[{"templateid": templates[AGENT_TEMPLATE]}], macros=QUIET_DISK,
                                       interfaces=[{"type": 1, "main": 1, "useip": 1, "ip": "127.0.0.1", "dns": "",
                                                    "port": "10050"}])["hostids"][0]
                yield a, b, c, api, host, group, templates
            finally:
                remove_test_hosts(api)
                api.template.delete(*templates.values())
    finally:
        SUDOERS.unlink(missing_ok=True)


def items(api, host: str, prefix: str) -> dict[str, dict]:
    return {i["key_"]: i for i in api.item.get(hostids=[host], search={"key_": prefix}, startSearch=True,
                                               output=["itemid", "key_", "lastvalue", "lastclock", "state", "error"])}


def poll(api, host: str) -> None:
    """Ask the server to check the master item now (the frontend's "Execute now")."""
    (master,) = api.item.get(hostids=[host], filter={"key_": "mars.status"}, output=["itemid"])
    api.task.create(type=6, request={"itemid": master["itemid"]})


def member_values(api, host: str, resource: str, members: str) -> dict[tuple[str, str], str] | None:
    """{(field, member): lastvalue} once the members' items exist and have a value."""
    got = items(api, host, "mars.member.")
    out = {}
    for h in members:
        for field in ("replay_rest", "sync_rest", "fetch_rest", "role", "disk_state", "repl_state"):
            it = got.get(f"mars.member.{field}[{resource},{h}]")
            if it is None or it["lastclock"] == "0":
                return None
            out[(field, h)] = it["lastvalue"]
    return out


def view(node, macro: str) -> str:
    return node.marsadm(f"view-{macro}", "r").stdout.strip()


def node_down_problems(api, host: str, down: str) -> list[dict]:
    return [p for p in api.problem.get(hostids=[host], output=["name", "severity", "r_eventid"])
            if "NODE_DOWN" in p["name"] and down in p["name"]]


def agrees(api, host: str, node, poke) -> bool:
    """The Zabbix host's items of ``node``'s member of r say what `marsadm view-*` says on ``node``."""
    poke()
    v = member_values(api, host, "r", node.host) or {}
    h = node.host
    return bool(v) and (v[("replay_rest", h)] == view(node, "replay-rest") and
                        v[("sync_rest", h)] == view(node, "sync-rest") and
                        v[("fetch_rest", h)] == view(node, "fetch-rest") and
                        ROLES[int(v[("role", h)])] == view(node, "role") and
                        DISKSTATES[int(v[("disk_state", h)])] == view(node, "diskstate").split("[", 1)[0] and
                        REPLSTATES[int(v[("repl_state", h)])] == view(node, "replstate"))


def peers_alive(api, host: str) -> dict[str, str]:
    return {k[len("mars.peer.alive["):-1]: i["lastvalue"] for k, i in items(api, host, "mars.peer.alive[").items()
            if i["lastclock"] != "0"}


def killed_and_back(api, host: str, c, poke) -> None:
    """c's marsd killed: one HIGH NODE_DOWN problem on this node's host and no other about c (the
    triggers about c depend on it); c restarted: the problem resolves."""
    assert api.problem.get(hostids=[host]) == []  # a healthy cluster raises nothing
    c.kill()

    def raised():
        poke()
        return node_down_problems(api, host, "c")

    (problem,) = until_api(raised, 120, "a NODE_DOWN problem for c")
    assert problem["severity"] == "4"  # HIGH
    others = [p["name"] for p in api.problem.get(hostids=[host], output=["name"])
              if "NODE_DOWN" not in p["name"] and "PEER_UNREACHABLE" not in p["name"]]
    assert others == [], others
    c.start()

    def resolved():
        poke()
        return node_down_problems(api, host, "c") == []

    until_api(resolved, 120, "the NODE_DOWN problem to resolve after c's restart")


def test_the_agent_template_discovers_what_marsadm_view_says_and_a_killed_marsd_is_a_problem(zbx):
    """One Zabbix host per MARS node (here a): its resources, its member of each and every peer
    are discovered; the values are `marsadm view-*`'s on a; c's killed marsd is a problem on a."""
    a, b, c, api, host, _, _ = zbx

    def poke() -> None:
        poll(api, host)

    until_api(lambda: agrees(api, host, a, poke), 120, "a's member items to be discovered and equal marsadm view-*")
    assert items(api, host, "mars.resource.size[r]")["mars.resource.size[r]"]["lastvalue"] == str(32 << 20)
    until_api(lambda: (poke(), peers_alive(api, host) == {"b": "1", "c": "1"})[1], 60, "peers b and c discovered")
    killed_and_back(api, host, c, poke)


def test_the_cron_push_fills_the_trapper_template_for_every_node(zbx):
    """mars-zabbix send, as the cron job runs it on each node, to one trapper host per node:
    every member of r is discovered on its node's host with `marsadm view-*`'s values."""
    a, b, c, api, _, group, templates = zbx
    cron = (TEMPLATES / "cron.d" / "mars-zabbix").read_text()
    assert re.search(r"^\* \* \* \* \* root .*mars-zabbix .*send", cron, re.MULTILINE), cron
    hosts = {n.host: api.host.create(host=f"mars-{n.host}-trap", groups=[{"groupid": group}],
                                     templates=[{"templateid": templates[TRAP_TEMPLATE]}],
                                     macros=QUIET_DISK)["hostids"][0]
             for n in (a, b, c)}

    def send(node) -> bool:  # works with the node's marsd down too: the document then says so
        r = run([str(BIN / "mars-zabbix"), "--mars-dir", str(node.mars_dir), "send", "--zabbix-server", "127.0.0.1",
                 "--zabbix-port", "10051", "--zabbix-host", f"mars-{node.host}-trap"], check=False)
        # A host made a moment ago is refused until the server's configuration cache has it (2 s
        # here), as mars-zabbix's message says; any other failure is one.
        assert r.returncode == 0 or "refused the status" in r.stderr + r.stdout, r.stdout + r.stderr
        return r.returncode == 0

    for node in (a, b, c):  # the first sends discover; the items discovery made take the next ones
        until_api(lambda: agrees(api, hosts[node.host], node, lambda: send(node)), 120,
                  f"the pushed document to fill mars-{node.host}-trap's member items")
    killed_and_back(api, hosts["a"], c, lambda: send(a))


def test_every_userparameter_key_answers_as_user_zabbix(zbx):
    a, b, *_ = zbx
    restart_agent()
    keys = ["mars.status", "mars.discovery[resources]", "mars.discovery[members]", "mars.discovery[peers]",
            "mars.value[r/b/replay-rest]", "mars.value[r/a/role]"]
    conf = Path("/etc/zabbix/zabbix_agentd.conf.d/userparameter_mars.conf").read_text()
    declared = set(re.findall(r"^UserParameter=([^,\[]+)", conf, re.MULTILINE))
    assert declared == {k.split("[", 1)[0] for k in keys}, declared  # every key the file declares is tried
    for key in keys:
        r = subprocess.run(["runuser", "-u", "zabbix", "--", "zabbix_agentd", "-c", "/etc/zabbix/zabbix_agentd.conf",
                            "-t", key], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "ZBX_NOTSUPPORTED" not in r.stdout, f"{key}: {r.stdout}{r.stderr}"
        assert re.search(r"\[(t|s|u|d)\|.+\]", r.stdout), f"{key}: {r.stdout}"
    r = subprocess.run(["runuser", "-u", "zabbix", "--", "zabbix_agentd", "-c", "/etc/zabbix/zabbix_agentd.conf", "-t",
                        "mars.value[r/b/replay-rest]"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith(f"[t|{view(b, 'replay-rest')}]"), r.stdout  # a's view of b = b's own
    # Without the sudoers rule the same key is refused: the rule is what lets zabbix read /mars.
    SUDOERS.rename(SUDOERS.with_suffix(".off"))
    try:
        r = subprocess.run(["runuser", "-u", "zabbix", "--", "zabbix_agentd", "-c", "/etc/zabbix/zabbix_agentd.conf",
                            "-t", "mars.discovery[resources]"], capture_output=True, text=True, timeout=60)
        assert '"{#RESOURCE}"' not in r.stdout, r.stdout
    finally:
        SUDOERS.with_suffix(".off").rename(SUDOERS)
    wait_until(lambda: SUDOERS.exists(), 5, "the rule back")
