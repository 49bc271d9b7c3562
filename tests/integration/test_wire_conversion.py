"""Issue 12 §9/§10: 8-bit mail through a relay without 8BITMIME, lines over 998 octets.

A real loopback aiosmtpd relay (it refuses a line over 1001 octets with CRLF,
as Exim 4.95 does) and the real transport; the received bytes are decoded
with the stdlib email package and compared with what was submitted.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import io
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq
from tests.integration.test_smtp_transport import BODY, Run, config, message, one, statuses

from relayq.core.errors import EX_OK

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory, Transaction

pytestmark = pytest.mark.timeout(120)

UTF8_BODY = "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 caf\u00e9  \n.dot line\n".encode()


def received(t: Transaction) -> email.message.Message:
    return email.message_from_bytes(t.content.replace(b"\r\n", b"\n"))


def wire_lines(t: Transaction) -> list[bytes]:
    return t.content.split(b"\r\n")


def assert_fit(t: Transaction, seven: bool) -> None:
    assert max(len(line) for line in wire_lines(t)) <= 998
    if seven:
        assert t.content.isascii()


def test_utf8_body_through_a_relay_without_8bitmime(smarthost_factory: SmarthostFactory) -> None:
    data = b"From: a@example.org\nSubject: hello\n\n" + UTF8_BODY
    sh = smarthost_factory(eightbitmime=False)
    r, _ = one(config(sh.smarthost), message(data=data, body="8BITMIME"))
    assert statuses(r) == ["sent"]
    [t] = sh.transactions
    assert not any(o.upper().startswith("BODY=") for o in t.mail_options)
    assert_fit(t, seven=True)
    got = received(t)
    assert got["Content-Transfer-Encoding"] == "quoted-printable"
    assert got.get_payload(decode=True) == UTF8_BODY
    assert got.get_content_charset() == "utf-8"


def test_ehlo_502_helo_fallback_converts_8bit(smarthost_factory: SmarthostFactory) -> None:
    data = b"From: a@example.org\nSubject: caf\xc3\xa9\n\n" + UTF8_BODY
    sh = smarthost_factory(replies={"ehlo": "502 5.5.2 no EHLO here"})
    r, _ = one(config(sh.smarthost), message(data=data, body="8BITMIME"))
    assert statuses(r) == ["sent"]
    [t] = sh.transactions
    assert t.mail_options == []
    assert_fit(t, seven=True)
    got = received(t)
    assert str(email.message_from_bytes(t.content, policy=email.policy.default)["Subject"]) \
        == "caf\u00e9"
    assert got.get_payload(decode=True) == UTF8_BODY


@pytest.mark.parametrize("eightbit", [True, False])
def test_a_5000_octet_line_is_reencoded(smarthost_factory: SmarthostFactory,
                                        eightbit: bool) -> None:
    line = b"x" * 2500 + b" \xc3\xa9 " + b"y" * 2500 if not eightbit else b"z" * 5000
    body = b"first\n" + line + b"\nlast\n"
    data = b"From: a@example.org\nSubject: long\n\n" + body
    sh = smarthost_factory(eightbitmime=eightbit)
    r, _ = one(config(sh.smarthost), message(data=data, body="8BITMIME" if not body.isascii()
                                             else "7BIT"))
    assert statuses(r) == ["sent"], r.outcomes
    [t] = sh.transactions
    assert_fit(t, seven=not eightbit)
    assert received(t).get_payload(decode=True) == body


def test_long_header_is_folded(smarthost_factory: SmarthostFactory) -> None:
    refs = " ".join(f"<{i}.part@example.org>" for i in range(150))
    data = f"From: a@example.org\nReferences: {refs}\nSubject: x\n\nbody\n".encode()
    sh = smarthost_factory()
    r, _ = one(config(sh.smarthost), message(data=data))
    assert statuses(r) == ["sent"]
    [t] = sh.transactions
    assert_fit(t, seven=True)
    got = received(t)
    assert got["References"].replace("\n", "") == refs  # unfolded, nothing lost
    assert got.get_payload() == "body\n"


MULTI = (
    b"From: a@example.org\nSubject: parts\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="b1"\n\n'
    b"preamble\n--b1\nContent-Type: text/plain; charset=us-ascii\n\nplain part\n"
    b"--b1\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    + UTF8_BODY +
    b"--b1\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    b"AAECAwQF\n--b1--\nepilogue\n"
)


def test_multipart_with_one_8bit_part(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(eightbitmime=False)
    r, _ = one(config(sh.smarthost), message(data=MULTI, body="8BITMIME"))
    assert statuses(r) == ["sent"]
    [t] = sh.transactions
    assert_fit(t, seven=True)
    got = received(t)
    plain, utf, binary = got.get_payload()
    assert plain.get_payload() == "plain part"
    assert plain["Content-Transfer-Encoding"] is None  # untouched
    assert utf["Content-Transfer-Encoding"] == "quoted-printable"
    assert utf.get_payload(decode=True) == UTF8_BODY[:-1]  # the last LF is the boundary's
    assert binary.get_payload(decode=True) == bytes(range(6))


def test_8bit_inside_multipart_signed_is_refused_with_a_reason(
        smarthost_factory: SmarthostFactory) -> None:
    data = (b"From: a@example.org\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/signed; boundary="s"; protocol="application/pgp-signature"'
            b"\n\n--s\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit"
            b"\n\n" + UTF8_BODY + b"--s\nContent-Type: application/pgp-signature\n\nSIG\n--s--\n")
    sh = smarthost_factory(eightbitmime=False)
    r, _ = one(config(sh.smarthost), message(data=data, body="8BITMIME"))
    assert statuses(r) == ["failed"] and r.outcomes[0].dsn_code == "5.6.3"
    assert "multipart/signed" in r.outcomes[0].reply
    assert "MAIL" not in sh.verbs()


def test_bounce_of_an_8bit_message_through_a_7bit_relay(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(eightbitmime=False,
                           rcpt_replies={"bob@example.org": "550 5.1.1 no such user"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    msg = b"Subject: hi\n\n" + UTF8_BODY + b"w" * 3000 + b"\n"
    assert rq.sendmail("-f", "alice@example.org", "bob@example.org", input=msg).returncode == 0
    assert rq.sendmail("-q").returncode == EX_OK
    [bounce] = sh.transactions  # bob refused; the bounce to alice went through
    assert bounce.rcpt_tos == ["alice@example.org"]
    assert_fit(bounce, seven=True)
    got = received(bounce)
    assert got.get_content_type() == "multipart/report"
    [orig] = [p for p in got.walk() if p.get_content_type() in ("message/rfc822",
                                                                 "message/global")]
    if orig.get_content_type() == "message/rfc822":
        inner = orig.get_payload()[0]
    else:  # base64 (RFC 6532 3.5): the email package parses message/* as a container
        import base64

        raw = bounce.content.replace(b"\r\n", b"\n")
        body = raw.split(b"Content-Description: Undelivered message\n\n", 1)[1]
        inner = email.message_from_bytes(base64.b64decode(body.split(b"\n\n--", 1)[0]))
    assert inner.get_payload(decode=True) == UTF8_BODY + b"w" * 3000 + b"\n"
    assert rq.queued() == []


def test_unchanged_message_goes_out_byte_for_byte(smarthost_factory: SmarthostFactory) -> None:
    data = b"From: a@example.org\nSubject: x\n\n" + UTF8_BODY + b"q" * 998 + b"\n"
    sh = smarthost_factory()
    r, _ = one(config(sh.smarthost), message(data=data, body="8BITMIME"))
    assert statuses(r) == ["sent"]
    assert sh.transactions[0].content == data.replace(b"\n", b"\r\n")


def test_utf8_subject_with_an_ascii_envelope_needs_no_smtputf8(
        smarthost_factory: SmarthostFactory) -> None:
    data = ('From: "J\u00f6rg M\u00fcller" <a@example.org>\nSubject: Gr\u00fc\u00dfe\n\n'
            "caf\u00e9\n").encode()
    sh = smarthost_factory(smtputf8=False, eightbitmime=False)
    r, _ = one(config(sh.smarthost), message(data=data, smtputf8=True, body="8BITMIME"))
    assert statuses(r) == ["sent"], r.outcomes
    [t] = sh.transactions
    assert "SMTPUTF8" not in t.mail_options
    assert_fit(t, seven=True)
    got = email.message_from_bytes(t.content.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert str(got["Subject"]) == "Gr\u00fc\u00dfe"
    assert got["From"].addresses[0].display_name == "J\u00f6rg M\u00fcller"
    assert got.get_content() == "caf\u00e9\n"


def test_utf8_address_in_a_header_still_needs_smtputf8(
        smarthost_factory: SmarthostFactory) -> None:
    data = "To: j\u00fcrgen@example.org\nSubject: x\n\nbody\n".encode()
    sh = smarthost_factory(smtputf8=False)
    r, _ = one(config(sh.smarthost), message(data=data, smtputf8=True))
    assert statuses(r) == ["failed"] and r.outcomes[0].dsn_code == "5.6.7"
    assert "To header field" in r.outcomes[0].reply
    assert "MAIL" not in sh.verbs()


class FailingRead(io.BytesIO):
    """Fails the n-th read: a disk error (or a converter bug) in the middle of DATA."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self.reads, self.fail_at = 0, fail_at

    def read(self, n: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError(5, "Input/output error")
        return super().read(n)


def test_a_read_error_mid_data_never_leaves_the_connection_in_use(
        smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    data = b"Subject: big\n\n" + b"line\n" * 200_000  # 1 MB: several reads
    run = Run(config(sh.smarthost))
    try:
        broken = message(data=data)
        broken.data = FailingRead(data, fail_at=8)  # plan reads 5 times, DATA fails at its 3rd
        with pytest.raises(OSError):
            run.deliver(broken)
        assert statuses(run.deliver(message())) == ["sent"]
    finally:
        run.close()
    [t] = sh.transactions  # the half-sent message was never completed by the next one
    assert t.content == BODY.replace(b"\n", b"\r\n")
