"""relayq.core.wire: 7-bit and 998-octet conversion, decoded with the stdlib email package."""

from __future__ import annotations

import binascii
import email
import email.message
import email.policy
import io
import tracemalloc
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayq.core import mimescan, wire

if TYPE_CHECKING:
    from collections.abc import Iterator


def convert(data: bytes, eightbit: bool = False) -> tuple[wire.Plan, bytes]:
    f = io.BytesIO(data)
    p = wire.plan(f, eightbit=eightbit, size=len(data))
    assert not p.refusal, p.refusal
    out = b"".join(wire.stream(f, p)) if p.changed else data
    return p, out


def check_fit(out: bytes, seven: bool) -> None:
    assert max(len(line) for line in out.split(b"\n")) <= wire.LIMIT
    if seven:
        assert out.isascii()


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data)


def leaves(msg: email.message.Message) -> list[bytes]:
    return [p.get_payload(decode=True) or b"" for p in msg.walk() if not p.is_multipart()]


# lines with 8-bit bytes, white space at the ends, dots, '=' signs and long runs
line_st = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    st.text(alphabet="a\u00e9\u20ac =.\t", max_size=300).map(lambda s: s.encode()),
    st.integers(min_value=990, max_value=5000).map(lambda n: b"x" * n),
    st.integers(min_value=990, max_value=3000).map(lambda n: ("\u00fc" * n).encode()),
)
body_st = st.lists(line_st, max_size=12).map(lambda ls: b"".join(x + b"\n" for x in ls))

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # `blocks` is the same for every example


@pytest.fixture(params=["real", "tiny"])
def blocks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run once with the real block sizes, once with tiny ones (every boundary is crossed)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "tiny":
            mp.setattr(mimescan, "READ", 61)  # the scanner reads the file
            mp.setattr(mimescan, "PIECE", 100)  # longer than any boundary line
            mp.setattr(wire, "QP_BLOCK", 11)
        yield


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(body=body_st, eightbit=st.booleans())
def test_single_part_decodes_to_the_original(blocks: None, body: bytes, eightbit: bool) -> None:
    data = b"From: a@example.org\nSubject: t\n\n" + body
    p, out = convert(data, eightbit)
    check_fit(out, seven=not eightbit)
    assert parse(out).get_payload(decode=True) == parse(data).get_payload(decode=True)
    if p.changed:
        assert p.size >= len(data)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(bodies=st.lists(st.tuples(body_st, st.sampled_from(["", "7bit", "8bit", "binary"])),
                       min_size=1, max_size=4),
       eightbit=st.booleans())
def test_each_multipart_part_decodes_to_the_original(
        blocks: None, bodies: list[tuple[bytes, str]], eightbit: bool) -> None:
    data = b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="=_b"\n\npre\n'
    for body, cte in bodies:
        data += b"--=_b\nContent-Type: text/plain; charset=utf-8\n"
        if cte:
            data += b"Content-Transfer-Encoding: " + cte.encode() + b"\n"
        data += b"\n" + body
    data += b"--=_b--\n"
    _, out = convert(data, eightbit)
    check_fit(out, seven=not eightbit)
    assert leaves(parse(out)) == leaves(parse(data))


def test_message_that_fits_is_left_alone() -> None:
    data = b"Subject: x\n\n" + "caf\u00e9\n".encode() + b"y" * 998 + b"\n"
    p = wire.plan(io.BytesIO(data), eightbit=True, size=len(data))
    assert not p.changed and p.size == len(data)
    f = io.BytesIO(data)
    assert wire.wire_reader(f, p) is f
    assert not wire.needs_change(io.BytesIO(b"Subject: x\n\n" + b"y" * 998), eightbit=False)
    assert wire.needs_change(io.BytesIO(b"y" * 999), eightbit=True)


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text(alphabet="ab<>@.,;=\"", min_size=1, max_size=400), min_size=1,
                      max_size=30),
       seps=st.sampled_from([" ", "\t", "  "]))
def test_fold_is_lossless_where_there_is_white_space(words: list[str], seps: str) -> None:
    line = ("X-Test: " + seps.join(words)).encode()
    folded = wire.fold(line)
    assert all(len(x) <= wire.LIMIT for x in folded.split(b"\n"))
    for x in folded.split(b"\n")[1:]:
        assert x[:1] in (b" ", b"\t")
    if all(len(w) < 900 for w in words):
        assert folded.replace(b"\n", b"") == line  # unfolds to exactly the original


def test_header_without_white_space_is_broken_with_a_space() -> None:
    line = b"Message-ID: <" + b"a" * 2000 + b"@example.org>"
    folded = wire.fold(line)
    assert all(len(x) <= wire.LIMIT for x in folded.split(b"\n"))
    assert folded.replace(b"\n", b"").replace(b" ", b"") == line.replace(b" ", b"")
    assert folded.replace(b"\n", b"").count(b" ") == 1 + 2000 // (wire.LIMIT - 1)


@settings(max_examples=200, deadline=None)
@given(value=st.text(alphabet="ab \u00e9\u4e2d\U0001f600\"=?_", min_size=1, max_size=200))
def test_8bit_header_becomes_rfc2047(value: str) -> None:
    data = ("Subject: " + value + "\n\nbody\n").encode()
    _, out = convert(data)
    check_fit(out, seven=True)
    got = email.message_from_bytes(out, policy=email.policy.default)["Subject"]
    want = email.message_from_bytes(data, policy=email.policy.default)["Subject"]
    assert " ".join(str(got).split()) == " ".join(str(want).split())


def test_mime_parameters_get_rfc2231() -> None:
    data = ('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\n'
            'Content-Type: text/plain; name="Gr\u00fc\u00dfe.txt"\n'
            'Content-Disposition: attachment; filename="Gr\u00fc\u00dfe.txt"\n'
            "Content-Transfer-Encoding: 8bit\n\n\u00e9t\u00e9\n--b--\n").encode()
    _, out = convert(data)
    check_fit(out, seven=True)
    [part] = email.message_from_bytes(out, policy=email.policy.default).get_payload()
    assert part.get_filename() == "Gr\u00fc\u00dfe.txt"
    assert part.get_payload(decode=True) == "\u00e9t\u00e9".encode()


def test_quoted_printable_part_with_long_lines_and_raw_8bit() -> None:
    qp = b"a=3Db " + b"c" * 1500 + b"=\n" + b"\xe9t\xe9 =20\n" + b"=C3=A9" * 400 + b"\n"
    data = (b"Content-Type: text/plain; charset=latin1\nContent-Transfer-Encoding: "
            b"quoted-printable\n\n" + qp)
    _, out = convert(data)
    check_fit(out, seven=True)
    assert parse(out).get_payload(decode=True) == parse(data).get_payload(decode=True)


def test_base64_with_long_lines_is_rewrapped() -> None:
    import base64

    raw = bytes(range(256)) * 20
    data = (b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
            + base64.b64encode(raw) + b"\n")
    _, out = convert(data, eightbit=True)
    check_fit(out, seven=True)
    assert parse(out).get_payload(decode=True) == raw


SIGNED = (b'MIME-Version: 1.0\nContent-Type: multipart/signed; boundary="s";'
          b' protocol="application/pgp-signature"\n\n--s\n'
          b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n%s\n"
          b"--s\nContent-Type: application/pgp-signature\n\nSIG\n--s--\n")


def test_8bit_in_a_signed_part_cannot_be_converted() -> None:
    data = SIGNED % "\u00e9".encode()
    p = wire.plan(io.BytesIO(data), eightbit=False, size=len(data))
    assert "multipart/signed" in p.refusal
    assert not wire.plan(io.BytesIO(data), eightbit=True, size=len(data)).changed


def test_long_line_in_a_signed_part_is_broken_not_reencoded() -> None:
    data = SIGNED % (b"s" * 2500)
    _, out = convert(data, eightbit=True)
    check_fit(out, seven=True)
    assert b"quoted-printable" not in out
    assert out.replace(b"\n ", b"") == data


def test_attached_message_with_signed_8bit_becomes_message_global() -> None:
    inner = SIGNED % "\u00e9".encode()
    data = (b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="o"\n\n--o\n'
            b"Content-Type: text/plain\n\nsee attached\n--o\nContent-Type: message/rfc822\n"
            b"Content-Transfer-Encoding: 8bit\n\n" + inner + b"--o--\n")
    _, out = convert(data)
    check_fit(out, seven=True)
    [_, att] = parse(out).get_payload()
    assert att.get_content_type() == "message/global"
    assert att["Content-Transfer-Encoding"] == "quoted-printable"
    encoded = out.split(b"quoted-printable\n\n", 1)[1].rsplit(b"\n--o--", 1)[0]
    assert binascii.a2b_qp(encoded) == inner[:-1]  # its last LF is the boundary's


def test_attached_8bit_message_is_converted_inside() -> None:
    inner = b"Subject: inner\n\n" + "\u00e9t\u00e9\n".encode() + b"l" * 1200 + b"\n"
    data = (b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="o"\n\n--o\n'
            b"Content-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n" + inner
            + b"--o--\n")
    _, out = convert(data)
    check_fit(out, seven=True)
    [att] = parse(out).get_payload()
    assert att.get_content_type() == "message/rfc822"
    assert att["Content-Transfer-Encoding"] == "7bit"
    [msg] = att.get_payload()
    assert msg.get_payload(decode=True) == inner.split(b"\n\n", 1)[1][:-1]


def test_size_estimate_is_close() -> None:
    data = b"Subject: x\n\n" + ("\u00e9t\u00e9 " * 30 + "\n").encode() * 3000
    p, out = convert(data)
    assert len(out) * 0.9 <= p.size <= len(out) * 1.2


def test_memory_stays_flat_for_a_large_converted_message() -> None:
    class Big(io.RawIOBase):
        """A 24 MiB 8-bit message with a 4 MiB line, made on the fly (never whole)."""

        line = "\u00e9".encode() * 498 + b"\n"
        lines = line * 300
        long = (4 << 20, 8 << 20)

        def __init__(self) -> None:
            self.pos = 0
            self.size = 24 << 20

        def readable(self) -> bool:
            return True

        def seek(self, pos: int, whence: int = 0) -> int:
            self.pos = pos
            return pos

        def read(self, n: int = -1) -> bytes:
            pos = self.pos
            if pos >= self.size:
                return b""
            if pos == 0:
                out = b"Subject: big\n\n"
            elif self.long[0] <= pos < self.long[1]:
                out = b"\xc3\xa9" * (min(n, self.long[1] - pos) // 2)
            else:
                off = pos % len(self.line)
                end = self.long[0] if pos < self.long[0] else self.size
                out = self.lines[off:off + min(n, end - pos, 200_000)]
            self.pos += len(out)
            return out

    src = Big()
    tracemalloc.start()
    try:
        p = wire.plan(src, eightbit=False, size=src.size)  # type: ignore[arg-type]
        total = longest = 0
        for chunk in wire.stream(src, p):  # type: ignore[arg-type]
            total += len(chunk)
            longest = max(longest, len(chunk))
            assert chunk.isascii()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > src.size * 2 and longest < 1 << 20
    assert peak < 4 << 20, peak


@pytest.mark.parametrize(("field", "decoded"), [
    ("Subject: Gr\u00fc\u00dfe aus K\u00f6ln", "Gr\u00fc\u00dfe aus K\u00f6ln"),
    ('From: "M\u00fcller, J\u00f6rg" <j@example.org>', '"M\u00fcller, J\u00f6rg" <j@example.org>'),
    ("From: J\u00f6rg M\u00fcller <j@example.org>", "J\u00f6rg M\u00fcller <j@example.org>"),
    ("X-Note: caf\u00e9", "caf\u00e9"),
])
def test_strict_downgrade_is_exact(field: str, decoded: str) -> None:
    out = wire.encode_field(field.encode(), strict=True)
    assert out is not None and out.isascii()
    name = field.split(":", 1)[0]
    got = email.message_from_bytes(out + b"\n\n", policy=email.policy.default)[name]
    assert str(got) == decoded


def test_strict_downgrade_encodes_a_comment_inside_its_parentheses() -> None:
    out = wire.encode_field("To: a@example.org (J\u00f6rg), b@example.org".encode(), strict=True)
    assert out == b"To: a@example.org (=?utf-8?q?J=C3=B6rg?=), b@example.org"


@pytest.mark.parametrize("field", [
    "To: j\u00f6rg@example.org",
    "From: <j\u00f6rg@example.org>",
    "Message-ID: <\u00e9@example.org>",
    "Received: from h\u00f6st by example.org",
    "X-Original-To: j\u00f6rg@example.org",
])
def test_strict_downgrade_refuses_addresses_and_ids(field: str) -> None:
    assert wire.encode_field(field.encode(), strict=True) is None
    data = (field + "\nSubject: x\n\nbody\n").encode()
    p = wire.plan(io.BytesIO(data), eightbit=True, utf8_headers=False, size=len(data))
    assert p.refusal and p.refusal_code == "5.6.7"
    assert field.split(":")[0] in p.refusal


def test_utf8_header_downgrade_keeps_an_8bit_body_for_an_8bitmime_relay() -> None:
    data = "Subject: caf\u00e9\n\nd\u00e9j\u00e0 vu\n".encode()
    f = io.BytesIO(data)
    p = wire.plan(f, eightbit=True, utf8_headers=False, size=len(data))
    out = b"".join(wire.stream(f, p))
    head, body = out.split(b"\n\n", 1)
    assert head.isascii() and body == "d\u00e9j\u00e0 vu\n".encode()


def test_breaking_a_long_line_never_makes_a_mime_delimiter() -> None:
    sneaky = b"--s" + b" " * 1200 + b"x"  # not a delimiter: it ends in x
    data = SIGNED % sneaky
    _, out = convert(data, eightbit=True)
    check_fit(out, seven=True)
    assert leaves(parse(out))[0].replace(b"\n ", b"") == sneaky  # still one part, intact
    b64 = (b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
           + b"--x" + b" " * 100 + b"A" * 2000 + b"\n")
    multi = (b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="x"\n\n--x\n' + b64
             + b"--x--\n")
    _, out = convert(multi, eightbit=True)
    check_fit(out, seven=True)
    assert len(parse(out).get_payload()) == 1


def _leaf(body: bytes, cte: str) -> bytes:
    if cte == "base64":
        import base64

        enc = base64.b64encode(body)
        return (b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
                + b"".join(enc[i:i + 3000] + b"\n" for i in range(0, len(enc), 3000)))
    if cte == "quoted-printable":
        enc = binascii.b2a_qp(body, istext=True)
        return (b"Content-Type: text/plain; charset=utf-8\n"
                b"Content-Transfer-Encoding: quoted-printable\n\n" + enc)
    head = b"Content-Type: text/plain; charset=utf-8\n"
    if cte:
        head += b"Content-Transfer-Encoding: " + cte.encode() + b"\n"
    return head + b"\n" + body


def _tree(draw: st.DrawFn, depth: int, n: list[int]) -> bytes:
    kind = draw(st.sampled_from(["leaf", "leaf", "multi", "message"] if depth < 3 else ["leaf"]))
    if kind == "leaf":
        return _leaf(draw(body_st), draw(st.sampled_from(["", "8bit", "quoted-printable",
                                                           "base64"])))
    if kind == "message":
        inner = _tree(draw, depth + 1, n)
        return (b"Content-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n"
                b"Subject: inner\nMIME-Version: 1.0\n" + inner)
    n[0] += 1
    b = b"=_%d" % n[0]
    kids = [_tree(draw, depth + 1, n) for _ in range(draw(st.integers(1, 3)))]
    out = b'Content-Type: multipart/mixed; boundary="' + b + b'"\n\npre\n'
    for kid in kids:
        out += b"--" + b + b"\n" + kid
        if not out.endswith(b"\n"):
            out += b"\n"
    return out + b"--" + b + b"--\n"


@st.composite
def trees(draw: st.DrawFn) -> bytes:
    return b"From: a@example.org\nMIME-Version: 1.0\n" + _tree(draw, 0, [0])


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=trees(), eightbit=st.booleans())
def test_nested_structures_decode_to_the_original(blocks: None, data: bytes,
                                                  eightbit: bool) -> None:
    _, out = convert(data, eightbit)
    check_fit(out, seven=not eightbit)
    assert leaves(parse(out)) == leaves(parse(data))


def test_8bit_part_header_gets_an_encoded_word() -> None:
    data = ('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\n'
            "Content-Type: text/plain; charset=utf-8\nContent-Description: R\u00e9sum\u00e9 "
            "f\u00fcr dich\n\nx\n--b--\n").encode()
    _, out = convert(data)
    check_fit(out, seven=True)
    [part] = email.message_from_bytes(out, policy=email.policy.default).get_payload()
    assert str(part["Content-Description"]) == "R\u00e9sum\u00e9 f\u00fcr dich"
