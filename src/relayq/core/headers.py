"""The message header block: split it off the body, fix it up the way sendmail's MSP does.

`parse_block` cuts the header fields from the start of a message and
`serialize` writes them back; together they are the identity on a well-formed
block, byte for byte, 8-bit bytes included (text is `str` decoded with
utf-8/surrogateescape). `rewrite` applies sendmail 8.17's submission rules
(research/peers.md section 6): `-t` recipient collection, Bcc removal,
qualification and masquerading of addresses in place, the missing
Date/From/Message-ID, and a `Received:` trace field. A field that needs no
change keeps its exact bytes.

Pure code: no files, sockets, clock or environment; time and names come in
through `Options`.
"""

from __future__ import annotations

import time

from relayq.core.address import check_text, compact, parse_list, qualify, split
from relayq.core.errors import DataError
from relayq.core.rewrite import generic

TYPE_CHECKING = False  # typing (and re, which it imports) costs ~8 ms at startup
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

MAX_ADDRESS = 998

# Fields that end the header block (sendmail conf.c HdrInfo, flag H_EOH).
_EOH = frozenset(("message", "text"))
_RCPT_FIELDS = frozenset(("to", "cc", "bcc", "apparently-to"))
_RESENT_RCPT_FIELDS = frozenset(("resent-to", "resent-cc", "resent-bcc"))
_BCC = frozenset(("bcc", "resent-bcc"))
_QUALIFY = frozenset(
    (
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "resent-from",
        "resent-sender",
        "resent-to",
        "resent-cc",
    )
)
_SENDER_FIELDS = frozenset(("from", "sender", "resent-from", "resent-sender"))
_NAME_SPECIALS = '()<>[]:;@\\,."'
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Field:
    """One header field; `raw` is the whole field ("Name: value\\n\\tmore") without its final LF."""

    __slots__ = ("name", "raw")

    def __init__(self, name: str, raw: str) -> None:
        self.name = name
        self.raw = raw

    @property
    def value(self) -> str:
        """Everything after the first colon, still folded."""
        return self.raw[self.raw.index(":") + 1 :]

    @property
    def head(self) -> str:
        """The field up to and including its colon, as written ("Subject:", "To :")."""
        return self.raw[: self.raw.index(":") + 1]

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.raw!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Field):
            return NotImplemented
        return self.name == other.name and self.raw == other.raw

    def __hash__(self) -> int:
        return hash((self.name, self.raw))


def _field_name(line: str) -> str | None:
    """The field name if `line` starts a header field ("Name:" or "Name :"), else None."""
    n = len(line)
    i = 0
    while i < n:
        o = ord(line[i])
        if o < 33 or o > 126 or o == 58:  # 58 = ':'
            break
        i += 1
    if i == 0:
        return None
    j = i
    while j < n and line[j] in " \t":
        j += 1
    if j < n and line[j] == ":":
        return line[:i]
    return None


def parse_block(data: str) -> tuple[list[Field], str, bool]:
    """Split the header fields off the start of a message with LF line ends.

    Returns (fields, rest, complete). The block ends at the first empty line
    (consumed: it is in neither part) or at the first line that is neither a
    header field nor a continuation; that line starts `rest`, the body (so
    does a "Message:" or "Text:" field, which ends the block like sendmail's
    H_EOH). A leading mbox "From " line is dropped. A continuation line
    with nothing before it, or an 8-bit character in a field name, starts
    the body.

    (fields, rest) is always what the message would be if it ended with
    `data`: at end of input the last line, with or without its LF, belongs
    to the block. `complete` says whether more data could change that: it is
    False when `data` ends inside the header block (or inside its first
    line). The function keeps no state, so a streaming caller reads more and
    calls again with *all* the data from the start of the message, and at
    end of input uses the result whatever `complete` says. A caller holding
    all the header bytes simply calls it once.
    """
    fields: list[Field] = []
    n = len(data)
    pos = 0
    if data[:5] == "From ":
        nl = data.find("\n")
        first = data if nl < 0 else data[:nl]
        if _field_name(first) is None:  # "From : x" would be a header field
            if nl < 0:
                return fields, "", False
            pos = nl + 1
    elif n < 5 and "From ".startswith(data):
        return fields, data, False  # too short to tell an mbox line from anything else

    cur_name = ""
    cur_start = -1  # start of the field being collected
    cur_end = -1  # end of its last line (before the LF)
    while pos < n:
        nl = data.find("\n", pos)
        partial = nl < 0  # the last line, so far without its LF
        if partial:
            line_end = next_pos = n
        else:
            line_end, next_pos = nl, nl + 1
        first_char = data[pos]
        if cur_start >= 0 and (first_char == " " or first_char == "\t"):
            cur_end = line_end  # continuation line
            pos = next_pos
            continue
        if cur_start >= 0:
            fields.append(Field(cur_name, data[cur_start:cur_end]))
            cur_start = -1
        if first_char == "\n":
            return fields, data[next_pos:], True
        name = _field_name(data[pos:line_end])
        if name is None or name.lower() in _EOH:
            # A partial line may still turn into a header field ("Subj" + "ect: x").
            return fields, data[pos:], not partial
        cur_name, cur_start, cur_end = name, pos, line_end
        pos = next_pos
    if cur_start >= 0:
        fields.append(Field(cur_name, data[cur_start:cur_end]))
    return fields, "", False


def serialize(fields: Iterable[Field]) -> bytes:
    """The header block as bytes: each field and an LF, then the empty line."""
    text = "".join(f"{f.raw}\n" for f in fields) + "\n"
    return text.encode("utf-8", "surrogateescape")


class Options:
    """What `rewrite` needs to know about the submission; all strings, no I/O."""

    __slots__ = (
        "auth_warning",
        "domain",
        "extract",
        "full_name",
        "generics",
        "generics_domains",
        "hostname",
        "local_domains",
        "masquerade_as",
        "now",
        "qid",
        "received_from",
        "sender",
        "tz_offset",
        "user",
    )

    def __init__(
        self,
        *,
        domain: str,
        hostname: str,
        qid: str,
        user: str,
        now: float,
        tz_offset: int = 0,
        masquerade_as: str = "",
        local_domains: frozenset[str] = frozenset(),
        sender: str = "",
        full_name: str = "",
        extract: bool = False,
        received_from: str = "",
        auth_warning: str = "",
        generics: dict[str, str] | None = None,
        generics_domains: frozenset[str] = frozenset(),
    ) -> None:
        self.generics = generics or {}  # relayq.core.rewrite.parse_generics: sender fields
        self.generics_domains = generics_domains
        self.auth_warning = auth_warning  # sendmail's X-Authentication-Warning text, if any
        self.domain = domain
        self.masquerade_as = masquerade_as
        self.local_domains = local_domains
        self.sender = sender
        self.full_name = full_name
        self.extract = extract
        self.qid = qid
        self.user = user
        self.received_from = received_from  # "HELO (localhost [IP])" for SMTP, "" for argv
        self.now = now
        self.tz_offset = tz_offset
        self.hostname = hostname


class Result:
    """The rewritten header fields and what the envelope needs from them."""

    __slots__ = ("bare", "eight_bit_headers", "fields", "hops", "msgid", "recipients",
                 "resent")

    def __init__(
        self,
        fields: list[Field],
        recipients: list[str],
        hops: int,
        resent: bool,
        msgid: str,
        eight_bit_headers: bool,
        bare: frozenset[str] = frozenset(),
    ) -> None:
        self.fields = fields
        self.bare = bare  # recipients typed without a domain, as qualified (local_forward)
        self.recipients = recipients
        self.hops = hops
        self.resent = resent
        self.msgid = msgid
        self.eight_bit_headers = eight_bit_headers

    def __repr__(self) -> str:
        return (
            f"Result(recipients={self.recipients!r}, hops={self.hops}, resent={self.resent}, "
            f"msgid={self.msgid!r}, eight_bit_headers={self.eight_bit_headers})"
        )


# ---------------------------------------------------------------------------
# Small formatters


def format_date(now: float, tz_offset: int) -> str:
    """RFC 5322 date-time: "Thu, 26 Nov 2026 01:30:00 +0000"."""
    t = time.gmtime(int(now) + tz_offset)
    off = abs(int(tz_offset)) // 60
    sign = "-" if tz_offset < 0 else "+"
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}"
    )


def make_msgid(now: float, qid: str, hostname: str) -> str:
    """sendmail's "<$t.$i@$j>": <YYYYMMDDhhmm.QID@hostname>, time in UTC."""
    t = time.gmtime(int(now))
    return (
        f"<{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}{t.tm_hour:02d}{t.tm_min:02d}"
        f".{qid}@{hostname}>"
    )


def _encoded_words(text: str) -> str:
    """RFC 2047 "B" encoded-words (utf-8), each at most 75 characters, split on characters."""
    from binascii import b2a_base64  # builtin module: cheap

    chunks: list[bytes] = []
    chunk = b""
    for c in text:
        b = c.encode("utf-8", "surrogateescape")
        if len(chunk) + len(b) > 45:  # 45 bytes -> 60 base64 chars -> a 72-character word
            chunks.append(chunk)
            chunk = b""
        chunk += b
    if chunk:
        chunks.append(chunk)
    return " ".join(
        "=?utf-8?B?" + b2a_base64(w, newline=False).decode("ascii") + "?=" for w in chunks
    )


def format_display_name(name: str) -> str:
    """A display name as it may stand before "<addr>": plain, quoted or RFC 2047 encoded."""
    if not name.isascii():
        return _encoded_words(name)
    if any(c in _NAME_SPECIALS for c in name) or name != name.strip():
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return name


def _msgid_of(value: str) -> str:
    """The "<...>" in a Message-ID value, or the value unfolded if it has none."""
    lt = value.find("<")
    gt = value.find(">", lt + 1) if lt >= 0 else -1
    if lt >= 0 and gt > lt:
        return " ".join(value[lt : gt + 1].split())
    return " ".join(value.split())


def _rewrite_addresses(field: Field, fix: Callable[[str], str | None]) -> Field:
    """Replace addresses in `field` for which `fix` returns a new text; keep every other byte."""
    value = field.value
    changes: list[tuple[int, int, str]] = []
    for found in parse_list(value):
        new = fix(found.addr)
        if new is not None and new != found.addr:
            changes.append((found.start, found.end, new))
    if not changes:
        return field
    parts: list[str] = []
    last = 0
    for start, end, new in changes:
        parts.append(value[last:start])
        parts.append(new)
        last = end
    parts.append(value[last:])
    return Field(field.name, field.head + "".join(parts))


def _header_recipient(addr: str, field: Field, domain: str) -> str:
    """A header address as an envelope recipient: unfolded, comments dropped, qualified."""
    clean = compact(addr).replace("\n", "").replace("\r", "")
    if any(ord(c) < 32 or ord(c) == 127 for c in clean):
        raise DataError(f"invalid address {clean!r} in {field.name}: contains a control character")
    if len(clean) > MAX_ADDRESS:
        raise DataError(f"invalid address in {field.name}: longer than {MAX_ADDRESS} characters")
    return qualify(clean, domain)


def _dedupe_key(addr: str) -> str:
    local, dom = split(addr)
    return f"{local}@{dom.lower()}"


# ---------------------------------------------------------------------------
# The rewrite


def rewrite(fields: list[Field], opts: Options, argv_recipients: list[str]) -> Result:
    """Apply sendmail 8.17's MSP header rules; see the module docstring and peers.md section 6.

    The input list is not modified. Raises DataError if an option or
    recipient would put CR, LF or NUL into a header or the envelope.
    """
    _check_options(opts, argv_recipients)
    names = [f.name.lower() for f in fields]
    present = frozenset(names)
    resent = any(name.startswith("resent-") for name in names)
    hops = names.count("received")
    # 1. Recipients: argv first, then (with -t) the header ones; first of duplicates wins.
    recipients, bare = _recipients(fields, names, opts, argv_recipients, resent)
    # 2. and 3. Bcc dropped or emptied; addresses qualified or masqueraded in place.
    out = _rewrite_fields(fields, names, opts, present, resent)
    # 4. The missing Date, From and Message-ID (Resent- variants for resent messages).
    date = format_date(opts.now, opts.tz_offset)
    added, msgid = _missing_fields(fields, names, opts, present, resent, date)
    # 5. Our trace field goes first.
    received = _received(opts, recipients, date)
    if opts.auth_warning:
        added.insert(0, _make("X-Authentication-Warning", opts.auth_warning))
    final = [received, *added, *out]
    eight_bit = any(not f.raw.isascii() for f in final)
    return Result(final, recipients, hops, resent, msgid, eight_bit, bare)


def _check_options(opts: Options, argv_recipients: list[str]) -> None:
    """DataError for an option or argv recipient that would break a header line."""
    for what, text in (
        ("domain", opts.domain),
        ("masquerade domain", opts.masquerade_as),
        ("sender", opts.sender),
        ("full name", opts.full_name),
        ("queue id", opts.qid),
        ("user name", opts.user),
        ("host name", opts.hostname),
    ):
        check_text(text, what)
    for rcpt in argv_recipients:
        check_text(rcpt, "recipient")


def _recipients(fields: list[Field], names: list[str], opts: Options,
                argv_recipients: list[str], resent: bool) -> tuple[list[str], frozenset[str]]:
    """argv's recipients, then (with -t) the header's; the first of duplicates wins.
    Also those of them that were typed without a domain."""
    recipients: list[str] = []
    seen: set[str] = set()
    bare: set[str] = set()
    domain = opts.domain

    def add(addr: str) -> None:
        key = _dedupe_key(addr)
        if addr and key not in seen:
            seen.add(key)
            recipients.append(addr)

    for rcpt in argv_recipients:
        add(qualify(rcpt, domain))
        if rcpt and not split(rcpt)[1]:
            bare.add(qualify(rcpt, domain))
    if opts.extract:
        wanted = _RESENT_RCPT_FIELDS if resent else _RCPT_FIELDS
        for field, name in zip(fields, names, strict=True):
            if name in wanted:
                for found in parse_list(field.value):
                    rcpt = _header_recipient(found.addr, field, domain)
                    add(rcpt)
                    if not split(compact(found.addr))[1]:
                        bare.add(rcpt)
    return recipients, frozenset(bare)


def _rewrite_fields(fields: list[Field], names: list[str], opts: Options,
                    present: frozenset[str], resent: bool) -> list[Field]:
    """Bcc deleted when a visible recipient field exists, else kept empty; addresses
    qualified (sender fields masqueraded) in place."""
    visible = bool(present & {"to", "cc", "apparently-to"}) or (
        resent and bool(present & {"resent-to", "resent-cc"})
    )
    out: list[Field] = []
    for field, name in zip(fields, names, strict=True):
        if name in _BCC:
            if not visible:
                out.append(Field(field.name, field.head))
            continue
        if name in _QUALIFY:
            if opts.generics and name in _SENDER_FIELDS:
                field = _rewrite_addresses(field, _generic_fixer(opts))
            elif opts.masquerade_as and name in _SENDER_FIELDS:
                field = _rewrite_addresses(field, _masquerader(opts))
            else:
                field = _rewrite_addresses(field, _qualifier(opts.domain))
        out.append(field)
    return out


def _missing_fields(fields: list[Field], names: list[str], opts: Options,
                    present: frozenset[str], resent: bool, date: str
                    ) -> tuple[list[Field], str]:
    """(the Date, From and Message-ID fields to add, the message's Message-ID)."""
    added: list[Field] = []
    date_name, id_name = ("Resent-Date", "Resent-Message-ID") if resent else ("Date", "Message-ID")
    if date_name.lower() not in present:
        added.append(_make(date_name, date))
    if "from" not in present:
        added.append(_make("From", _from_value(opts)))
    for field, name in zip(fields, names, strict=True):
        if name == id_name.lower():
            return added, _msgid_of(field.value)
    msgid = make_msgid(opts.now, opts.qid, opts.hostname)
    added.append(_make(id_name, msgid))
    return added, msgid


def _received(opts: Options, recipients: list[str], date: str) -> Field:
    """Our trace field: sendmail's SMTP form for the listener, its local form for argv."""
    for_clause = f"\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    if opts.received_from:
        trace = (f"from {opts.received_from}\n\tby {opts.hostname} (relayq) with ESMTP "
                 f"id {opts.qid}")
    else:
        trace = f"(from {opts.user}@localhost)\n\tby {opts.hostname} (relayq) id {opts.qid}"
    return _make("Received", f"{trace}{for_clause}; {date}")


def _make(name: str, value: str) -> Field:
    """A new field; its value may only fold with our own "\\n\\t" (DataError otherwise)."""
    check_text(value.replace("\n\t", " "), name)
    return Field(name, f"{name}: {value}")


def _from_value(opts: Options) -> str:
    sender = opts.sender or f"MAILER-DAEMON@{opts.domain}"
    name = opts.full_name.strip()
    if not name:
        return sender
    return f"{format_display_name(name)} <{sender}>"


def _qualifier(domain: str) -> Callable[[str], str | None]:
    def fix(addr: str) -> str | None:
        if split(addr)[1]:
            return None
        return qualify(compact(addr), domain)

    return fix


def _masquerader(opts: Options) -> Callable[[str], str | None]:
    local_domains = opts.local_domains
    masquerade_as = opts.masquerade_as

    def fix(addr: str) -> str | None:
        local, dom = split(addr)
        if dom and dom.lower().rstrip(".") not in local_domains:
            return None
        return f"{compact(local)}@{masquerade_as}"

    return fix


def _generic_fixer(opts: Options) -> Callable[[str], str | None]:
    """A sender field's address through the generics map, else masqueraded or qualified."""
    other = _masquerader(opts) if opts.masquerade_as else _qualifier(opts.domain)

    def fix(addr: str) -> str | None:
        mapped = generic(compact(addr), opts.generics, opts.generics_domains, opts.domain)
        return mapped if mapped is not None else other(addr)

    return fix
