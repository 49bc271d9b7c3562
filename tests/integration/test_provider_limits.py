"""What providers enforce (issue 16): SMTPUTF8 only when needed, sending limits,
connection limits. Real loopback smarthosts, real state files; nothing mocked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from tests.integration.test_smtp_transport import config, message, one, statuses

if TYPE_CHECKING:
    from relayq.testing.smarthost import SmarthostFactory

pytestmark = pytest.mark.timeout(120)

ASCII = b"From: a@example.org\nTo: b@example.org\nSubject: plain\n\nbody\n"
UTF8_HEAD = "From: a@example.org\nSubject: gr\u00fc\u00dfe\n\nbody\n".encode()


@pytest.mark.parametrize("offered", [True, False])
def test_smtputf8_not_sent_for_an_all_ascii_message(
        smarthost_factory: SmarthostFactory, offered: bool) -> None:
    sh = smarthost_factory(smtputf8=offered)
    r, _ = one(config(sh.smarthost), message(data=ASCII, smtputf8=True))
    assert statuses(r) == ["sent"]
    assert "SMTPUTF8" not in sh.transactions[0].mail_options
    assert sh.transactions[0].content.replace(b"\r\n", b"\n").endswith(ASCII)


def test_smtputf8_sent_when_the_header_needs_it(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(smtputf8=True)
    r, _ = one(config(sh.smarthost), message(data=UTF8_HEAD, smtputf8=True, body="8BITMIME"))
    assert statuses(r) == ["sent"]
    assert "SMTPUTF8" in sh.transactions[0].mail_options


def test_smtputf8_sent_when_the_envelope_needs_it(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(smtputf8=True)
    rcpt = "j\u00fcrgen@example.org"
    r, _ = one(config(sh.smarthost), message((rcpt,), data=ASCII, smtputf8=True))
    assert statuses(r) == ["sent"]
    assert "SMTPUTF8" in sh.transactions[0].mail_options
