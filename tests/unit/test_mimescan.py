"""relayq.core.mimescan: the stored message as MIME events, in bounded memory."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.core import header7bit, mimescan
from relayq.core.mimescan import BODY, DELIM, ENDHEAD, FIELD, FILL, RAWHEAD


def kinds(data: bytes) -> list[tuple[str, int]]:
    return [(ev.kind, ev.part.idx) for ev in mimescan.events(io.BytesIO(data))]


def test_multipart_events_in_order() -> None:
    data = (b"Subject: x\nContent-Type: multipart/mixed; boundary=b\n\npreamble\n"
            b"--b\nContent-Type: text/plain\n\nhello\n--b--\nepilogue\n")
    assert kinds(data) == [
        (FIELD, 0), (FIELD, 0), (ENDHEAD, 0), (FILL, 0), (DELIM, 0),
        (FIELD, 1), (ENDHEAD, 1), (BODY, 1), (DELIM, 0), (FILL, 0)]
    parts = {ev.part.idx: ev.part for ev in mimescan.events(io.BytesIO(data))}
    assert parts[0].container and parts[0].boundary == b"b" and parts[1].parent is parts[0]


def test_attached_message_is_a_new_root() -> None:
    data = b"Content-Type: message/rfc822\n\nSubject: inner\n\nbody\n"
    evs = list(mimescan.events(io.BytesIO(data)))
    inner = evs[-1].part
    assert evs[-1].kind == BODY and inner.root and inner.parent is evs[0].part
    assert [e.kind for e in evs] == [FIELD, ENDHEAD, FIELD, ENDHEAD, BODY]


def test_header_without_blank_line_still_ends() -> None:
    assert kinds(b"Subject: x\nnot a header\n") == [(FIELD, 0), (ENDHEAD, 0), (BODY, 0)]
    assert kinds(b"Subject: x") == [(FIELD, 0), (ENDHEAD, 0)]


def test_a_huge_field_is_passed_on_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mimescan, "FIELD_CAP", 50)
    data = b"X-Big: " + b"a" * 40 + b"\n" + b" \xc3\xa9" * 30 + b"\n" + b" more\n\nbody\n"
    evs = list(mimescan.events(io.BytesIO(data)))
    assert [e.kind for e in evs] == [RAWHEAD, RAWHEAD, ENDHEAD, BODY]
    assert evs[0].part.huge8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\xc3\xa9", b"\n", b"--b\n", b"--b--\n", b"x" * 150,
                                 b"Content-Type: multipart/mixed; boundary=b\n", b" ", b"\n\n"]),
                max_size=40),
       st.integers(5, 300), st.integers(100, 400))
def test_events_give_back_every_byte(pieces: list[bytes], read: int, piece: int) -> None:
    data = b"".join(pieces)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mimescan, "READ", read)
        mp.setattr(mimescan, "PIECE", piece)
        out = b"".join(line + b"\n" if nl else line
                       for ev in mimescan.events(io.BytesIO(data)) for line, nl in ev.lines)
    assert out == data


def test_needs_change() -> None:
    assert not mimescan.needs_change(io.BytesIO(b"a\n" + b"b" * 998 + b"\n"), eightbit=False)
    assert mimescan.needs_change(io.BytesIO(b"a\n" + b"b" * 999 + b"\nc\n"), eightbit=False)
    assert mimescan.needs_change(io.BytesIO(b"caf\xc3\xa9\n"), eightbit=False)
    assert not mimescan.needs_change(io.BytesIO(b"caf\xc3\xa9\n"), eightbit=True)


def test_header7bit_encodes_text_and_refuses_an_address() -> None:
    assert header7bit.encode_field(b"Subject: caf\xc3\xa9") == b"Subject: =?utf-8?q?caf=C3=A9?="
    assert header7bit.encode_field(b"To: <caf\xc3\xa9@example.org>", strict=True) is None
    assert header7bit.fold(b"a " * 10, 6).replace(b"\n", b"") == b"a " * 10
