"""relayq.smtp.protocol: encoder, reply parser, capabilities, commands (no sockets)."""

from __future__ import annotations

import base64
import itertools
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.smtp import protocol as p
from relayq.smtp.client import auth_allowed


def encode(data: bytes, *cuts: int) -> bytes:
    """Encode `data` split at the given offsets."""
    bounds = [0, *sorted(cuts), len(data)]
    enc = p.DataEncoder()
    out = b"".join(enc.feed(data[a:b]) for a, b in itertools.pairwise(bounds))
    return out + enc.finish()


def decode(wire: bytes) -> bytes:
    """What a receiver reconstructs: unstuff dots, drop the final dot line."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines[:-1])


def normalise(data: bytes) -> bytes:
    """The documented normalisation: CRLF/LF end lines, stray CR -> space, last line ended."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b" ")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\n", b"\r\n")


def check_wire(wire: bytes) -> None:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    assert wire.count(b"\r") == wire.count(b"\r\n"), "bare CR on the wire"
    assert wire.count(b"\n") == wire.count(b"\r\n"), "bare LF on the wire"
    assert wire.find(b"\r\n.\r\n") in (-1, len(wire) - 5)
    assert not (wire.startswith(b".\r\n") and len(wire) > 3)


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b".\n", b"..\r\n.\r\n"),
        (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"..x\n", b"...x\r\n.\r\n"),
        (b"a\r.\rb\n", b"a . b\r\n.\r\n"),
        (b"a\rb", b"a b\r\n.\r\n"),
        (b"a\r", b"a \r\n.\r\n"),
        (b"a\r\r\n", b"a \r\n.\r\n"),
        (b"\n.\r\n", b"\r\n..\r\n.\r\n"),
        (b"x\n\n", b"x\r\n\r\n.\r\n"),
        (b"caf\xc3\xa9 \xff\x00\n", b"caf\xc3\xa9 \xff\x00\r\n.\r\n"),
    ],
)
def test_encoder_table(data: bytes, wire: bytes) -> None:
    assert encode(data) == wire
    check_wire(wire)


@pytest.mark.parametrize(
    "data", [b"ab\r\n.\r\ncd\n", b"\r\n.\n.\r.\r\n..\n", b"x\r\r\n.\n", b".a\n\r.\n"]
)
def test_encoder_every_chunk_boundary(data: bytes) -> None:
    whole = encode(data)
    for i in range(len(data) + 1):
        assert encode(data, i) == whole, i
        for j in range(i, len(data) + 1):
            assert encode(data, i, j) == whole, (i, j)


def test_encoder_one_byte_chunks() -> None:
    data = b"A\r\n.\r\n..\n\r.\rB\r"
    assert encode(data, *range(len(data))) == encode(data)


message_bytes = st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\n.", b"\xc3\xa9", b" ", b"\x00"]),
    max_size=60,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=message_bytes, cuts=st.lists(st.integers(0, 200), max_size=5))
def test_encoder_properties(data: bytes, cuts: list[int]) -> None:
    wire = encode(data, *[c % (len(data) + 1) for c in cuts])
    assert wire == encode(data)
    check_wire(wire)
    assert decode(wire) == normalise(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_encoder_any_bytes(data: bytes) -> None:
    wire = encode(data, len(data) // 2)
    check_wire(wire)
    assert decode(wire) == normalise(data)


def test_encoder_is_fast_and_flat() -> None:
    line = b"x" * 70 + b"\n.dot line\n"
    chunk = line * (256 * 1024 // len(line))
    total = 0
    tracemalloc.start()
    start = time.perf_counter()
    enc = p.DataEncoder()
    for _ in range(400):  # ~100 MB
        total += len(enc.feed(chunk))
    total += len(enc.finish())
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 100_000_000
    assert peak < 8 * len(chunk)
    assert elapsed < 10.0


# --- replies ---------------------------------------------------------------


def parse_all(data: bytes, step: int = 0) -> list[p.Reply]:
    parser = p.ReplyParser()
    out: list[p.Reply] = []
    pieces = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
    for piece in pieces:
        parser.feed(piece)
        while (r := parser.next_reply()) is not None:
            out.append(r)
    return out


def test_reply_single_and_multi() -> None:
    r1, r2 = parse_all(b"250 2.0.0 Ok: queued\r\n250-a\r\n250-SIZE 10\r\n250 HELP\r\n")
    assert r1.code == 250 and r1.enhanced == "2.0.0" and str(r1) == "250 2.0.0 Ok: queued"
    assert r2.lines == ("a", "SIZE 10", "HELP")


def test_reply_one_byte_at_a_time_and_bare_lf() -> None:
    data = b"220 hi\n550-5.1.1 first\r\n550 second\r\n354\r\n"
    assert parse_all(data, 1) == parse_all(data)
    r = parse_all(data)
    assert [x.code for x in r] == [220, 550, 354]
    assert r[1].enhanced == "5.1.1" and r[1].text == "5.1.1 first second"
    assert r[2].lines == ("",) and r[2].dsn_code == "3.0.0"


@pytest.mark.parametrize(
    ("text", "enhanced", "dsn"),
    [("550 No such user", "", "5.0.0"), ("451 4.3.0 later", "4.3.0", "4.3.0"),
     ("550 4.1.1 mismatched class", "", "5.0.0"), ("250 2.1.5", "2.1.5", "2.1.5")],
)
def test_reply_enhanced(text: str, enhanced: str, dsn: str) -> None:
    (r,) = parse_all(text.encode() + b"\r\n")
    assert r.enhanced == enhanced and r.dsn_code == dsn


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",
        b"25\r\n",
        b"250x\r\n",
        b"099 low\r\n",
        b"250-a\r\n251 b\r\n",
        b"250-" + b"x" * (p.MAX_REPLY_BYTES + 10),
        b"250-x\r\n" * (p.MAX_REPLY_LINES + 1) + b"250 end\r\n",
        b"250-" + b"y" * 1000 + b"\r\n" + (b"250-" + b"y" * 1000 + b"\r\n") * 100,
    ],
)
def test_reply_protocol_errors(data: bytes) -> None:
    with pytest.raises(p.SmtpProtocolError):
        parse_all(data, 4096)


def test_reply_bomb_memory_is_bounded() -> None:
    parser = p.ReplyParser()
    with pytest.raises(p.SmtpProtocolError):
        for _ in range(100_000):
            parser.feed(b"250-continuation line\r\n" * 10)
            assert parser.next_reply() is None
            assert parser.buffered <= p.MAX_REPLY_BYTES + 300


def test_discard() -> None:
    parser = p.ReplyParser()
    parser.feed(b"220 go\r\n250-FAKE\r\n250 AUTH PLAIN\r\n")
    assert parser.next_reply() == p.Reply(220, ("go",))
    assert parser.discard() == len(b"250-FAKE\r\n250 AUTH PLAIN\r\n")
    assert parser.buffered == 0 and parser.next_reply() is None


# --- capabilities -----------------------------------------------------------------


def test_capabilities() -> None:
    (r,) = parse_all(
        b"250-mx.example.org hello\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
        b"250-PIPELINING\r\n250-STARTTLS\r\n250-AUTH PLAIN login\r\n250-AUTH=XOAUTH2\r\n"
        b"250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n"
    )
    c = p.Capabilities.from_ehlo(r)
    assert c.esmtp and c.size == 1000 and c.eightbitmime and c.smtputf8 and c.pipelining
    assert c.starttls and c.dsn and c.enhancedstatuscodes
    assert c.auth == ("PLAIN", "LOGIN", "XOAUTH2")
    (bare,) = parse_all(b"250-x\r\n250 SIZE\r\n")
    assert p.Capabilities.from_ehlo(bare).size == 0
    assert p.Capabilities().size is None


# --- commands ----------------------------------------------------------------


def test_commands() -> None:
    assert p.mail("") == b"MAIL FROM:<>\r\n"
    assert p.mail("a@example.org", ["SIZE=10", "BODY=8BITMIME"]) == (
        b"MAIL FROM:<a@example.org> SIZE=10 BODY=8BITMIME\r\n"
    )
    assert p.rcpt("\u00fc@example.org", ["NOTIFY=NEVER"]) == (
        "RCPT TO:<\u00fc@example.org> NOTIFY=NEVER\r\n".encode()
    )
    assert p.ehlo("client.example.org") == b"EHLO client.example.org\r\n"


@pytest.mark.parametrize("bad", ["\r", "\n", "\0", "\x1b", "\x7f", "\t", "\r\nRCPT TO:<x>"])
def test_command_injection_refused(bad: str) -> None:
    for build in (
        lambda: p.mail(f"a{bad}@example.org"),
        lambda: p.rcpt(f"a{bad}@example.org"),
        lambda: p.ehlo(f"client{bad}.example.org"),
        lambda: p.mail("a@example.org", [f"ENVID=x{bad}"]),
        lambda: p.rcpt("a@example.org", [f"ORCPT=rfc822;x{bad}"]),
        lambda: p.command("AUTH", "PLAIN", f"x{bad}"),
    ):
        with pytest.raises(p.CommandError):
            build()


@pytest.mark.parametrize("bad", ["a>@example.org", "<a@example.org", "a@example.org> X=1"])
def test_address_cannot_close_the_path(bad: str) -> None:
    with pytest.raises(p.CommandError):
        p.rcpt(bad)


@given(st.text(max_size=40), st.text(max_size=20))
def test_every_command_is_one_line(addr: str, param: str) -> None:
    rcpt_addr = addr or "x"
    for prefix, path, build in (
        (b"MAIL FROM:<", addr, lambda: p.mail(addr, [param] if param else [])),
        (b"RCPT TO:<", rcpt_addr, lambda: p.rcpt(rcpt_addr, [param] if param else [])),
    ):
        try:
            line = build()
        except p.CommandError:
            continue
        assert line.endswith(b"\r\n")
        assert line.count(b"\r") == 1 and line.count(b"\n") == 1
        # the path is closed exactly after the address: nothing spills into parameters
        assert line.index(b">") == len(prefix) + len(path.encode("utf-8", "surrogateescape"))


def test_params_only_when_offered() -> None:
    none = p.Capabilities(esmtp=True)
    full = p.Capabilities(esmtp=True, size=0, eightbitmime=True, smtputf8=True, dsn=True)
    kw = {"size": 123, "body": "8BITMIME", "smtputf8": True, "ret": "HDRS", "envid": "Q1+2B"}
    assert p.mail_params(none, **kw) == []  # type: ignore[arg-type]
    assert p.mail_params(full, **kw) == [  # type: ignore[arg-type]
        "SIZE=123", "BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=Q1+2B"
    ]
    assert p.rcpt_params(none, notify="NEVER", orcpt="rfc822;a@example.org") == []
    assert p.rcpt_params(full, notify="success,failure", orcpt="rfc822;a@example.org") == [
        "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@example.org"
    ]
    with pytest.raises(p.CommandError):
        p.rcpt_params(full, notify="ALWAYS")
    # an ENVID queued by an older relayq that is not xtext goes out encoded, not refused
    assert p.mail_params(full, envid="has=equals") == ["ENVID=has+3Dequals"]
    assert p.mail_params(full, envid="=" * 40) == []  # too long encoded: left out
    with pytest.raises(p.CommandError):  # a control character: a damaged record
        p.mail_params(full, envid="x\x0bevil")


def test_auth_encodings() -> None:
    assert base64.b64decode(p.auth_plain("u", "s3cr\u00e9t")) == "\0u\0s3cr\u00e9t".encode()
    assert base64.b64decode(p.auth_xoauth2("u@example.org", "tok")) == (
        b"user=u@example.org\x01auth=Bearer tok\x01\x01"
    )
    assert [base64.b64decode(x) for x in p.auth_login_steps("u", "pw")] == [b"u", b"pw"]
    with pytest.raises(p.CommandError):
        p.auth_plain("u\0v", "x")


@pytest.mark.parametrize(
    ("tls", "peer", "ok"),
    [(False, "127.0.0.1", True), (False, "::1", True), (False, "127.0.0.53", True),
     (False, "192.0.2.1", False), (False, "2001:db8::1", False), (True, "192.0.2.1", True),
     (False, "", False)],
)
def test_no_auth_in_clear_to_remote_peers(tls: bool, peer: str, ok: bool) -> None:
    assert auth_allowed(tls, peer) is ok
