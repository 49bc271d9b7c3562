"""The daemon's processes: delivery agents (relayq.daemon.agent) and forked listeners
(relayq.server.prefork). Real daemons, real sockets, real process trees."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq
from tests.integration.test_daemon import DaemonProcess, free_port, wait_for
from tests.integration.test_listener import Raw, session

from relayq.core.config import Config
from relayq.core.errors import EX_OK
from relayq.queue.submit import Context
from relayq.server.aio import Server
from relayq.server.handler import State
from relayq.system.log import Log

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

MSG = b"From: alice@example.org\nSubject: hi\n\nhello\n"


def children(pid: int) -> dict[int, str]:
    """pid -> command line of the direct children of `pid`."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return out


def agents(pid: int) -> list[int]:
    return [p for p, cmd in children(pid).items() if "relayq.daemon.agent" in cmd]


def listeners(pid: int) -> list[int]:
    return [p for p, cmd in children(pid).items() if "relayq.daemon.agent" not in cmd]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    return Relayq(tmp_path, pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                  concurrency=2, listen=[f"127.0.0.1:{free_port()}"])


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.kill()


def port_of(rq: Relayq) -> int:
    return int(str(rq.settings["listen"][0]).rsplit(":", 1)[1])  # type: ignore[index]


def send(port: int, n: int) -> None:
    c = session(port)
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    assert c.cmd(f"RCPT TO:<r{n}@example.org>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: n%d\r\n\r\nhello\r\n.\r\n" % n)
    assert c.reply().startswith("250 2.0.0")
    c.cmd("QUIT")
    c.close()


def test_deliveries_run_in_agent_processes_that_hold_no_secret_in_argv_or_environment(
    rq: Relayq, smarthost_factory: SmarthostFactory, daemons: list[DaemonProcess]
) -> None:
    sh = smarthost_factory(auth={"u": "s3cret-agent-pw"}, auth_require_tls=False)
    rq.configure(smarthost=sh.smarthost, password="s3cret-agent-pw", user="u", tls="none")
    d = DaemonProcess(rq).wait_started()
    daemons.append(d)
    wait_for(lambda: len(agents(d.proc.pid)) == 2, what="two delivery agents")
    for pid in agents(d.proc.pid):
        for name in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{name}", "rb") as f:
                assert b"s3cret-agent-pw" not in f.read()
    assert rq.sendmail("bob@example.org", "-odq", input=MSG).returncode == EX_OK
    wait_for(lambda: len(sh.transactions) == 1, what="the delivery")
    assert d.stop() == EX_OK
    assert agents(d.proc.pid) == []


def test_a_dead_agent_is_replaced_and_its_message_still_goes_once(
    rq: Relayq, smarthost_factory: SmarthostFactory, daemons: list[DaemonProcess]
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, concurrency=1)
    d = DaemonProcess(rq).wait_started()
    daemons.append(d)
    wait_for(lambda: len(agents(d.proc.pid)) == 1, what="the delivery agent")
    [first] = agents(d.proc.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(first), what="the agent to die")
    assert rq.sendmail("bob@example.org", "-odq", input=MSG).returncode == EX_OK
    wait_for(lambda: len(sh.transactions) == 1, what="delivery by a new agent")
    time.sleep(0.3)
    assert len(sh.transactions) == 1 and rq.queued() == []
    assert "delivery agent" in rq.log() and "died" in rq.log()
    [second] = agents(d.proc.pid)
    assert second != first
    assert d.stop() == EX_OK


def test_listener_processes_share_the_sockets_and_one_connection_limit(
    rq: Relayq, smarthost_factory: SmarthostFactory, daemons: list[DaemonProcess]
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, smtp_processes=3, smtp_max_connections=4)
    d = DaemonProcess(rq, "--listen").wait_ready()
    daemons.append(d)
    wait_for(lambda: len(listeners(d.proc.pid)) == 2, what="two forked listeners")
    port = port_of(rq)
    for n in range(24):
        send(port, n)
    wait_for(lambda: len(sh.transactions) == 24, what="24 deliveries")
    got = sorted(rcpt for t in sh.transactions for rcpt in t.rcpt_tos)
    assert got == sorted(f"r{n}@example.org" for n in range(24))  # each exactly once
    held = [session(port) for _ in range(4)]  # whichever processes took them
    fifth = Raw(port)
    assert fifth.reply().startswith("421 4.7.0")  # the limit is for all processes together
    fifth.close()
    for c in held:
        c.close()
    kids = listeners(d.proc.pid)
    assert d.stop() == EX_OK
    for pid in kids:
        assert not alive(pid)


def test_forked_listeners_reload_and_follow_a_killed_daemon(
    rq: Relayq, smarthost_factory: SmarthostFactory, daemons: list[DaemonProcess]
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, smtp_processes=2, max_message_size=100000)
    d = DaemonProcess(rq, "--listen").wait_ready()
    daemons.append(d)
    wait_for(lambda: len(listeners(d.proc.pid)) == 1, what="a forked listener")
    port = port_of(rq)
    rq.configure(max_message_size=12345)
    d.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in rq.log(), what="the reload")

    def all_say_new_size() -> bool:  # the kernel spreads connections over both processes
        for _ in range(8):
            c = session(port)
            ok = "SIZE 12345" in c.cmd("EHLO again.example.org")
            c.close()
            if not ok:
                return False
        return True

    wait_for(all_say_new_size, what="every listener to apply the new limit")
    kids = listeners(d.proc.pid) + agents(d.proc.pid)
    d.kill()  # SIGKILL: no goodbye; the life pipes reach end of file
    wait_for(lambda: not any(alive(p) for p in kids), what="the children to follow")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))  # nobody holds the port any more
    s.close()


def test_a_cloned_server_matches_a_constructed_one() -> None:
    """Listener clones per-connection Servers (aiosmtpd's constructor is slow): a new
    aiosmtpd release that changes the constructor must fail here, not in production."""
    cfg = Config({})
    loop = asyncio.new_event_loop()
    try:
        state = State(cfg, Log(use_syslog=False), Context(cfg), user="smtp", uid=0,
                      strict=True, on_commit=None)
        template = Server(state, loop=loop)
        made, clone = Server(state, loop=loop), template.clone()
        assert set(vars(made)) == set(vars(clone))
        for key, value in vars(clone).items():
            owner = getattr(value, "__self__", None)
            assert owner is not template, key  # nothing still bound to the template
            if key.startswith("_stream_reader") or key in ("_closed",):
                assert value is not getattr(template, key), key
        for verb, method in clone._smtp_methods.items():
            assert getattr(method, "__self__", clone) is clone, verb
        assert clone._reader is not template._reader if hasattr(clone, "_reader") else True
    finally:
        loop.close()


