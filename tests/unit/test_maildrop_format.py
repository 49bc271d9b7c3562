"""The drop file format (relayq.queue.maildrop) and the taker's pure parts
(relayq.delivery.intake): what the writer writes is what the taker reads."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core.errors import DataError
from relayq.delivery.intake import Notices, check_dsn, request_of
from relayq.queue import maildrop
from relayq.queue.maildrop import MAGIC, Malformed, decode, encode, read_head, request_fields
from relayq.queue.submit import Request

value = st.text(st.characters(min_codepoint=32, blacklist_characters="\x7f",
                              blacklist_categories=("Cs",)), max_size=40)
single = st.sampled_from(sorted(maildrop.SINGLE))
flag = st.sampled_from(sorted(maildrop.FLAGS))


@given(st.dictionaries(single, value), st.sets(flag), st.lists(value, max_size=5))
def test_what_encode_writes_decode_reads(singles: dict[str, str], flags: set[str],
                                         rcpts: list[str]) -> None:
    fields = [*singles.items(), *((f, "") for f in sorted(flags)), *(("rcpt", r) for r in rcpts)]
    data = encode(fields)
    assert data.startswith(MAGIC) and data.endswith(b"\n\n")
    got = decode(data[len(MAGIC):-2])
    assert got == {**singles, **dict.fromkeys(flags, ""), "rcpt": rcpts}


@pytest.mark.parametrize(("head", "why"), [
    (b"sender a\nsender b", "given twice"),
    (b"colour blue", "unknown request field"),
    (b"rcpt", "malformed request line"),
    (b"rcpt a\x01b", "malformed request line"),
    (b"rcpt " + b"x" * (maildrop.MAX_VALUE + 1), "malformed request line"),
])
def test_decode_refuses_what_our_writer_never_writes(head: bytes, why: str) -> None:
    with pytest.raises(Malformed, match=why):
        decode(head)


def _fd_of(data: bytes) -> int:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        fd = os.dup(f.fileno())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@pytest.mark.parametrize("message", [b"", b"Subject: x\n\nbody\n", b"x" * 200_000])
def test_read_head_splits_request_and_message(message: bytes) -> None:
    fd = _fd_of(encode([("rcpt", "a@example.org")]) + message)
    try:
        head, first = read_head(fd)
        rest = first + os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    assert decode(head) == {"rcpt": ["a@example.org"]}
    assert rest == message


@pytest.mark.parametrize(("data", "why"), [
    (b"relayq-drop 2\nrcpt a\n\n", "not a relayq drop file"),
    (MAGIC + b"rcpt a\n", "truncated request part"),
    (MAGIC + b"rcpt " + b"a" * (maildrop.MAX_HEAD + 10), "request part too long"),
])
def test_read_head_refuses_a_planted_file(data: bytes, why: str) -> None:
    fd = _fd_of(data)
    try:
        with pytest.raises(Malformed, match=why):
            read_head(fd)
    finally:
        os.close(fd)


def _request() -> Request:
    req = Request(user="alice", uid=1000)
    req.sender = "alice@example.org"
    req.full_name = "Alice A"
    req.extract = True
    req.recipients = ["bob@example.org", "carol, dave"]
    req.notify, req.ret, req.envid, req.body = "SUCCESS", "HDRS", "id+2B1", "8BITMIME"
    req.hops = 3
    return req


def test_a_request_comes_back_as_it_was_written() -> None:
    sent = _request()
    data = encode(request_fields(sent, "b"))
    fields = decode(data[len(MAGIC):-2])
    assert fields["mode"] == "b"
    got = request_of(fields, "alice", 1000, "drop-id")
    for key in ("sender", "full_name", "extract", "ignore_dots", "bs", "recipients",
                "notify", "ret", "envid", "body", "hops"):
        assert getattr(got, key) == getattr(sent, key), key
    assert (got.user, got.uid, got.drop) == ("alice", 1000, "drop-id")


def test_no_sender_field_means_the_submitting_user() -> None:
    assert request_of({"rcpt": []}, "alice", 1000, "").sender is None
    assert request_of({"sender": "", "rcpt": []}, "alice", 1000, "").sender == ""


@pytest.mark.parametrize("hops", ["x", "1000", "-1", "٣"])
def test_a_hop_count_our_writer_never_writes_is_malformed(hops: str) -> None:
    with pytest.raises(Malformed, match="hop count"):
        request_of({"hops": hops, "rcpt": []}, "alice", 1000, "")


def test_the_writer_refuses_what_the_taker_would() -> None:
    req = _request()
    req.full_name = "Alice\x01"
    with pytest.raises(DataError, match="control characters"):
        request_fields(req, "")
    req = _request()
    req.hops = 1000
    with pytest.raises(DataError):
        request_fields(req, "")


def test_dsn_values_are_made_canonical_or_malformed() -> None:
    req = _request()
    req.notify, req.ret, req.envid = "success,failure", "hdrs", "ok"
    assert check_dsn(req) == ""
    assert (req.notify, req.ret) == ("SUCCESS,FAILURE", "HDRS")
    req.notify = "SOMETIMES"
    with pytest.raises(Malformed):
        check_dsn(req)


def test_an_envid_an_older_relayq_took_is_encoded_not_refused() -> None:
    req = _request()
    req.envid = "a=b"  # not xtext, but printable ASCII (an older relayq's -V)
    note = check_dsn(req)
    assert "xtext-encoded" in note and req.envid == "a+3Db"


def test_notices_log_an_entry_once_and_forget_it_when_it_is_gone() -> None:
    n = Notices()
    assert n.note((1, 2)) and not n.note((1, 2)) and n.seen((1, 2))
    n.forget((1, 2))
    assert not n.seen((1, 2)) and n.note((1, 2))


def test_notices_start_over_rather_than_grow() -> None:
    n = Notices(max_noted=3)
    for ino in range(3):
        assert n.note((0, ino))
    assert n.note((0, 3))  # the set was full: cleared, then this one
    assert not n.seen((0, 0)) and n.seen((0, 3))


def test_each_user_is_told_at_most_max_notices_times() -> None:
    n = Notices(max_notices=2)
    assert [n.may_tell(1000) for _ in range(3)] == [True, True, False]
    assert n.may_tell(1001)


def test_notices_belong_to_their_owner_not_to_the_process() -> None:
    a, b = Notices(max_notices=1), Notices(max_notices=1)
    assert a.may_tell(1000) and not a.may_tell(1000)
    assert b.may_tell(1000)
