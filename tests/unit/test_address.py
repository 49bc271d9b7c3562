"""relayq.core.address: the tolerant header parser and the strict command-line parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core.address import (
    Found,
    check_text,
    compact,
    needs_smtputf8,
    parse_list,
    parse_mailbox,
    parse_recipient_args,
    qualify,
    split,
)
from relayq.core.errors import EX_DATAERR, DataError


def addrs(value: str) -> list[str]:
    return [f.addr for f in parse_list(value)]


# ---------------------------------------------------------------------------
# parse_list


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", []),
        ("   \n\t ", []),
        ("a@example.org", ["a@example.org"]),
        ("  a@example.org  ", ["a@example.org"]),
        # cron: "From: root (Cron Daemon)", "To: root"
        ("root (Cron Daemon)", ["root"]),
        ("root", ["root"]),
        ("Jane Doe <jane@example.org>", ["jane@example.org"]),
        ('"Doe, Jane" <jane@example.org>, b@x', ["jane@example.org", "b@x"]),
        ('"Jane Q. Doe" <root>', ["root"]),
        ("Jane Q. Doe <j@x>", ["j@x"]),
        ("a@x, b@y,c@z", ["a@x", "b@y", "c@z"]),
        ("a@x,, ,b@y,", ["a@x", "b@y"]),
        # groups
        ("undisclosed-recipients:;", []),
        ("undisclosed-recipients: ;", []),
        ("team: a@x, B <b@y>;", ["a@x", "b@y"]),
        ("team: a@x, b@y;, c@z", ["a@x", "b@y", "c@z"]),
        ("x@y, team: a@x;", ["x@y", "a@x"]),
        # obsolete route
        ("<@relay1.example,@relay2.example:user@example.org>", ["user@example.org"]),
        ("Name <@r:u@h>, v@w", ["u@h", "v@w"]),
        # comments, nested, anywhere
        ("(a (nested) comment) a@x (another)", ["a@x"]),
        ("Name (c) <a@x> (d)", ["a@x"]),
        ("(comment with , and <x@y>) a@x", ["a@x"]),
        # quoted local parts and domain literals
        ('"john doe"@example.org', ['"john doe"@example.org']),
        ('"a\\"b"@x', ['"a\\"b"@x']),
        ("user@[192.0.2.1]", ["user@[192.0.2.1]"]),
        ("user@[IPv6:2001:db8::1]", ["user@[IPv6:2001:db8::1]"]),
        # folding whitespace
        ("a@x,\n\tb@y", ["a@x", "b@y"]),
        ("Jane\n Doe\n <jane@x>", ["jane@x"]),
        # null address and junk are skipped
        ("<>", []),
        ("Jane Doe", []),
        (",,,", []),
        ("<<>>", []),
        ("@@@", []),
        ("a@", []),
        ("@x", []),
        (".", []),
        ("a@b@c, d@e", ["d@e"]),
        # tolerance: unclosed '<' and quote
        ("Name <a@x", ["a@x"]),
        ("Name <a@x, b@y", ["a@x", "b@y"]),
        # 8-bit and UTF-8
        ("Jürgen <jürgen@bücher.example>", ["jürgen@bücher.example"]),
        ("caf\udce9@x", ["caf\udce9@x"]),
        # dotted oddities seen in the wild
        ("a..b@x", ["a..b@x"]),
        ("a.@x", ["a.@x"]),
    ],
)
def test_parse_list(value: str, expected: list[str]) -> None:
    assert addrs(value) == expected


def test_parse_list_spans_allow_rewriting_in_place() -> None:
    value = " root (Cron Daemon)"
    (found,) = parse_list(value)
    assert found == Found(1, 5, "root")
    rewritten = value[: found.start] + "root@host.example" + value[found.end :]
    assert rewritten == " root@host.example (Cron Daemon)"


def test_parse_list_obsolete_whitespace_inside_addr_spec() -> None:
    # RFC 5322 obs-local-part allows CFWS around dots; the span covers it as written.
    (found,) = parse_list("a . b @ example.org")
    assert found.addr == "a . b @ example.org"
    assert compact(found.addr) == "a.b@example.org"


def test_compact() -> None:
    assert compact("a@x") == "a@x"
    assert compact('"a b" (c) @ x') == '"a b"@x'


@given(st.text())
def test_parse_list_never_raises_and_spans_hold(value: str) -> None:
    for found in parse_list(value):
        assert 0 <= found.start < found.end <= len(value)
        assert value[found.start : found.end] == found.addr


_ADDRESSY = st.text(alphabet='abc@.,:;<>()"\\[] \t\n-é', max_size=40)


@given(_ADDRESSY)
def test_parse_list_never_raises_on_address_like_junk(value: str) -> None:
    for found in parse_list(value):
        assert value[found.start : found.end] == found.addr


# ---------------------------------------------------------------------------
# parse_mailbox


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a@b", "a@b"),
        ("<a@b>", "a@b"),
        ("  <a@b>  ", "a@b"),
        ("Name <a@b>", "a@b"),
        ('"Jane Q. Doe" <jane@example.org>', "jane@example.org"),
        ("<>", ""),  # -f <> is the null sender (peers.md 6.5)
        ("root", "root"),
        ('"john doe"@example.org', '"john doe"@example.org'),
        ("a@b (comment)", "a@b"),
        ("<@relay:a@b>", "a@b"),
        ("user@[192.0.2.1]", "user@[192.0.2.1]"),
        ("jürgen@bücher.example", "jürgen@bücher.example"),
        ("a-b@c", "a-b@c"),
    ],
)
def test_parse_mailbox_accepts(text: str, expected: str) -> None:
    assert parse_mailbox(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        # peers.md 8.5: sendmail exits 64 yet delivers with CR/LF in -f; we refuse outright.
        "a@b\r\nRCPT TO:<evil@x>",
        "a@b\nX",
        "a\rb@c",
        "a\x00b@c",
        "a\tb@c",
        "a\x7fb@c",
        "a\x1bb@c",
        # peers.md 8.6: "<unbalanced@example.org" -> sendmail exit 64
        "<unbalanced@example.org",
        "unbalanced@example.org>",
        "<<a@b>>",
        "<a@b> <c@d>",
        "<a@b> trailing",
        '"unclosed@x',
        "(unclosed a@x",
        "a b@c",
        "a@b c",
        "a@b, c@d",
        "a@b c@d",
        "-oi",
        "-f@x",
        "<-x@y>",
        "-Name <a@b>",
        "  -oi",
        "a@",
        "@b",
        "a@b@c",
        "group: a@b;",
        "a@b;",
        "x" * 999,
        "<" + "x" * 997 + ">",
        "a@b]",
        "Name@x <a@b>",
    ],
)
def test_parse_mailbox_refuses(text: str) -> None:
    with pytest.raises(DataError) as info:
        parse_mailbox(text, "sender")
    assert info.value.code == EX_DATAERR
    assert "sender" in info.value.message


def test_parse_mailbox_message_names_value_escaped() -> None:
    with pytest.raises(DataError) as info:
        parse_mailbox("a@b\r\nDATA", "-f address")
    msg = info.value.message
    assert "-f address" in msg
    assert "'a@b\\r\\nDATA'" in msg
    assert "\n" not in msg and "\r" not in msg


def test_parse_mailbox_length_limit_is_998() -> None:
    ok = "x" * 990 + "@abc.de"
    assert len(ok) == 997
    assert parse_mailbox(ok) == ok
    assert parse_mailbox(ok + "f") == ok + "f"
    with pytest.raises(DataError):
        parse_mailbox(ok + "fg")


@given(st.text(max_size=60))
def test_parse_mailbox_returns_clean_or_raises_data_error(text: str) -> None:
    try:
        addr = parse_mailbox(text)
    except DataError:
        return
    assert not any(ord(c) < 32 or ord(c) == 127 for c in addr)
    assert not addr.startswith("-")
    assert len(addr) <= 998


@given(_ADDRESSY)
def test_parse_mailbox_on_address_like_junk(text: str) -> None:
    try:
        addr = parse_mailbox(text)
    except DataError:
        return
    assert "\n" not in addr and "\t" not in addr


# ---------------------------------------------------------------------------
# parse_recipient_args


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a@x", ["a@x"]),
        ("a@x, b@y", ["a@x", "b@y"]),
        ("a@x,b@y,", ["a@x", "b@y"]),
        ("Name <c@z>", ["c@z"]),
        ('"Doe, Jane" <j@x>, root', ["j@x", "root"]),
        ("<@r1,@r2:u@h>, v@w", ["u@h", "v@w"]),
    ],
)
def test_parse_recipient_args(text: str, expected: list[str]) -> None:
    assert parse_recipient_args(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", ",", "<>", "a@x, <>", "a@x\nb@y", "a@x, -oi", "a@x, <b@y", "a b", "team: a@x;"],
)
def test_parse_recipient_args_refuses(text: str) -> None:
    with pytest.raises(DataError, match="recipient"):
        parse_recipient_args(text)


@given(st.text(max_size=60))
def test_parse_recipient_args_clean_or_data_error(text: str) -> None:
    try:
        out = parse_recipient_args(text)
    except DataError:
        return
    assert out
    for addr in out:
        assert addr and not any(ord(c) < 32 or ord(c) == 127 for c in addr)


# ---------------------------------------------------------------------------
# helpers


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("root", "root@vm.example.org"),
        ("root@other.example", "root@other.example"),
        ("", ""),
        ('"a@b"', '"a@b"@vm.example.org'),
        ('"a@b"@c', '"a@b"@c'),
    ],
)
def test_qualify(addr: str, expected: str) -> None:
    assert qualify(addr, "vm.example.org") == expected


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("a@b", ("a", "b")),
        ("root", ("root", "")),
        ('"x@y"@z', ('"x@y"', "z")),
        ('"x@y"', ('"x@y"', "")),
        ("a@b@c", ("a@b", "c")),
        ('"a\\"@"@d', ('"a\\"@"', "d")),
    ],
)
def test_split(addr: str, expected: tuple[str, str]) -> None:
    assert split(addr) == expected


def test_needs_smtputf8() -> None:
    assert not needs_smtputf8("a@example.org")
    assert needs_smtputf8("jürgen@example.org")
    assert needs_smtputf8("caf\udce9@x")  # an undecodable 8-bit byte


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\x00b"])
def test_check_text_refuses_line_breaks(bad: str) -> None:
    with pytest.raises(DataError, match="full name"):
        check_text(bad, "full name")


def test_check_text_accepts_plain_text() -> None:
    check_text("Jane Q. Doe \t ü", "full name")
