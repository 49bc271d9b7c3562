"""Property tests over hostile input (issue 7 §6): each parser either parses or raises
relayq's own error for that input, never anything else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.cli.flags import parse as parse_flags
from relayq.core.envelope import Envelope, Recipient
from relayq.core.errors import DamagedQueueFile, RelayqError
from relayq.smtp.protocol import ReplyParser, SmtpProtocolError

QID = "kBQ4oAAAAA0001"
FLAG_WORDS = st.sampled_from(["-t", "-i", "-f", "-F", "-o", "-O", "-b", "-q", "-v", "-odq",
                              "-oi", "-N", "-R", "-V", "-L", "-X", "-C", "-B", "-h", "--",
                              "-bp", "-bs", "-qR", "-q1h", "-oQ/tmp", "-OQueueDirectory=/x"])
ARGS = st.lists(st.one_of(FLAG_WORDS, st.text(max_size=30)), max_size=8)


@settings(max_examples=400)
@given(ARGS)
def test_the_flag_parser_parses_or_refuses(argv: list[str]) -> None:
    try:
        parse_flags(argv)
    except RelayqError:
        pass  # a usage error (64) or a refused flag (77), one line for the caller


@settings(max_examples=400)
@given(st.binary(max_size=600))
def test_the_envelope_reader_reads_or_calls_it_damaged(raw: bytes) -> None:
    try:
        env = Envelope.loads(raw, QID)
    except DamagedQueueFile:
        return
    assert env.qid == QID and env.recipients


@given(st.binary(max_size=400), st.sampled_from(["pending", "sent", "failed"]))
def test_envelope_damage_anywhere_is_detected_or_harmless(noise: bytes, state: str) -> None:
    env = Envelope(QID, "alice@example.org", [Recipient("bob@example.org", state)], 1.0)
    raw = env.dumps()
    cut = len(noise) % (len(raw) + 1)
    for mangled in (raw[:cut], raw[:cut] + noise, noise + raw[cut:]):
        try:
            got = Envelope.loads(mangled, QID)
        except DamagedQueueFile:
            continue
        assert got.qid == QID and got.recipients  # whatever parses is a whole record


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_the_reply_parser_yields_replies_or_a_protocol_error(chunks: list[bytes]) -> None:
    parser = ReplyParser()
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while (reply := parser.next_reply()) is not None:
                assert 100 <= reply.code <= 599
                assert all("\n" not in line and "\r" not in line for line in reply.lines)
    except SmtpProtocolError:
        pass
