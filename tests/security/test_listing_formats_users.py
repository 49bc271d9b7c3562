"""`mailq --json-lines` and `relayq qshape` for users who may not read the queue
(issue 15 §3): the daemon answers, with their own messages only, everyone's for
the admin group, as for mailq (tests/security/test_privilege.py)."""

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

    from relayq.testing.smarthost import SmarthostFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates users: needs root")

ALICE, BOB, ADMIN = "rqtest-alice", "rqtest-bob", "rqtest-admin"


@pytest.fixture
def system(launchers: Path, smarthost_factory: SmarthostFactory) -> Iterator[System]:
    sh = smarthost_factory()
    sysq = System(launchers, smarthost=sh.smarthost, delivery_mode="deferred",
                  admin_group=ADMIN_GROUP, queue_interval="1h")
    yield sysq
    sysq.cleanup()


def _queue(system: System) -> None:
    for user, rcpts in ((ALICE, ["a1@example.org", "a2@example.net"]),
                        (ALICE, ["a3@example.org"]), (BOB, ["b1@example.com"])):
        r = system.sendmail_as(user, "-odq", *rcpts, input=b"Subject: s\n\nbody\n")
        assert r.returncode == 0, r.stderr


def _rows(r: object) -> list[list[str]]:
    stdout = r.stdout  # type: ignore[attr-defined]
    return [line.split() for line in stdout.decode().splitlines()]


def test_users_see_their_own_messages_only(system: System) -> None:
    d = DaemonProcess(system.rq).wait_started()
    try:
        wait_for(lambda: (system.spool_root / "relayq.sock").exists(), what="the local socket")
        _queue(system)
        wait_for(lambda: len(system.rq.spool.ids()) == 3, what="three queued")
        alice = system.mailq_as(ALICE, "--json-lines")
        bob_shape = system.relayq_as(BOB, "qshape", "-b", "1")
        alice_shape = system.relayq_as(ALICE, "qshape", "-b", "1")
        admin_shape = system.relayq_as(ADMIN, "qshape", "-b", "1")
    finally:
        d.stop()
    for r in (alice, bob_shape, alice_shape, admin_shape):
        assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in alice.stdout.splitlines()]
    assert sorted(r["address"] for o in objs for r in o["recipients"]) == [
        "a1@example.org", "a2@example.net", "a3@example.org"]
    assert {o["queue_name"] for o in objs} == {"incoming"}
    assert _rows(bob_shape)[1:] == [["TOTAL", "1", "1"], ["example.com", "1", "1"]]
    assert _rows(alice_shape)[1:] == [["TOTAL", "3", "3"], ["example.org", "2", "2"],
                                      ["example.net", "1", "1"]]
    assert _rows(admin_shape)[1] == ["TOTAL", "4", "4"]  # the admin group sees everyone's


def test_qshape_without_a_daemon_says_so(system: System) -> None:
    r = system.relayq_as(ALICE, "qshape")
    assert r.returncode == 69
    assert "daemon is not running" in assert_one_line_error(r)
