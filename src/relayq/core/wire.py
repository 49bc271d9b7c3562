"""What a stored message must look like on the wire for one relay: 7-bit and short lines.

A relay without 8BITMIME may only be sent 7-bit data (RFC 6152), and no relay
has to take a line over 998 octets (RFC 5321 4.5.3.1.6; Exim 4.95 refuses
them). Like Postfix, relayq converts instead of refusing: a leaf MIME part
that holds 8-bit data or long lines is re-encoded as quoted-printable (its
decoded bytes are the original), a long header line is folded at white
space, 8-bit header text gets RFC 2047 encoded-words (RFC 2231 for MIME
parameters), a multipart or message/rfc822 container labelled 8bit is
relabelled 7bit. Where re-encoding is not allowed (inside multipart/signed,
a base64 or unknown encoding, message/partial) a long line is broken with
CRLF SP, as Postfix's smtp_line_length_limit does, and 8-bit data there
cannot be made 7-bit: inside an attached message/rfc822 the attachment is
relabelled message/global and quoted-printable encoded whole (RFC 6532 3.5
allows it, the bytes are kept); at the top level the message is refused.

Pure and streaming (layer 0): `plan()` reads the seekable stored file (LF
line ends) once to decide, `stream()` reads it again and yields the bytes to
hand to the SMTP client; both read it through relayq.core.mimescan (memory
bounded whatever the message size), header fields are rewritten by
relayq.core.header7bit. `needs_change()` is the cheap fast path: a message
that is already fit for the relay is sent untouched.
"""

from __future__ import annotations

import binascii
import codecs
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, cast

from relayq.core.header7bit import encode_field, fold
from relayq.core.mimescan import (
    BODY,
    DELIM,
    ENDHEAD,
    FIELD,
    FILL,
    LIMIT,
    PLAIN_CTE,
    RAWHEAD,
    WSP,
    Line,
    Part,
    events,
    needs_change,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["LIMIT", "Plan", "encode_field", "fold", "needs_change", "plan", "stream",
           "wire_reader"]

QP_BLOCK = 64 * 1024
HIGH = bytes(range(128, 256))

# actions for a leaf part's body
NONE, QP, REQP, WRAP, HARD, IMPOSSIBLE = "none", "qp", "reqp", "wrap", "hard", "impossible"
UNCHANGEABLE = ("message/partial", "message/external-body")


# --- the plan ---------------------------------------------------------------------


@dataclass
class Plan:
    """What to change for one relay; `changed` False: send the stored bytes as they are."""

    changed: bool = False
    seven: bool = False  # the output must be 7-bit
    size: int = 0  # estimated octets of the converted message (for SIZE=)
    refusal: str = ""  # why it cannot be sent to this relay at all ("" = it can)
    refusal_code: str = "5.6.3"  # 5.6.7: only SMTPUTF8 could carry it
    actions: dict[int, str] = field(default_factory=dict)  # leaf part -> NONE/QP/...
    relabel: set[int] = field(default_factory=set)  # containers: CTE 8bit -> 7bit
    globals: set[int] = field(default_factory=set)  # message/rfc822 -> message/global QP
    charset: dict[int, str] = field(default_factory=dict)  # parts given a Content-Type
    encode_heads: set[int] = field(default_factory=set)  # parts whose 8-bit fields get RFC 2047



def header_8bit(data: BinaryIO) -> bool:
    """Does the message's own header (not a part's) hold 8-bit octets? Only then, or
    for a non-ASCII envelope, does it need SMTPUTF8 (RFC 6531 3.4); `data` is left at 0."""
    data.seek(0)
    try:
        for line in data:
            if line in (b"\n", b"\r\n"):
                return False
            if not line.isascii():
                return True
        return False
    finally:
        data.seek(0)


def plan(data: BinaryIO, *, eightbit: bool, utf8_headers: bool = True, size: int = 0) -> Plan:
    """Decide how the stored message must change for a relay.

    `eightbit`: the relay offers 8BITMIME. `utf8_headers`: the message's own
    header may stay 8-bit (the relay offers SMTPUTF8, or the message never
    asked for it); if not, its 8-bit fields must have an exact 7-bit form.
    """
    if utf8_headers and not needs_change(data, eightbit=eightbit):
        return Plan(size=size)
    seven = not eightbit
    out = Plan(changed=True, seven=seven, size=size)
    trouble: list[tuple[Part, str]] = []  # (part, why it cannot be sent as it is)
    grow = 0
    for p in _survey(data).values():
        if p.head8 and p.parent is None and (seven or not utf8_headers):
            why = ("an 8-bit header field too large to encode" if p.huge8 else
                   f"8-bit data in the {p.inexact} header field has no exact 7-bit form"
                   if p.inexact else "")
            if why:
                out.refusal = why
                out.refusal_code = "5.6.3" if utf8_headers else "5.6.7"
                return out
            out.encode_heads.add(p.idx)
            grow += 400
        elif p.head8 and seven:
            why = _head_trouble(p)
            if why:
                trouble.append((p, why))
            else:
                out.encode_heads.add(p.idx)
                grow += 200
        grow += _body_rule(p, seven, out, trouble)
    for p, why in trouble:
        holder = _global_holder(p)
        if holder is None:
            out.refusal = why
            return out
        if holder.idx not in out.globals:
            out.globals.add(holder.idx)
            grow += 2 * holder.total_high + 3 * (holder.total + 2 * holder.total_high) // 73 + 60
    out.size = size + grow
    return out


def _survey(data: BinaryIO) -> dict[int, Part]:
    """Every part of the message with what its scan found, and the totals of its contents."""
    parts: dict[int, Part] = {}
    col = 0  # octets so far of a line that comes in pieces
    for ev in events(data):
        p = ev.part
        parts[p.idx] = p
        if ev.kind == FIELD and p.parent is None and not p.inexact:
            text = b"".join(line + b"\n" if nl else line for line, nl in ev.lines)
            if not text.isascii() and encode_field(text, strict=True) is None:
                p.inexact = ev.lines[0][0].split(b":", 1)[0].strip().decode("ascii", "replace")
        if ev.kind in (BODY, FILL, DELIM):
            col = _count_body(p, ev.kind, ev.lines, col)
    for p in parts.values():
        p.decoder = None
        q: Part | None = p
        while q is not None:
            q.total += p.nbytes + 100
            q.total_high += p.nhigh
            q = q.parent
    return parts


def _count_body(p: Part, kind: str, lines: list[Line], col: int) -> int:
    """Note body lines in their part; returns `col` after them (see _survey)."""
    texts = [line for line, _ in lines]
    joined = b"\n".join(texts)
    p.nbytes += len(joined) + 1
    if col + len(texts[0]) > LIMIT or max(map(len, texts)) > LIMIT:
        p.long = True
    if lines[-1][1]:
        col = 0
    else:  # pieces of an unfinished line: only at the end of a list
        k = len(lines)
        while k > 0 and not lines[k - 1][1]:
            k -= 1
        col = (col if k == 0 else 0) + sum(map(len, texts[k:]))
        if col > LIMIT:
            p.long = True
    if not joined.isascii():
        p.eight = True
        p.nhigh += len(joined) - len(joined.translate(None, HIGH))
        if kind == BODY and not p.ctype and p.utf8:
            if p.decoder is None:
                p.decoder = codecs.getincrementaldecoder("utf-8")()
            try:
                p.decoder.decode(_raw(lines))
            except UnicodeDecodeError:
                p.utf8 = False
    return col


def _head_trouble(p: Part) -> str:
    """Why the 8-bit header of a part inside the message cannot be encoded ("": it can)."""
    if p.huge8:
        return "an 8-bit header field too large to encode"
    if p.signed:
        return "8-bit header data inside a multipart/signed part"
    if p.root and p.parent is not None:
        return "8-bit header data in an attached message"
    return ""


def _body_rule(p: Part, seven: bool, out: Plan, trouble: list[tuple[Part, str]]) -> int:
    """Decide what to do with a part's body (into `out` or `trouble`); returns the growth."""
    if p.container:
        if seven and p.cte in ("8bit", "binary"):
            out.relabel.add(p.idx)
        if p.eight and seven:
            trouble.append((p, "8-bit data outside the MIME parts"))
        if p.long:
            out.actions[p.idx] = HARD
            return 2 * (p.nbytes // LIMIT + 1)
        return 0
    act = _leaf_action(p, seven)
    if act == IMPOSSIBLE:
        trouble.append((p, _why(p)))
        return 0
    if act != NONE:
        out.actions[p.idx] = act
    if act in (QP, REQP):
        grow = 2 * p.nhigh + 3 * (p.nbytes + 2 * p.nhigh) // 73 + 60
        if not p.ctype and act == QP:
            out.charset[p.idx] = ("us-ascii" if not p.nhigh else
                                  "utf-8" if p.utf8 else "unknown-8bit")
            grow += 60
        return grow
    if act in (HARD, WRAP):
        return 2 * (p.nbytes // 76 + 1)
    return 0


def _leaf_action(p: Part, seven: bool) -> str:
    need8 = seven and p.eight
    if not (need8 or p.long):
        return NONE
    cte = p.cte
    if p.signed:
        return IMPOSSIBLE if need8 else HARD
    if cte in PLAIN_CTE:
        if p.kind in UNCHANGEABLE:
            return IMPOSSIBLE if need8 else HARD
        return QP
    if cte == "quoted-printable":
        return REQP
    if cte == "base64":
        return IMPOSSIBLE if need8 else WRAP
    return IMPOSSIBLE if need8 else HARD


def _why(p: Part) -> str:
    if p.signed:
        return "8-bit data inside a multipart/signed part (converting would break the signature)"
    if p.kind in UNCHANGEABLE:
        return f"8-bit data in a {p.kind} part"
    return f"8-bit data in a part encoded as {p.cte!r}"


def _global_holder(p: Part) -> Part | None:
    """The outermost attached message/rfc822 that can carry `p` as message/global, if any."""
    best = None
    q: Part | None = p
    while q is not None:
        if q.root and q.parent is not None and not q.parent.signed:
            best = q.parent
        q = q.parent
    return best


# --- the converted stream ---------------------------------------------------------


class _QPEncoder:
    """Quoted-printable in bounded memory: whole lines in blocks, long lines with soft breaks."""

    def __init__(self) -> None:
        self.buf: list[bytes] = []
        self.size = 0

    def feed(self, line: bytes, nl: bool) -> bytes:
        if nl:
            self.buf.append(line)
            self.buf.append(b"\n")
            self.size += len(line) + 1
            if self.size < QP_BLOCK:
                return b""
            return self.flush()
        self.buf.append(line)
        return self.flush() + b"=\n"

    def feed_block(self, block: bytes) -> bytes:
        """Whole lines, each ending in LF."""
        self.buf.append(block)
        self.size += len(block)
        return self.flush() if self.size >= QP_BLOCK else b""

    def flush(self) -> bytes:
        if not self.buf:
            return b""
        data = b"".join(self.buf)
        self.buf, self.size = [], 0
        return binascii.b2a_qp(data, istext=True)


class _Breaker:
    """Break lines at `width` octets with `sep`, counting across pieces of one line."""

    def __init__(self, width: int, sep: bytes) -> None:
        self.width, self.sep, self.col = width, sep, 0

    def feed(self, line: bytes, nl: bool) -> bytes:
        out: list[bytes] = []
        while self.col + len(line) > self.width:
            cut, sep = self.width - self.col, self.sep
            if self.col == 0 and line[:2] == b"--":
                # "--b" and white space would be a new MIME delimiter: break after one "-"
                cut, sep = 1, b"\n "
            out.append(line[:cut])
            out.append(sep)
            line = line[cut:]
            self.col = len(sep) - 1
        out.append(line)
        self.col += len(line)
        if nl:
            out.append(b"\n")
            self.col = 0
        return b"".join(out)


class _QPRecoder:
    """Decode a quoted-printable part line by line and encode it again, cleanly."""

    def __init__(self) -> None:
        self.enc = _QPEncoder()
        self.carry = b""

    def feed(self, line: bytes, nl: bool) -> bytes:
        line = self.carry + line
        self.carry = b""
        if not nl:  # keep an escape that may be split by the piece boundary
            k = line.rfind(b"=", max(0, len(line) - 2))
            if k >= 0:
                line, self.carry = line[:k], line[k:]
            return self.enc.feed(binascii.a2b_qp(line), False)
        body = line.rstrip(WSP)
        if body.endswith(b"="):
            return self.enc.feed(binascii.a2b_qp(body[:-1]), False)
        return self.enc.feed(binascii.a2b_qp(line), True)

    def flush(self) -> bytes:
        tail = b""
        if self.carry:
            tail = self.enc.feed(binascii.a2b_qp(self.carry), False)
            self.carry = b""
        return tail + self.enc.flush()


def stream(data: BinaryIO, p: Plan) -> Iterator[bytes]:
    """The converted message (LF line ends) in blocks of about QP_BLOCK octets."""
    out: list[bytes] = []
    size = 0
    coder: _QPEncoder | _QPRecoder | _Breaker | None = None  # for the current leaf's body
    coder_part: Part | None = None
    raw_root: Part | None = None  # a message/global conversion: everything inside is QP
    raw = _QPEncoder()
    brk = _Breaker(LIMIT, b"\n ")  # lines that cannot be re-encoded

    def inside(part: Part, anc: Part) -> bool:
        q: Part | None = part.parent
        while q is not None:
            if q is anc:
                return True
            q = q.parent
        return False

    for ev in events(data):
        part, kind = ev.part, ev.kind
        if raw_root is not None and inside(part, raw_root):
            chunk = b"".join(raw.feed(line, nl) for line, nl in ev.lines)
        else:
            chunk = b""
            if raw_root is not None:
                _add(out, raw.flush())
                raw_root = None
            if coder is not None and (coder_part is not part or kind != BODY):
                if not isinstance(coder, _Breaker):
                    _add(out, coder.flush())
                coder = coder_part = None
            if kind == FIELD:
                chunk = _field(part, ev.lines, p)
            elif kind == ENDHEAD:
                chunk = _endhead(part, ev.lines, p)
                act = p.actions.get(part.idx, NONE)
                if part.idx in p.globals:
                    raw_root = part
                elif part.container:
                    pass
                elif act == QP:
                    coder = _QPEncoder()
                elif act == REQP:
                    coder = _QPRecoder()
                elif act == WRAP:
                    coder = _Breaker(76, b"\n")
                elif act == HARD:
                    coder = _Breaker(LIMIT, b"\n ")
                coder_part = part if coder is not None else None
            elif kind == BODY and isinstance(coder, _QPEncoder) and ev.lines[-1][1]:
                chunk = coder.feed_block(_raw(ev.lines))
            elif kind == BODY and coder is not None:
                chunk = b"".join(coder.feed(line, nl) for line, nl in ev.lines)
            elif kind in (RAWHEAD, DELIM) or (kind == FILL and p.actions.get(part.idx) == HARD):
                chunk = b"".join(brk.feed(line, nl) for line, nl in ev.lines)
            else:  # BODY or FILL as they are
                chunk = _raw(ev.lines)
        if chunk:
            out.append(chunk)
            size += len(chunk)
            if size >= QP_BLOCK:
                yield b"".join(out)
                out.clear()
                size = 0
    if raw_root is not None:
        _add(out, raw.flush())
    if coder is not None and not isinstance(coder, _Breaker):
        _add(out, coder.flush())
    if out:
        yield b"".join(out)


def _raw(lines: list[Line]) -> bytes:
    """The bytes of one event's lines as stored."""
    if lines[-1][1]:  # whole lines only (pieces come last in a list)
        return b"\n".join([line for line, _ in lines]) + b"\n"
    return b"".join(line + b"\n" if nl else line for line, nl in lines)


def _add(out: list[bytes], chunk: bytes) -> None:
    if chunk:
        out.append(chunk)


def _field_name(lines: list[Line]) -> bytes:
    return lines[0][0].split(b":", 1)[0].strip().lower()


def _field(part: Part, lines: list[Line], p: Plan) -> bytes:
    name = _field_name(lines)
    i = part.idx
    changes_cte = i in p.globals or i in p.relabel or p.actions.get(i) in (QP,)
    if name == b"content-transfer-encoding" and changes_cte:
        return b""
    if name == b"content-type" and i in p.globals:
        return b"Content-Type: message/global\n"
    text = b"".join(line + b"\n" if nl else line for line, nl in lines)
    if i in p.encode_heads and not text.isascii():  # plan() checked the strict form exists
        return fold(encode_field(text, strict=part.parent is None) or b"", 78) + b"\n"
    if len(text) > LIMIT and any(len(x) > LIMIT for x in text.split(b"\n")):
        return b"\n".join(fold(x) for x in text.split(b"\n"))
    return text


def _endhead(part: Part, lines: list[Line], p: Plan) -> bytes:
    i = part.idx
    add: list[bytes] = []
    act = p.actions.get(i)
    if i in p.globals:
        if not part.ctype:
            add.append(b"Content-Type: message/global\n")
        add.append(b"Content-Transfer-Encoding: quoted-printable\n")
    elif i in p.relabel:
        add.append(b"Content-Transfer-Encoding: 7bit\n")
    elif act == QP:
        if i in p.charset:
            if part.root and not part.mime_version:
                add.append(b"MIME-Version: 1.0\n")
            add.append(b"Content-Type: text/plain; charset=" + p.charset[i].encode() + b"\n")
        add.append(b"Content-Transfer-Encoding: quoted-printable\n")
    sep = b"".join(line + b"\n" if nl else line for line, nl in lines)
    if add and not sep:
        sep = b"\n"  # the original ended its header block without a blank line
    return b"".join(add) + sep


class Reader:
    """A file-like view of `stream()` for SmtpClient.send_data (read() until b"")."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, n: int = -1) -> bytes:
        for chunk in self._chunks:
            if chunk:
                return chunk
        return b""


def wire_reader(data: BinaryIO, p: Plan) -> BinaryIO:
    """What to stream for plan `p`: the stored file itself, or its conversion."""
    data.seek(0)
    if not p.changed:
        return data
    return cast("BinaryIO", Reader(stream(data, p)))  # send_data only calls read()
