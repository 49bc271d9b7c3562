"""`relayq status` for users who may not read the queue (issue 15 §3): the daemon
answers with the counts by state; a relay's error line only for the admin group
(it may name another user's recipient); without a daemon, one line and exit 69.
The monitoring plugin's mode (-w/-c) takes the same answer."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import assert_one_line_error
from tests.helpers.users import ADMIN_GROUP, System
from tests.integration.test_daemon import DaemonProcess, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates users: needs root")

ALICE, ADMIN = "rqtest-alice", "rqtest-admin"


@pytest.fixture
def system(launchers: Path) -> Iterator[System]:
    sysq = System(launchers, smarthost="[127.0.0.1]:9", delivery_mode="deferred",
                  admin_group=ADMIN_GROUP, queue_interval="1h")
    yield sysq
    sysq.cleanup()


def test_a_user_asks_the_daemon(system: System) -> None:
    for _ in range(2):  # root's mail, tried once against the down smarthost
        assert system.rq.sendmail("-odq", "bob@example.org", input=b"\nx\n").returncode == 0
    assert system.rq.sendmail("-q").returncode == 75
    r = system.relayq_as(ALICE, "status")
    assert r.returncode == 69, r.stdout + r.stderr
    assert "no relayq daemon is running" in assert_one_line_error(r)
    d = DaemonProcess(system.rq).wait_ready()
    try:
        wait_for(lambda: (system.spool_root / "relayq.sock").exists(), what="the socket")
        r = system.sendmail_as(ALICE, "-odq", "carol@example.org", input=b"\nx\n")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(system.rq.spool.ids()) == 3, what="alice's message queued")
        alice = system.relayq_as(ALICE, "status", "--json")
        admin = system.relayq_as(ADMIN, "status", "--json")
        plain = system.relayq_as(ALICE, "status")
        plugin = system.relayq_as(ALICE, "status", "-w", "2", "-c", "5")
    finally:
        assert d.stop() == 0
    assert alice.returncode == 0, alice.stderr
    info = json.loads(alice.stdout)
    assert info["messages"] == 3 and info["daemon_running"] and info["daemon_pid"]
    assert info["states"]["deferred"] == 2 and info["states"]["queued"] == 1, info
    relay = info["relays"]["127.0.0.1"]
    assert relay["deferred"] == 2 and relay["last_error_time"] and relay["last_error"] is None
    seen = json.loads(admin.stdout)["relays"]["127.0.0.1"]["last_error"]
    assert seen and "Connection refused" in seen, admin.stdout
    assert plain.returncode == 0 and b"2 deferred" in plain.stdout, plain.stdout
    assert plugin.returncode == 1 and plugin.stdout.startswith(b"RELAYQ WARNING - 3 messages")
