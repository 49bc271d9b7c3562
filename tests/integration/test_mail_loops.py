"""Issue 12 §3: a relay loop keeps the message queued instead of losing it.

Before: the defaults (smarthost [127.0.0.1] port 25, listen 127.0.0.1:25)
made `sendmail -bd` relay to itself; after 25 hops `554 5.6.0 Too many
hops`, the bounce looped the same way and was discarded. Now a loop is seen
as sendmail ("mail loops back to me") and Postfix ("loops back to myself")
see it: the relay greets with our own name, or the smarthost is one of our
listen addresses. The message stays queued (4.4.6, never bounced), mailq
shows why, `relayq status` warns; check-config and the daemon refuse such a
configuration.
"""

from __future__ import annotations

import json
import signal
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq, assert_one_line_error
from tests.integration.test_daemon import DaemonProcess, free_port, kill_detached, wait_for

from relayq.core.errors import EX_CONFIG, EX_OK

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

MSG = b"From: alice@example.org\nTo: bob@example.org\nSubject: loop\n\nround and round\n"
LOOP = "4.4.6 mail loops back to me"


def loop_configs(port: int) -> list[dict[str, object]]:
    """The same host:port written the ways a configuration may write it."""
    return [
        {"smarthost": f"[127.0.0.1]:{port}", "listen": [f"127.0.0.1:{port}"]},
        {"smarthost": f"localhost:{port}", "listen": [f"127.0.0.1:{port}"]},
        {"smarthost": f"[localhost]:{port}", "listen": [f"[::1]:{port}"]},
        {"smarthost": f"[::1]:{port}", "listen": [f"127.0.0.1:{port}", f"[::1]:{port}"]},
        {"smarthost": f"[IPv6:::1]:{port}", "listen": [f"[::]:{port}"],
         "listen_nonloopback": True},
        {"smarthost": f"[127.0.0.1]:{port}", "listen": [f"0.0.0.0:{port}"],
         "listen_nonloopback": True},
        {"smarthost": ["[mail.example.org]", f"[127.0.0.1]:{port}"],
         "listen": [f"127.0.0.1:{port}"]},
        {"smarthost": "[127.0.0.1]", "port": port, "listen": [f"127.0.0.1:{port}"]},
    ]


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    return Relayq(tmp_path, pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h")


@pytest.mark.parametrize("n", range(len(loop_configs(0))))
def test_check_config_refuses_a_smarthost_that_is_our_listener(rq: Relayq, n: int) -> None:
    rq.configure(**loop_configs(free_port())[n])
    r = rq.run("relayq", "check-config")
    assert r.returncode == EX_CONFIG, r
    assert "is this relayq's own listener" in assert_one_line_error(r)


def test_check_config_accepts_another_port(rq: Relayq) -> None:
    port = free_port()
    rq.configure(smarthost=f"[127.0.0.1]:{port + 1}", listen=[f"127.0.0.1:{port}"])
    assert rq.run("relayq", "check-config").returncode == EX_OK


def test_the_defaults_are_refused_for_a_listener(tmp_path: Path) -> None:
    """The configuration of the report: nothing set but the files."""
    rq = Relayq(tmp_path)
    rq.write_config(f'queue_dir = "{rq.queue_dir}"\nlog_file = "{rq.log_file}"\n'
                    f'pid_file = "{tmp_path}/relayq.pid"\nsyslog = false\n')
    r = rq.run("relayq", "check-config")
    assert r.returncode == EX_CONFIG
    err = r.stderr.decode()  # the loop's line, and maybe warnings (an unqualified domain)
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if ": warning: " not in x]
    assert "smarthost [127.0.0.1]:25 is this relayq's own listener (listen 127.0.0.1:25)" in line


@pytest.mark.parametrize("argv", [["relayq", "daemon", "--listen", "--foreground"],
                                  ["relayq", "daemon", "--listen"], ["sendmail", "-bd"],
                                  ["sendmail", "-bD", "-q1m"], ["sendmail", "-q1m"],
                                  ["relayq", "daemon", "--foreground"]])
def test_the_daemon_refuses_a_smarthost_that_is_its_listener(rq: Relayq, argv: list[str]) -> None:
    rq.configure(**loop_configs(free_port())[0])
    try:
        r = rq.run(*argv, timeout=30)
    finally:
        kill_detached(rq.root / "relayq.pid")  # only if it started after all
    assert r.returncode == EX_CONFIG, r
    assert "is this relayq's own listener" in assert_one_line_error(r)
    assert not (rq.root / "relayq.pid").exists()


@pytest.fixture
def other(tmp_path: Path) -> Iterator[Relayq]:
    """A second relayq on this host, listening: it greets with our name."""
    root = tmp_path / "other"
    root.mkdir()
    b = Relayq(root, pid_file=str(root / "relayq.pid"), queue_interval="1h",
               listen=[f"127.0.0.1:{free_port()}"], delivery_mode="deferred",
               ehlo_name="relayq.example.org")  # this host's name, whatever the machine's
    d = DaemonProcess(b, "--listen").wait_ready()
    yield b
    d.stop()


def queued_loop(rq: Relayq) -> None:
    """The message is still queued, every recipient pending, with the loop as reason."""
    [(env, data)] = rq.queued()
    assert b"round and round" in data
    assert [r.state for r in env.recipients] == ["pending"]
    assert env.error.startswith(f"Deferred: {LOOP} ("), env.error
    mailq = rq.run("mailq").stdout.decode()
    assert "loops back to me" in mailq, mailq
    status = rq.run("relayq", "status")
    assert status.returncode == EX_OK
    assert "\nwarning:      mail loops back to me (" in status.stdout.decode(), status.stdout
    info = json.loads(rq.run("relayq", "status", "--json").stdout)
    assert "loops back to me" in info["warning"]


def test_a_relay_greeting_with_our_name_keeps_the_message_queued(
    rq: Relayq, other: Relayq
) -> None:
    port = int(str(other.settings["listen"][0]).rsplit(":", 1)[1])  # type: ignore[index]
    rq.configure(smarthost=f"[127.0.0.1]:{port}", ehlo_name="relayq.example.org")
    # (listen: the defaults, port 25: the address says nothing, the greeting does)
    r = rq.sendmail("-odi", "bob@example.org", input=MSG)
    assert r.returncode == EX_OK, r.stderr
    queued_loop(rq)
    assert other.queued() == []  # nothing was sent: the loop was seen at the greeting
    assert LOOP in rq.log()


def test_a_smarthost_at_our_listen_address_is_never_sent_to(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    """Whoever answers there (our listener, or anything else on that socket)."""
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, listen=[f"127.0.0.1:{sh.port}"])
    assert rq.sendmail("-odi", "bob@example.org", input=MSG).returncode == EX_OK
    assert rq.sendmail("-q").returncode != EX_OK  # still queued: 75
    queued_loop(rq)
    assert sh.transactions == []


def test_a_reload_to_a_loop_is_refused(rq: Relayq) -> None:
    port = free_port()
    rq.configure(listen=[f"127.0.0.1:{port}"], delivery_mode="deferred")
    d = DaemonProcess(rq, "--listen").wait_ready()
    try:
        rq.configure(smarthost=f"localhost:{port}")
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in rq.log(), what="the refusal")
        assert "is this relayq's own listener" in rq.log()
        assert "configuration reloaded" not in rq.log()
    finally:
        assert d.stop() == EX_OK


def test_no_listener_means_a_local_mta_on_that_port_is_a_relay(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    """relayq in front of another MTA on 127.0.0.1:PORT: `listen = []` says so."""
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, listen=[])
    assert rq.run("relayq", "check-config").returncode == EX_OK
    assert rq.sendmail("-odi", "bob@example.org", input=MSG).returncode == EX_OK
    assert len(sh.transactions) == 1 and rq.queued() == []
