"""The hostile relay itself, driven by Python's smtplib: it takes mail as a real ESMTP
server does, and its faults strike where they say (the matrix relies on both)."""

from __future__ import annotations

import smtplib
import socket
from typing import TYPE_CHECKING

import pytest

from relayq.testing.hostile import Fault, HostileRelay, server_context

if TYPE_CHECKING:
    from relayq.testing.tls import TestPKI

MSG = b"Subject: hostile\r\n\r\nbody\r\n.leading dot\r\n"


def test_it_takes_mail_over_starttls_with_cram_md5(pki: TestPKI) -> None:
    with HostileRelay(tls_context=server_context(pki, "good"), auth={"u": "pw"},
                      auth_mechanisms=("CRAM-MD5",)) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.starttls(context=pki.client_context())
            c.ehlo("client.example.org")
            assert c.has_extn("auth") and "CRAM-MD5" in c.esmtp_features["auth"]
            c.login("u", "pw")
            c.sendmail("a@example.org", ["b@example.org", "c@example.org"], MSG)
        [d] = relay.deliveries
        assert d.tls and d.committed and d.answered and d.rcpt_tos == ["b@example.org",
                                                                         "c@example.org"]
        assert d.data == MSG
        assert relay.copies("c@example.org") == 1
        assert not [c for c in relay.commands(clear=True) if c.startswith(("MAIL", "AUTH"))]


def test_a_wrong_password_is_refused() -> None:
    with HostileRelay(auth={"u": "pw"}) as relay, smtplib.SMTP(
            "127.0.0.1", relay.port, timeout=10) as c, pytest.raises(
            smtplib.SMTPAuthenticationError):
        c.login("u", "nope")


def test_faults_strike_at_their_step_and_heal() -> None:
    fault = Fault("rcpt", b"452 4.5.3 Too many recipients\r\n", nth=2, and_after=True)
    with HostileRelay(faults=(fault,)) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            refused = c.sendmail("a@example.org", ["1@example.org", "2@example.org",
                                                   "3@example.org"], MSG)
        assert set(refused) == {"2@example.org", "3@example.org"}
        relay.heal()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            assert c.sendmail("a@example.org", ["2@example.org", "3@example.org"], MSG) == {}
        assert [relay.copies(f"{i}@example.org") for i in (1, 2, 3)] == [1, 1, 1]


def test_a_committed_message_whose_answer_never_comes() -> None:
    with HostileRelay(faults=(Fault("eod", accept=True, then="close"),)) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c, pytest.raises(
                smtplib.SMTPServerDisconnected):
            c.sendmail("a@example.org", ["b@example.org"], MSG)
        assert relay.copies("b@example.org") == 0
        assert relay.copies("b@example.org", answered=False) == 1


def test_a_greeting_of_421_then_close() -> None:
    with HostileRelay(faults=(Fault("greeting", b"421 4.3.2 go away\r\n", then="close"),)
                      ) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            got = b""
            while chunk := s.recv(100):
                got += chunk
        assert got == b"421 4.3.2 go away\r\n"
