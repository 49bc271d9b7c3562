"""relayq.core.dsn: RFC 3464 reports, checked by parsing them with the stdlib email package."""

from __future__ import annotations

import base64
import email
import email.policy
import os
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.core import dsn
from relayq.core.envelope import FAILED, PENDING, Envelope, Recipient
from relayq.core.headers import format_date

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CREATED = 1764120000.0  # 2025-11-26 01:20:00 UTC
NOW = CREATED + 4 * 3600 + 120
BOUNDARY = "6AQ1UaXXXX0001.1764134520/mx.example.org"
ORIGINAL = (
    b"From: Alice <alice@example.org>\n"
    b"To: bob@example.net\n"
    b"Subject: quarterly report\n"
    b"Message-ID: <1@example.org>\n"
    b"\n"
    b"Hello Bob,\n"
    b"the numbers are in.\n"
)


def make_env(**kw: object) -> Envelope:
    rcpts = [
        Recipient("bob@example.net", FAILED, reply="550 5.1.1 <bob@example.net>... No such user"),
        Recipient("carol@example.net", PENDING, orcpt="rfc822;Carol+2Bx@example.net"),
    ]
    rcpts[0].remote = True  # the relay's words: Diagnostic-Code smtp, Remote-MTA
    env = Envelope("6AQ1UaXXXX0001", "alice@example.org", rcpts, CREATED)
    env.user = "alice"
    env.uid = 1000
    env.size = len(ORIGINAL)
    env.error = "Deferred: Connection refused by [192.0.2.1]"
    env.last_try = NOW - 60
    for key, value in kw.items():
        setattr(env, key, value)
    return env


def report(
    env: Envelope | None = None,
    failed: list[Recipient] | None = None,
    delayed: list[Recipient] | None = None,
    original: Iterable[bytes] | None = None,
    original_size: int | None = None,
    **kw: object,
) -> bytes:
    env = env or make_env()
    if failed is None:
        failed = [r for r in env.recipients if r.state == FAILED]
    if delayed is None:
        delayed = env.pending()
    args: dict[str, object] = {
        "env": env,
        "failed": failed,
        "delayed": delayed,
        "reporting_mta": "mx.example.org",
        "postmaster_domain": "example.org",
        "original": [ORIGINAL] if original is None else original,
        "original_size": len(ORIGINAL) if original_size is None else original_size,
        "now": NOW,
        "tz_offset": 0,
        "boundary": BOUNDARY,
    }
    args.update(kw)
    return b"".join(dsn.build(**args))  # type: ignore[arg-type]


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw)


def parts(msg: Message) -> list[Message]:
    """The sub-messages of a multipart or message/* part."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def inner(part: Message) -> Message:
    """The message inside a message/rfc822 or message/global part."""
    return parts(part)[0]


def status_blocks(part: Message) -> list[Message]:
    """The per-message and per-recipient field blocks of a delivery-status part."""
    if part.get_content_type() == "message/delivery-status":
        return parts(part)  # the email package parses it into blocks
    # message/global-delivery-status is parsed as one message: first block as
    # its header, the rest as its body; re-split the body ourselves
    first = inner(part)
    body = first.get_payload(decode=True)
    assert isinstance(body, bytes)
    blocks = body.strip().split(b"\n\n")
    rest = [email.message_from_bytes(b, policy=email.policy.default) for b in blocks]
    return [first, *rest]


# -- failure report -------------------------------------------------------------


def test_failure_report_structure() -> None:
    msg = parse(report())
    assert msg["From"] == "Mail Delivery Subsystem <MAILER-DAEMON@example.org>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Subject"] == "Returned mail: see transcript for details"
    assert msg["Auto-Submitted"] == "auto-generated (failure)"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] == "Wed, 26 Nov 2025 05:22:00 +0000"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@mx.example.org>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg.get_boundary() == BOUNDARY
    human, status, original = parts(msg)
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == "message/rfc822"


def test_failure_report_fields() -> None:
    human, status, original = parts(parse(report(remote_mta="smtp.example.net")))
    text = human.get_payload()
    assert isinstance(text, str)
    assert "----- The following addresses had permanent fatal errors -----" in text
    assert "<bob@example.net>" in text
    assert "550 5.1.1 <bob@example.net>... No such user" in text
    assert "transient non-fatal errors" in text and "<carol@example.net>" in text
    per_msg, bob, carol = status_blocks(status)
    assert per_msg["Reporting-MTA"] == "dns; mx.example.org"
    assert per_msg["Arrival-Date"] == "Wed, 26 Nov 2025 01:20:00 +0000"
    assert "Original-Envelope-Id" not in per_msg
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; smtp.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>... No such user"
    assert bob["Last-Attempt-Date"] == "Wed, 26 Nov 2025 05:21:00 +0000"
    assert "Original-Recipient" not in bob
    # carol's reason is ours (connection refused), not a server's words (issue 12 D16)
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"
    assert "Remote-MTA" not in carol
    assert carol["Diagnostic-Code"] == "X-Relayq; Deferred: Connection refused by [192.0.2.1]"
    returned = inner(original)
    assert returned["Subject"] == "quarterly report"
    assert returned.get_payload() == "Hello Bob,\nthe numbers are in.\n"


def test_remote_mta_needs_a_name() -> None:
    _, status, _ = parts(parse(report()))
    assert "Remote-MTA" not in status_blocks(status)[1]


def test_envid_and_orcpt_are_xtext_decoded() -> None:
    env = make_env(envid="QID+2B42")
    _, status, _ = parts(parse(report(env)))
    per_msg, _, carol = status_blocks(status)
    assert per_msg["Original-Envelope-Id"] == "QID+42"
    assert carol["Original-Recipient"] == "rfc822;Carol+x@example.net"


def test_original_is_returned_byte_for_byte() -> None:
    raw = report()
    start = raw.index(b"Content-Description: Undelivered message\n\n") + 42
    end = raw.index(b"\n--" + BOUNDARY.encode() + b"--\n")
    assert raw[start:end] == ORIGINAL
    assert raw.endswith(b"--" + BOUNDARY.encode() + b"--\n")
    assert b"\r" not in raw


def test_original_without_final_newline() -> None:
    raw = report(original=[b"Subject: x\n\nno newline"])
    assert b"no newline\n\n--" + BOUNDARY.encode() + b"--\n" in raw
    assert inner(parts(parse(raw))[2]).get_payload() == "no newline\n"


# -- delay report -----------------------------------------------------------------


def test_delay_report() -> None:
    env = make_env()
    msg = parse(report(env, failed=[], delayed=env.pending()))
    assert msg["Subject"] == "Warning: could not send message for past 4 hours"
    assert msg["Auto-Submitted"] == "auto-generated (delay)"
    human, status, original = parts(msg)
    text = human.get_payload()
    assert isinstance(text, str)
    assert "THIS IS A WARNING MESSAGE ONLY" in text
    assert "permanent fatal errors" not in text
    assert "<carol@example.net>" in text and "Connection refused" in text
    _per_msg, carol = status_blocks(status)
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"
    assert original.get_content_type() == "message/rfc822"


def test_delay_report_quotes_a_temporary_smtp_reply() -> None:
    r = Recipient("dave@example.net", PENDING, reply="451 4.2.1 mailbox busy")
    r.remote = True
    msg = parse(report(make_env(), failed=[], delayed=[r]))
    carol = status_blocks(parts(msg)[1])[1]
    assert carol["Status"] == "4.2.1"
    assert carol["Diagnostic-Code"] == "smtp; 451 4.2.1 mailbox busy"


def test_delay_subject_under_an_hour() -> None:
    env = make_env()
    msg = parse(report(env, failed=[], delayed=env.pending(), now=CREATED + 30 * 60))
    assert msg["Subject"] == "Warning: could not send message for past 30 minutes"


# -- what is returned of the original -----------------------------------------------


class Source:
    """Chunks of a stored message; records how far the report read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.taken = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.chunks:
                self.taken += 1
                yield chunk
        finally:
            self.closed = True


def big_source(n: int = 200, size: int = 64 * 1024) -> Source:
    head = b"From: alice@example.org\nSubject: big\n\n"
    return Source([head] + [b"x" * (size - 1) + b"\n"] * n)


def test_ret_hdrs_returns_only_headers_and_stops_reading() -> None:
    src = big_source()
    raw = report(make_env(ret="HDRS"), original=src, original_size=200 * 64 * 1024)
    human, _, original = parts(parse(raw))
    assert original.get_content_type() == "text/rfc822-headers"
    headers = original.get_payload()
    assert isinstance(headers, str)
    assert "Subject: big" in headers and "xxxx" not in headers
    assert src.taken == 1 and src.closed
    assert "RET=HDRS" in str(human.get_payload())


def test_large_original_returns_only_headers() -> None:
    src = big_source()
    raw = report(original=src, original_size=200 * 64 * 1024, max_full=1_000_000)
    assert parts(parse(raw))[2].get_content_type() == "text/rfc822-headers"
    assert src.taken == 1
    assert len(raw) < 10_000


def test_full_original_is_streamed_not_buffered() -> None:
    src = big_source(n=200)
    size = 200 * 64 * 1024
    chunks = dsn.build(
        env=make_env(),
        failed=make_env().recipients[:1],
        delayed=[],
        reporting_mta="mx.example.org",
        postmaster_domain="example.org",
        original=src,
        original_size=size,
        now=NOW,
        tz_offset=0,
        boundary=BOUNDARY,
        max_full=10 * size,
    )
    total = 0
    biggest = 0
    for i, chunk in enumerate(chunks):
        total += len(chunk)
        biggest = max(biggest, len(chunk))
        if i == 10:
            assert src.taken < 20  # output flows while the input is still being read
    assert total > size
    assert biggest <= 64 * 1024 + 100
    assert src.taken == 201


def test_header_block_split_across_chunks() -> None:
    whole = report()
    bytewise = report(original=[bytes([b]) for b in ORIGINAL])
    assert whole == bytewise
    assert report(make_env(ret="HDRS"), original=[bytes([b]) for b in ORIGINAL]) == report(
        make_env(ret="HDRS")
    )


def test_message_without_header_block_end() -> None:
    raw = report(make_env(ret="HDRS"), original=[b"Subject: only headers\n"])
    assert "Subject: only headers" in str(parts(parse(raw))[2].get_payload())


def test_eight_bit_body_is_returned_in_base64_so_the_report_is_7bit() -> None:
    """Issue 12 D9: a bounce never needs 8BITMIME, which its original's relay may lack."""
    orig = b"Subject: caf\n\ncaf\xc3\xa9\n"
    raw = report(make_env(body="8BITMIME"), original=[orig], original_size=len(orig))
    assert raw.isascii()
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] is None
    _, status, original = parts(msg)
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == "message/global"
    assert original["Content-Transfer-Encoding"] == "base64"
    encoded = raw.split(b"Content-Description: Undelivered message\n\n", 1)[1]
    assert base64.b64decode(encoded.split(b"\n\n--", 1)[0]) == orig


def test_our_own_decisions_are_not_labelled_smtp() -> None:
    """Issue 12 D16: an expiry (our decision) has a Diagnostic-Code, as X-Relayq."""
    r = Recipient("dave@example.net", FAILED,
                  reply="4.4.7 Message could not be delivered for 5 days: 451 4.3.0 later")
    msg = parse(report(make_env(), failed=[r], delayed=[], remote_mta="smtp.example.net"))
    dave = status_blocks(parts(msg)[1])[1]
    assert dave["Status"] == "4.4.7"
    assert dave["Diagnostic-Code"].startswith("X-Relayq; 4.4.7 Message could not be delivered")
    assert "Remote-MTA" not in dave


def test_boundary_is_valid_for_a_long_host_name() -> None:
    """Issue 12 D1: the boundary was QID.epoch/fqdn and a 46-character name broke it."""
    b = dsn.boundary("6AQ1UaXXXX0001", NOW)
    assert 0 < len(b) <= 70
    raw = report(boundary=b, reporting_mta="ip-172-31-10-123.eu-central-1.compute.internal")
    assert f"--{b}--" in raw.decode()


def test_utf8_headers_use_message_global() -> None:
    orig = "Subject: Grüße\nTo: bob@example.net\n\nHallo\n".encode()
    msg = parse(report(original=[orig], original_size=len(orig)))
    _, status, original = parts(msg)
    # ASCII addresses: the report itself stays ASCII (it can reach a relay without
    # SMTPUTF8); the UTF-8 original travels as message/global in base64 (RFC 6532 3.5)
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == "message/global"
    assert original["Content-Transfer-Encoding"] == "base64"
    raw = report(original=[orig], original_size=len(orig))
    assert raw.isascii()
    import base64

    encoded = raw.split(b"Content-Description: Undelivered message\n\n", 1)[1]
    assert base64.b64decode(encoded.split(b"\n\n--", 1)[0]) == orig


def test_smtputf8_headers_only_uses_message_global_headers() -> None:
    env = make_env(smtputf8=True, ret="HDRS")
    env.recipients[0].address = "bjørn@example.net"
    raw = report(env)
    _, status, original = parts(parse(raw))
    assert status.get_content_type() == "message/global-delivery-status"
    assert original.get_content_type() == "message/global-headers"
    fields = status_blocks(status)[1]
    assert fields["Final-Recipient"] == "utf-8; bjørn@example.net"
    human = parts(parse(raw))[0]
    assert human["Content-Transfer-Encoding"] == "quoted-printable"  # 7-bit
    assert "<bjørn@example.net>".encode() in human.get_payload(decode=True)


def test_non_ascii_reply_is_ascii_in_plain_delivery_status() -> None:
    env = make_env()
    env.recipients[0].reply = "550 5.1.1 unbekannter Empfänger"
    _, status, _ = parts(parse(report(env)))
    assert status_blocks(status)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 unbekannter Empf?nger"


# -- header safety ------------------------------------------------------------------------


def test_reply_and_address_text_cannot_add_headers() -> None:
    env = make_env(envid="x\r\nBcc: evil@example.com")
    env.recipients[0].reply = "550 5.1.1 no\r\nBcc: evil@example.com\n\n--" + BOUNDARY
    env.recipients[1].address = "carol@example.net\nX-Injected: 1"
    raw = report(env)
    lines = raw.split(b"\n")
    assert not any(line.startswith((b"Bcc:", b"X-Injected:")) for line in lines)
    assert raw.count(b"\n--" + BOUNDARY.encode() + b"\n") == 3
    assert len(parts(parse(raw))) == 3


@settings(max_examples=200, deadline=None)
@given(
    reply=st.text(max_size=300),
    address=st.text(min_size=1, max_size=80),
    cuts=st.lists(st.integers(min_value=0, max_value=len(ORIGINAL)), max_size=6),
)
def test_any_text_gives_a_well_formed_report(reply: str, address: str, cuts: list[int]) -> None:
    env = make_env()
    env.recipients[0].reply = reply
    env.recipients[0].address = address
    points = sorted(set(cuts))
    chunks = [ORIGINAL[a:b] for a, b in zip([0, *points], [*points, len(ORIGINAL)], strict=True)]
    raw = report(env, original=chunks)
    assert raw == report(env)  # chunking never changes the report
    head = raw.split(b"\n\n", 1)[0]
    names = [line.split(b":", 1)[0] for line in head.split(b"\n") if not line.startswith(b"\t")]
    assert names == [
        b"From",
        b"To",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"Auto-Submitted",
        b"MIME-Version",
        b"Content-Type",
    ] + ([b"Content-Transfer-Encoding"] if b"Content-Transfer-Encoding" in head else [])
    assert raw.count(b"\n--" + BOUNDARY.encode() + b"\n") == 3
    assert all(len(line) <= 998 for line in raw.split(b"\n"))
    assert len(parts(parse(raw))) == 3


# -- argument checks ---------------------------------------------------------------------


def test_build_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one"):
        report(failed=[], delayed=[])
    with pytest.raises(ValueError, match="null sender"):
        report(make_env(sender=""))
    with pytest.raises(ValueError, match="boundary"):
        report(boundary='bad"boundary')
    with pytest.raises(ValueError, match="boundary"):
        report(boundary="")


# -- status codes and policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "action", "expected"),
    [
        ("550 5.1.1 No such user", "failed", "5.1.1"),
        ("550-5.7.1 Relaying denied", "failed", "5.7.1"),
        ("550 No such user", "failed", "5.0.0"),
        ("554", "failed", "5.0.0"),
        ("550 4.1.1 class mismatch", "failed", "5.0.0"),
        ("452 4.2.2 Mailbox full", "delayed", "4.2.2"),
        ("421 Service not available", "delayed", "4.0.0"),
        ("550 5.1.10 too many digits fine", "failed", "5.1.10"),
        ("550 5.1.1234 too long", "failed", "5.0.0"),
        ("", "failed", "5.0.0"),
        ("", "delayed", "4.4.1"),
        ("Connection refused by [192.0.2.1]", "delayed", "4.4.1"),
        ("Connection refused by [192.0.2.1]", "failed", "5.0.0"),
        ("5501 not a reply", "failed", "5.0.0"),
    ],
)
def test_status_code(reply: str, action: str, expected: str) -> None:
    assert dsn.status_code(reply, action) == expected


def test_status_code_default_action_is_failure() -> None:
    assert dsn.status_code("") == "5.0.0"
    assert dsn.status_code("550 No such user") == "5.0.0"
    assert dsn.status_code("550 5.1.1 No such user") == "5.1.1"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("550 5.1.1 x", True),
        ("250", True),
        ("451-more", True),
        ("", False),
        ("55", False),
        ("5500", False),
        ("Deferred: 451 x", False),
        ("650 x", False),
        ("١٢٣ arabic digits", False),
    ],
)
def test_is_smtp_reply(reply: str, expected: bool) -> None:
    assert dsn.is_smtp_reply(reply) is expected


def test_should_bounce() -> None:
    assert dsn.should_bounce(make_env())
    assert not dsn.should_bounce(make_env(sender=""))
    assert not dsn.should_bounce(make_env(is_dsn=True))


@pytest.mark.parametrize(
    ("notify", "failed", "delayed", "delivered"),
    [
        ("", True, True, False),
        ("NEVER", False, False, False),
        ("FAILURE", True, False, False),
        ("DELAY", False, True, False),
        ("SUCCESS", False, False, True),
        ("SUCCESS,FAILURE,DELAY", True, True, True),
        ("failure, delay", True, True, False),
    ],
)
def test_wanted(notify: str, failed: bool, delayed: bool, delivered: bool) -> None:
    r = Recipient("bob@example.net", notify=notify)
    assert dsn.wanted(r, "failed") is failed
    assert dsn.wanted(r, "delayed") is delayed
    assert dsn.wanted(r, "delivered") is delivered
    with pytest.raises(ValueError):
        dsn.wanted(r, "exploded")


def test_report_dates_are_locale_free_and_signed() -> None:
    assert format_date(CREATED, 0) == "Wed, 26 Nov 2025 01:20:00 +0000"
    assert format_date(CREATED, -(5 * 3600 + 30 * 60)) == "Tue, 25 Nov 2025 19:50:00 -0530"


# -- golden file -------------------------------------------------------------------------


def test_golden_failure_report() -> None:
    """One complete report, byte for byte; RELAYQ_UPDATE_GOLDEN=1 rewrites it after review."""
    env = make_env(envid="6AQ1UaXXXX0001@example.org")
    raw = report(env, remote_mta="smtp.example.net", tz_offset=3600)
    path = GOLDEN / "dsn_failure.eml"
    if os.environ.get("RELAYQ_UPDATE_GOLDEN") == "1":
        path.write_bytes(raw)
    assert raw == path.read_bytes()

