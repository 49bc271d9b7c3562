"""The test servers' parts on their own: the raw scripted server and the fault vocabulary."""

from __future__ import annotations

import smtplib
import socket

import pytest

from relayq.testing import smarthost
from relayq.testing.faults import STEPS, Fault
from relayq.testing.hostile import HostileRelay
from relayq.testing.hostile_session import _unstuff
from relayq.testing.scripted import ScriptedServer


def test_scripted_server_answers_in_turn_and_records_every_byte() -> None:
    replies: dict[str, bytes | list[bytes]] = {
        "MAIL": [b"451 4.3.0 later\r\n", b"250 2.1.0 ok\r\n"]}
    with ScriptedServer(replies=replies) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            f = sock.makefile("rb")
            assert f.readline().startswith(b"220 raw.example.org")
            answers = []
            for line in (b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>\r\n",
                         b"QUIT\r\n"):
                sock.sendall(line)
                answers.append(f.readline())
        assert answers == [b"451 4.3.0 later\r\n", b"250 2.1.0 ok\r\n", b"250 2.1.0 ok\r\n",
                           b"221 2.0.0 Bye\r\n"]  # the last reply of a list repeats
    assert server.received == b"MAIL FROM:<a@b>\r\n" * 3 + b"QUIT\r\n"
    assert server.sessions == 1


def test_the_raw_server_is_still_importable_from_smarthost() -> None:
    assert smarthost.ScriptedServer is ScriptedServer


def test_fault_vocabulary_is_checked() -> None:
    assert "eod" in STEPS
    with pytest.raises(ValueError, match="unknown step"):
        Fault("nowhere")
    with pytest.raises(ValueError, match="unknown then"):
        Fault("eod", then="explode")


def test_unstuff_removes_the_dot_line_and_stuffing() -> None:
    assert _unstuff(b"a\r\n..b\r\n.\r\n") == b"a\r\n.b\r\n"


def test_hostile_relay_session_takes_a_message() -> None:
    relay = HostileRelay(faults=(Fault("rcpt", b"452 4.5.3 too many\r\n", nth=2),))
    with relay, smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        refused = client.sendmail("a@example.org", ["x@example.org", "y@example.org"],
                                  b"Subject: t\r\n\r\nhi\r\n")
    assert set(refused) == {"y@example.org"}
    assert relay.copies("x@example.org") == 1 and relay.copies("y@example.org") == 0
