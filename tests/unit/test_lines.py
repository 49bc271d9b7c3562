"""Input normalisation: line ends, stray CR, sendmail's dot rules (peers.md 6.4)."""

from hypothesis import given
from hypothesis import strategies as st

from relayq.core.lines import Normalizer


def feed(data: bytes, ignore_dots: bool, size: int) -> bytes:
    n = Normalizer(ignore_dots)
    out = b"".join(n.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + n.finish()


SIZES = (1, 2, 3, 5, 64, 1 << 16)


def test_lone_dot_ends_message_and_rest_is_discarded() -> None:
    for size in SIZES:
        assert feed(b"a\r\nb\r\n.\r\nafter terminator\n", False, size) == b"a\nb\n"


def test_only_doubled_leading_dot_loses_a_dot() -> None:
    for size in SIZES:
        assert feed(b"..two dots\n.single\n...\nend", False, size) == (
            b".two dots\n.single\n..\nend\n"
        )


def test_ignore_dots_keeps_everything() -> None:
    for size in SIZES:
        assert feed(b"a\n.\n..b\n", True, size) == b"a\n.\n..b\n"


def test_stray_cr_becomes_space_and_crlf_becomes_lf() -> None:
    for size in SIZES:
        assert feed(b"a\rb\r\nc\r\r\n", True, size) == b"a b\nc \n"


def test_missing_final_newline_is_added() -> None:
    assert feed(b"x", True, 1) == b"x\n"
    assert feed(b"", True, 1) == b""


def test_long_line_is_streamed_not_buffered() -> None:
    n = Normalizer(True)
    out = n.feed(b"x" * (3 << 20))
    assert len(out) >= 2 << 20 and len(n.carry) < (2 << 20)


@given(st.binary(max_size=300), st.booleans(), st.integers(1, 17))
def test_chunking_never_changes_the_result(data: bytes, dots: bool, size: int) -> None:
    whole = feed(data, dots, 1 << 20)
    assert feed(data, dots, size) == whole
    assert b"\r" not in whole
    if whole:
        assert whole.endswith(b"\n")
