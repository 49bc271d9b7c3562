"""relayq.core.headers: header parsing and sendmail 8.17's MSP rewriting rules (peers.md 6)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core.errors import DataError
from relayq.core.headers import (
    Field,
    Options,
    Result,
    format_date,
    format_display_name,
    make_msgid,
    parse_block,
    rewrite,
    serialize,
)

HOST = "vm.example.org"
NOW = 1795656600.0  # Thu, 26 Nov 2026 01:30:00 UTC
QID = "6AQ1UaXXXX0001"


def opts(**kw: object) -> Options:
    base: dict[str, object] = {
        "domain": HOST,
        "hostname": HOST,
        "qid": QID,
        "user": "root",
        "now": NOW,
        "sender": f"root@{HOST}",
        "local_domains": frozenset({HOST, "vm", "localhost"}),
    }
    base.update(kw)
    return Options(**base)  # type: ignore[arg-type]


def fields_of(text: str) -> list[Field]:
    fields, rest, _complete = parse_block(text)
    assert rest == ""
    return fields


def run(text: str, argv: list[str] | None = None, **kw: object) -> Result:
    return rewrite(fields_of(text), opts(**kw), argv or [])


def raws(result: Result) -> list[str]:
    return [f.raw for f in result.fields]


def get(result: Result, name: str) -> list[str]:
    return [f.raw for f in result.fields if f.name.lower() == name.lower()]


# ---------------------------------------------------------------------------
# parse_block


def test_parse_block_basic() -> None:
    fields, rest, complete = parse_block("Subject: hi\nTo: a@x\n\nbody\nmore\n")
    assert [(f.name, f.raw, f.value) for f in fields] == [
        ("Subject", "Subject: hi", " hi"),
        ("To", "To: a@x", " a@x"),
    ]
    assert rest == "body\nmore\n"
    assert complete


def test_parse_block_folded_fields_keep_their_folding() -> None:
    fields, rest, _ = parse_block("X-A: one\n two\n\tthree\nX-B: b\n\nbody")
    assert [f.raw for f in fields] == ["X-A: one\n two\n\tthree", "X-B: b"]
    assert fields[0].value == " one\n two\n\tthree"
    assert rest == "body"


def test_parse_block_non_header_line_starts_the_body() -> None:
    # peers.md 6.4: "A line without a colon becomes the first body line, with no
    # blank line inserted."
    fields, rest, complete = parse_block("Subject: hi\nthis is body\nX: y\n")
    assert [f.raw for f in fields] == ["Subject: hi"]
    assert rest == "this is body\nX: y\n"
    assert complete


@pytest.mark.parametrize("name", ["Message", "Text", "MESSAGE"])
def test_parse_block_message_and_text_end_the_header(name: str) -> None:
    # peers.md 6.4: "Headers named Message: or Text: also end the header block (H_EOH)".
    fields, rest, complete = parse_block(f"Subject: hi\n{name}: hello\n\tmore\nX: y\n\n")
    assert [f.raw for f in fields] == ["Subject: hi"]
    assert rest == f"{name}: hello\n\tmore\nX: y\n\n"
    assert complete


def test_parse_block_drops_leading_mbox_from_line() -> None:
    fields, rest, _ = parse_block("From root  Thu Nov 26 01:30:00 2026\nSubject: s\n\nb\n")
    assert [f.raw for f in fields] == ["Subject: s"]
    assert rest == "b\n"


def test_parse_block_from_with_space_before_colon_is_a_field() -> None:
    fields, _, _ = parse_block("From : a@x\n\n")
    assert [(f.name, f.raw) for f in fields] == [("From", "From : a@x")]


def test_parse_block_only_first_from_line_is_mbox() -> None:
    fields, rest, _ = parse_block("Subject: s\nFrom x@y Thu\n\n")
    assert [f.raw for f in fields] == ["Subject: s"]
    assert rest == "From x@y Thu\n\n"


@pytest.mark.parametrize(
    ("line", "is_field"),
    [
        ("X-Tolerated : yes", True),
        ("X-Tab\t: yes", True),
        ("Name:", True),
        ("A:b", True),
        (":nameless", False),
        (" leading: space", False),
        ("Bad Name: x", False),
        ("Ünïcode: x", False),
        ("no colon here", False),
    ],
)
def test_parse_block_field_names(line: str, is_field: bool) -> None:
    fields, rest, _ = parse_block(f"{line}\n\nbody")
    if is_field:
        assert [f.raw for f in fields] == [line]
        assert rest == "body"
    else:
        assert fields == []
        assert rest == f"{line}\n\nbody"


def test_parse_block_empty_header() -> None:
    assert parse_block("\nbody") == ([], "body", True)
    assert parse_block("body only\n") == ([], "body only\n", True)
    assert parse_block("") == ([], "", False)


def test_parse_block_incomplete_gives_the_end_of_input_reading() -> None:
    data = "Subject: hi\nX-Long: a\n"
    # A continuation may still follow: not complete, but usable if input ended here.
    assert parse_block(data) == (
        [Field("Subject", "Subject: hi"), Field("X-Long", "X-Long: a")],
        "",
        False,
    )
    fields, rest, complete = parse_block(data + "\tb\n\nbody")
    assert complete and rest == "body"
    assert [f.raw for f in fields] == ["Subject: hi", "X-Long: a\n\tb"]
    # A last line without LF is still a field (peers.md 6.4: a last line without a
    # newline is accepted).
    fields, rest, complete = parse_block("Subject: hi\nX: y")
    assert (rest, complete) == ("", False)
    assert [f.raw for f in fields] == ["Subject: hi", "X: y"]
    # A partial non-header line is body if the input ends, but could still become a field.
    assert parse_block("Subject: hi\nSubj") == ([Field("Subject", "Subject: hi")], "Subj", False)
    assert parse_block("Subject: hi\nbody\n") == ([Field("Subject", "Subject: hi")], "body\n", True)
    assert parse_block("Fro") == ([], "Fro", False)
    assert parse_block("From root Thu") == ([], "", False)
    assert parse_block("From root Thu\n") == ([], "", False)
    assert parse_block("From root Thu\n\nb") == ([], "b", True)


@given(st.text(alphabet="ab: \t\nF-rom", max_size=60), st.integers(min_value=0, max_value=60))
def test_parse_block_streaming_prefixes_agree_with_the_whole(data: str, cut: int) -> None:
    # A caller may feed the first N characters, then everything: a complete answer on
    # the prefix is the answer on the whole input.
    fields, rest, complete = parse_block(data[:cut])
    whole_fields, whole_rest, _ = parse_block(data)
    if complete:
        assert fields == whole_fields
        assert len(data[:cut]) - len(rest) == len(data) - len(whole_rest)
        assert whole_rest.startswith(rest)


def test_serialize() -> None:
    assert serialize([Field("A", "A: 1"), Field("B", "B: 2\n\t3")]) == b"A: 1\nB: 2\n\t3\n\n"
    assert serialize([]) == b"\n"


def test_eight_bit_header_bytes_round_trip_byte_for_byte() -> None:
    raw = (
        b"Subject: caf\xc3\xa9 \xe9\xff latin-1 and broken bytes\n"
        b"From: J\xc3\xbcrgen <j@x.example>\n"
        b"X-Folded: a\xe9\n\t\xc3\xa9b\n"
        b"\n"
    )
    fields, rest, complete = parse_block(raw.decode("utf-8", "surrogateescape") + "body")
    assert complete and rest == "body"
    assert serialize(fields) == raw
    # Nothing needs rewriting (all qualified, Date/Message-ID present): fields unchanged.
    more = raw[:-1] + b"Date: x\nMessage-ID: <a@b>\nTo: t@x.example\n\n"
    fields, _, _ = parse_block(more.decode("utf-8", "surrogateescape"))
    result = rewrite(fields, opts(), ["t@x.example"])
    assert serialize(result.fields[1:]) == more
    assert result.eight_bit_headers


_NAME = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1).filter(
    lambda s: ":" not in s
)
_LINE = st.text(
    alphabet=st.characters(exclude_characters="\n\r", exclude_categories=["Cs"]), max_size=30
)


@st.composite
def _blocks(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        name = draw(_NAME)
        if name.lower() in ("message", "text"):
            name = "X-" + name
        lines.append(f"{name}{draw(st.sampled_from(['', ' ']))}:{draw(_LINE)}")
        for _ in range(draw(st.integers(min_value=0, max_value=2))):
            lines.append(draw(st.sampled_from([" ", "\t"])) + draw(_LINE))
    if lines and lines[0].startswith("From "):
        lines[0] = "X" + lines[0]
    return "".join(line + "\n" for line in lines) + "\n"


@given(_blocks(), st.text(max_size=20), st.binary(max_size=10))
def test_parse_block_serialize_is_identity(block: str, body: str, junk: bytes) -> None:
    fields, rest, complete = parse_block(block + body)
    assert complete
    assert rest == body
    assert serialize(fields) == block.encode("utf-8")
    # and with undecodable bytes in a value
    extra = "X-Junk: " + junk.decode("utf-8", "surrogateescape").replace("\n", "")
    fields, _, _ = parse_block(extra + "\n" + block)
    assert serialize(fields) == (extra + "\n" + block).encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# rewrite rule 1: recipients


def test_t_combines_argv_and_headers_in_sendmails_order() -> None:
    # peers.md 6.1: "Input To: a, b / Cc: c / Bcc: d with sendmail -t b@… x@… queued
    # recipients b, x, a, c, d".
    r = run(
        "To: a, b\nCc: c\nBcc: d\nSubject: s\n",
        ["b@vm.example.org", "x@vm.example.org"],
        extract=True,
    )
    assert r.recipients == [f"{u}@{HOST}" for u in "bxacd"]


def test_t_reads_apparently_to() -> None:
    r = run("Apparently-To: a@x\nSubject: s\n", extract=True)
    assert r.recipients == ["a@x"]


def test_t_with_resent_headers_uses_only_resent_recipients() -> None:
    # peers.md 6.1: "To: orig@ ignored, Resent-To: new@ used".
    r = run(
        "To: orig@x\nCc: cc@x\nResent-To: new@x\nResent-Cc: rc@x\nResent-Bcc: rb@x\n",
        extract=True,
    )
    assert r.recipients == ["new@x", "rc@x", "rb@x"]
    assert r.resent


def test_t_duplicates_removed_case_insensitive_on_domain_only() -> None:
    r = run(
        "To: A@X.example, a@x.example, Bob@EXAMPLE.org\nCc: bob@example.org, Bob@example.ORG\n",
        ["a@x.EXAMPLE"],
        extract=True,
    )
    assert r.recipients == ["a@x.EXAMPLE", "A@X.example", "Bob@EXAMPLE.org", "bob@example.org"]


def test_t_groups_comments_and_folding() -> None:
    r = run(
        'To: team: a@x, "B, b" <b@y>;,\n\tundisclosed-recipients:;\n'
        "Cc: root (Cron Daemon),\n  <@relay:c@z>\n",
        extract=True,
    )
    assert r.recipients == ["a@x", "b@y", f"root@{HOST}", "c@z"]


def test_t_header_with_no_addresses_gives_argv_only() -> None:
    r = run("To: undisclosed-recipients:;\n", ["z@x"], extract=True)
    assert r.recipients == ["z@x"]


def test_without_t_recipients_are_argv_qualified() -> None:
    r = run("To: a@x\nCc: b@y\n", ["root", "other@x", "root"])
    assert r.recipients == [f"root@{HOST}", "other@x"]


def test_t_refuses_header_address_with_control_character() -> None:
    with pytest.raises(DataError, match="To"):
        run('To: "a\x00b"@x\n', extract=True)


def test_t_unfolds_quoted_local_part_across_lines() -> None:
    r = run('To: "a\n b"@x\n', extract=True)
    assert r.recipients == ['"a b"@x']


# ---------------------------------------------------------------------------
# rule 2: Bcc


@pytest.mark.parametrize("extract", [False, True])
@pytest.mark.parametrize("visible", ["To: a@x", "Cc: a@x", "Apparently-To: a@x", "to: a@x"])
def test_bcc_deleted_when_to_cc_or_apparently_to(extract: bool, visible: str) -> None:
    # peers.md 6.2: "If the message has To:, Cc: or Apparently-To:, every Bcc:/Resent-Bcc:
    # header is deleted ... with or without -t".
    r = run(
        f"{visible}\nBcc: secret@x\nBCC: other@y\nResent-Bcc: r@z\nSubject: s\n",
        ["a@x"],
        extract=extract,
    )
    assert not get(r, "bcc")
    assert not get(r, "resent-bcc")
    assert get(r, "subject") == ["Subject: s"]


@pytest.mark.parametrize("extract", [False, True])
def test_bcc_kept_empty_without_visible_recipients(extract: bool) -> None:
    # peers.md 6.2: "Otherwise the header is kept with its value removed (Bcc: alone on the wire)".
    r = run("Bcc: secret@x,\n\tother@y\nSubject: s\n", ["a@x"], extract=extract)
    assert get(r, "bcc") == ["Bcc:"]
    assert b"secret" not in serialize(r.fields)
    if extract:
        assert r.recipients == ["a@x", "secret@x", "other@y"]


def test_resent_bcc_deleted_when_resent_to_present() -> None:
    r = run("Resent-To: n@x\nResent-Bcc: hidden@x\nBcc: b@x\n", extract=True)
    assert not get(r, "resent-bcc") and not get(r, "bcc")
    assert r.recipients == ["n@x", "hidden@x"]


def test_resent_bcc_kept_empty_when_no_visible_recipients() -> None:
    r = run("Resent-From: a@x\nResent-Bcc: hidden@x\n", extract=True)
    assert get(r, "resent-bcc") == ["Resent-Bcc:"]


# ---------------------------------------------------------------------------
# rule 3: qualification and masquerading in place


def test_cron_headers_exactly() -> None:
    # cron: From: root (Cron Daemon) / To: root. peers.md 6.3: "Unqualified addresses in
    # headers and envelope are qualified with $j".
    text = (
        "From: root (Cron Daemon)\n"
        "To: root\n"
        "Subject: Cron <root@vm> /usr/local/bin/backup\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=UTF-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "X-Cron-Env: <SHELL=/bin/sh>\n"
        "X-Cron-Env: <HOME=/root>\n"
    )
    r = run(text, extract=True)
    assert raws(r)[3:] == [
        f"From: root@{HOST} (Cron Daemon)",
        f"To: root@{HOST}",
        "Subject: Cron <root@vm> /usr/local/bin/backup",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=UTF-8",
        "Content-Transfer-Encoding: 8bit",
        "X-Cron-Env: <SHELL=/bin/sh>",
        "X-Cron-Env: <HOME=/root>",
    ]
    assert r.recipients == [f"root@{HOST}"]
    assert get(r, "received") == [
        "Received: (from root@localhost)\n"
        f"\tby {HOST} (relayq) id {QID}\n"
        f"\tfor <root@{HOST}>; Thu, 26 Nov 2026 01:30:00 +0000"
    ]


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("From: root", f"From: root@{HOST}"),
        ("From: root <root>", f"From: root <root@{HOST}>"),
        ('From: "Jane Q. Doe" <root>', f'From: "Jane Q. Doe" <root@{HOST}>'),
        ("Sender: daemon", f"Sender: daemon@{HOST}"),
        ("Reply-To: a, b@y ,\n\tc (C)", f"Reply-To: a@{HOST}, b@y ,\n\tc@{HOST} (C)"),
        ("Cc: x:a, b@q;", f"Cc: x:a@{HOST}, b@q;"),
        ("To:root", f"To:root@{HOST}"),
        ("To :  root  ", f"To :  root@{HOST}  "),
        ("Resent-To: a", f"Resent-To: a@{HOST}"),
        ("Resent-From: a", f"Resent-From: a@{HOST}"),
        ("Resent-Sender: a", f"Resent-Sender: a@{HOST}"),
        ("Resent-Cc: a", f"Resent-Cc: a@{HOST}"),
        # not address fields: untouched
        ("Subject: root", "Subject: root"),
        ("Apparently-To: root", "Apparently-To: root"),
        ("In-Reply-To: <a@b>", "In-Reply-To: <a@b>"),
        # qualified and junk: byte-identical
        ("To: Jürgen <j@x>, ,junk junk,", "To: Jürgen <j@x>, ,junk junk,"),
        ("To: undisclosed-recipients:;", "To: undisclosed-recipients:;"),
    ],
)
def test_unqualified_addresses_qualified_in_place(field: str, expected: str) -> None:
    r = run(f"{field}\nDate: d\nMessage-ID: <m@x>\n")
    assert expected in raws(r)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("From: root", "From: root@example.com"),
        (f"From: Root <root@{HOST}>", "From: Root <root@example.com>"),
        ("From: root@VM.Example.Org (x)", "From: root@example.com (x)"),
        ("From: a@localhost, b@vm", "From: a@example.com, b@example.com"),
        ("Sender: s@vm", "Sender: s@example.com"),
        ("Resent-From: r", "Resent-From: r@example.com"),
        ("Resent-Sender: r@localhost", "Resent-Sender: r@example.com"),
        # other domains untouched
        ("From: a@elsewhere.example", "From: a@elsewhere.example"),
        # recipients are qualified with the host's domain, never masqueraded
        (f"To: root, t@{HOST}", f"To: root@{HOST}, t@{HOST}"),
        ("Reply-To: r@vm", "Reply-To: r@vm"),
    ],
)
def test_masquerade_sender_fields(field: str, expected: str) -> None:
    r = run(f"{field}\n", masquerade_as="example.com")
    assert expected in raws(r)


# ---------------------------------------------------------------------------
# rule 4: Date, Message-ID, From


def test_missing_headers_added_like_sendmail() -> None:
    # peers.md 6.3: Date, From and Message-Id added only when missing;
    # Message-Id is <YYYYMMDDhhmm.QUEUEID@fqdn>.
    r = run("Subject: s\n", ["one@example.org"], full_name="root")
    assert raws(r) == [
        "Received: (from root@localhost)\n"
        f"\tby {HOST} (relayq) id {QID}\n"
        "\tfor <one@example.org>; Thu, 26 Nov 2026 01:30:00 +0000",
        "Date: Thu, 26 Nov 2026 01:30:00 +0000",
        f"From: root <root@{HOST}>",
        f"Message-ID: <202611260130.{QID}@{HOST}>",
        "Subject: s",
    ]
    assert r.msgid == f"<202611260130.{QID}@{HOST}>"
    assert not r.resent
    assert not r.eight_bit_headers


def test_existing_headers_not_replaced() -> None:
    text = "Date: Mon, 1 Jan 2024 00:00:00 +0100\nFrom: me@x\nMessage-Id:\n <keep@x>\n"
    r = run(text, ["a@x"])
    assert raws(r)[1:] == [
        "Date: Mon, 1 Jan 2024 00:00:00 +0100",
        "From: me@x",
        "Message-Id:\n <keep@x>",
    ]
    assert r.msgid == "<keep@x>"


@pytest.mark.parametrize(
    ("full_name", "sender", "expected"),
    [
        ("", f"root@{HOST}", f"From: root@{HOST}"),
        ("Root", f"root@{HOST}", f"From: Root <root@{HOST}>"),
        # peers.md 6.3: -F "Jane Q. Doe" -> From: "Jane Q. Doe" <root>
        ("Jane Q. Doe", "jane@x", 'From: "Jane Q. Doe" <jane@x>'),
        ('Say "hi" \\o/', "a@x", 'From: "Say \\"hi\\" \\\\o/" <a@x>'),
        ("Doe, Jane", "a@x", 'From: "Doe, Jane" <a@x>'),
        ("Jürgen Müller", "a@x", "From: =?utf-8?B?SsO8cmdlbiBNw7xsbGVy?= <a@x>"),
        ("", "", f"From: MAILER-DAEMON@{HOST}"),
        ("Mail System", "", f"From: Mail System <MAILER-DAEMON@{HOST}>"),
    ],
)
def test_from_added(full_name: str, sender: str, expected: str) -> None:
    r = run("Subject: s\n", ["a@x"], full_name=full_name, sender=sender)
    assert get(r, "from") == [expected]


def test_long_non_ascii_name_split_into_short_encoded_words() -> None:
    value = format_display_name("é" * 100)
    words = value.split(" ")
    assert len(words) > 1
    assert all(len(w) <= 75 and w.startswith("=?utf-8?B?") for w in words)


def test_resent_message_gets_resent_date_and_id() -> None:
    # peers.md 6.1: with Resent-* present "Sendmail then adds Resent-Date and Resent-Message-Id".
    r = run("Resent-To: n@x\nDate: old\nMessage-ID: <old@x>\nFrom: o@x\n", extract=True)
    assert r.resent
    assert get(r, "resent-date") == ["Resent-Date: Thu, 26 Nov 2026 01:30:00 +0000"]
    assert get(r, "resent-message-id") == [f"Resent-Message-ID: <202611260130.{QID}@{HOST}>"]
    assert get(r, "date") == ["Date: old"]
    assert get(r, "message-id") == ["Message-ID: <old@x>"]
    assert r.msgid == f"<202611260130.{QID}@{HOST}>"


def test_resent_message_keeps_existing_resent_id() -> None:
    r = run("Resent-Message-ID: <r@x>\nResent-Date: d\nFrom: a@x\n", ["a@x"])
    assert r.msgid == "<r@x>"
    assert len(r.fields) == 4


def test_date_uses_local_offset() -> None:
    assert format_date(NOW, 0) == "Thu, 26 Nov 2026 01:30:00 +0000"
    assert format_date(NOW, -5 * 3600) == "Wed, 25 Nov 2026 20:30:00 -0500"
    assert format_date(NOW, 5 * 3600 + 1800) == "Thu, 26 Nov 2026 07:00:00 +0530"
    assert format_date(0, 0) == "Thu, 01 Jan 1970 00:00:00 +0000"


def test_msgid_is_utc() -> None:
    assert make_msgid(NOW, "Q", "h.example") == "<202611260130.Q@h.example>"


# ---------------------------------------------------------------------------
# rule 5: Received


def test_received_without_for_clause_for_several_recipients() -> None:
    # peers.md 6.3: "for <rcpt> appears only with exactly one recipient".
    r = run("Subject: s\n", ["a@x", "b@x"], user="alice")
    assert raws(r)[0] == (
        "Received: (from alice@localhost)\n"
        f"\tby {HOST} (relayq) id {QID}; Thu, 26 Nov 2026 01:30:00 +0000"
    )


def test_received_prepended_and_hops_counted() -> None:
    text = "Received: from a\nReceived: from b\n\tby c\nSubject: s\n"
    r = run(text, ["a@x"])
    assert r.hops == 2
    assert r.fields[0].raw.startswith("Received: (from root@localhost)")
    assert len(get(r, "received")) == 3


# ---------------------------------------------------------------------------
# rule 6 and safety


def test_eight_bit_headers_flag() -> None:
    assert run("Subject: caf\udce9\n", ["a@x"]).eight_bit_headers
    assert run("Subject: café\n", ["a@x"]).eight_bit_headers
    assert run("Subject: cafe\n", ["a@x"], full_name="Jürgen").eight_bit_headers is False


@pytest.mark.parametrize(
    "kw",
    [
        {"full_name": "Evil\nBcc: victim@x"},
        {"full_name": "Evil\r"},
        {"sender": "a@x\nX: y"},
        {"user": "u\n"},
        {"hostname": "h\x00"},
        {"qid": "Q\r\n"},
        {"domain": "d\nX: y"},
        {"masquerade_as": "m\n"},
    ],
)
def test_values_cannot_create_header_lines(kw: dict[str, str]) -> None:
    # peers.md 8.5: msmtp and nullmailer turn CR/LF in -F into extra headers.
    with pytest.raises(DataError):
        run("Subject: s\n", ["a@x"], **kw)


def test_argv_recipient_with_line_break_refused() -> None:
    with pytest.raises(DataError):
        run("Subject: s\n", ["a@x\nX: y"])


def test_input_fields_not_modified() -> None:
    fields = fields_of("To: root\nBcc: b\n")
    before = [(f.name, f.raw) for f in fields]
    rewrite(fields, opts(), [])
    assert [(f.name, f.raw) for f in fields] == before


@given(st.text(max_size=80), st.text(max_size=30))
def test_rewrite_never_lets_input_split_lines(value: str, name: str) -> None:
    data = f"To: {value}\nFrom: {value}\nBcc: {value}\n\n"
    fields, _, _ = parse_block(data)
    try:
        r = rewrite(
            fields,
            opts(
                full_name=name.replace("\n", "").replace("\r", "").replace("\x00", ""), extract=True
            ),
            [],
        )
    except DataError:
        return
    for f in r.fields:
        # every added/rewritten line is either a field start or a continuation
        for line in f.raw.split("\n")[1:]:
            assert line[:1] in (" ", "\t")
