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
hand to the SMTP client; memory is bounded by PIECE and FIELD_CAP whatever
the message size. `needs_change()` is the cheap fast path: a message that is
already fit for the relay is sent untouched.
"""

from __future__ import annotations

import binascii
import codecs
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, cast

if TYPE_CHECKING:
    from collections.abc import Iterator

LIMIT = 998  # octets per line, without the CRLF
READ = 256 * 1024
PIECE = 64 * 1024  # a longer line is handled in pieces of this size
FIELD_CAP = 256 * 1024  # a header field kept whole up to this size
QP_BLOCK = 64 * 1024
HIGH = bytes(range(128, 256))
WSP = b" \t"

# actions for a leaf part's body
NONE, QP, REQP, WRAP, HARD, IMPOSSIBLE = "none", "qp", "reqp", "wrap", "hard", "impossible"
PLAIN_CTE = ("", "7bit", "8bit", "binary")
UNCHANGEABLE = ("message/partial", "message/external-body")


# --- the cheap check ------------------------------------------------------------


def needs_change(data: BinaryIO, *, eightbit: bool) -> bool:
    """True if the stored message has a line over LIMIT, or 8-bit data and not `eightbit`.

    One read of the file with C-speed bytes methods per block; nothing kept.
    """
    data.seek(0)
    run = 0  # length of the unfinished line carried from the previous block
    while True:
        block = data.read(READ)
        if not block:
            break
        if not eightbit and not block.isascii():
            return True
        first = block.find(b"\n")
        if first < 0:
            run += len(block)
            if run > LIMIT:
                return True
            continue
        if run + first > LIMIT:
            return True
        last = block.rfind(b"\n")
        if last > first and _long_inside(block, first, last):
            return True
        run = len(block) - last - 1
        if run > LIMIT:
            return True
    return False


def _long_inside(block: bytes, first: int, last: int) -> bool:
    """A line over LIMIT between the LFs at `first` and `last`?

    If every stretch of LIMIT // 2 octets holds a LF, no line can be longer
    than LIMIT: one find() per 499 octets instead of an object per line.
    """
    width = LIMIT // 2
    k = first + 1
    while k < last:
        if block.find(b"\n", k, min(k + width, last + 1)) < 0:
            a = block.rfind(b"\n", first, k) + 1
            b = block.find(b"\n", k, last + 1)
            if b - a > LIMIT:
                return True
            k = b + 1
            continue
        k += width
    return False


# --- parsing into events --------------------------------------------------------


@dataclass(eq=False)
class Part:
    """One MIME entity, numbered in document order (the same in both passes)."""

    idx: int
    parent: Part | None
    root: bool  # a message's top: the whole message, or the body of a message/rfc822
    signed: bool  # inside a multipart/signed: no byte may change
    ctype: str = ""  # "" = none given (text/plain, or message/rfc822 in a digest)
    cte: str = ""
    boundary: bytes = b""
    mime_version: bool = False
    container: bool = False  # multipart with a boundary, or message/rfc822
    # what the scan found
    eight: bool = False  # 8-bit bytes in the body (for a multipart: preamble/epilogue)
    long: bool = False  # a body line over LIMIT
    head8: bool = False  # 8-bit bytes in a header field
    huge8: bool = False  # 8-bit bytes in a header field too big to rewrite
    inexact: str = ""  # a field of the message's own header with no exact 7-bit form
    nbytes: int = 0
    nhigh: int = 0
    total: int = 0  # nbytes of this part and everything inside it (headers roughly)
    total_high: int = 0
    utf8: bool = True
    decoder: codecs.IncrementalDecoder | None = None

    @property
    def kind(self) -> str:
        if self.ctype:
            return self.ctype
        if self.parent is not None and self.parent.ctype == "multipart/digest":
            return "message/rfc822"
        return "text/plain"


FIELD, ENDHEAD, BODY, FILL, DELIM, RAWHEAD = "field", "endhead", "body", "fill", "delim", "rawhead"
Line = tuple[bytes, bool]  # (bytes without LF, had an LF)


def _blocks(data: BinaryIO) -> Iterator[list[Line]]:
    """The file as lists of lines without their LF, one list per read.

    A line longer than PIECE comes in pieces (had_lf False but the last);
    within one list such pieces only come after the whole lines.
    """
    data.seek(0)
    carry = b""
    while True:
        block = data.read(READ)
        if not block:
            break
        if carry:
            block = carry + block
        lines = block.split(b"\n")
        carry = lines.pop()
        out = [(line, True) for line in lines]
        while len(carry) > PIECE:
            out.append((carry[:PIECE], False))
            carry = carry[PIECE:]
        if out:
            yield out
    if carry:
        yield [(carry, False)]


_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_NAME_START = re.compile(rb"[!-9;-~]+[ \t]*")  # a field name cut by a piece boundary
_PARAM = re.compile(rb';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.S)


def _note_field(part: Part, lines: list[Line]) -> None:
    raw = b"".join(line for line, _ in lines)
    if not raw.isascii():
        part.head8 = True
    name, _, value = raw.partition(b":")
    key = name.strip().lower()
    if key == b"content-type":
        v = value.strip()
        t = v.split(b";", 1)[0].strip().lower()
        part.ctype = t.decode("ascii", "replace")
        for m in _PARAM.finditer(v):
            if m.group(1).lower() == b"boundary":
                b = m.group(2)
                if b.startswith(b'"'):
                    b = re.sub(rb"\\(.)", rb"\1", b[1:-1])
                part.boundary = b
    elif key == b"content-transfer-encoding":
        part.cte = value.strip().lower().decode("ascii", "replace")
    elif key == b"mime-version":
        part.mime_version = True


def _boundary_hit(stack: list[Part], line: bytes) -> tuple[int, bool] | None:
    for i in range(len(stack) - 1, -1, -1):
        b = stack[i].boundary
        if line.startswith(b, 2):
            rest = line[2 + len(b):].rstrip(WSP)
            if rest == b"":
                return i, False
            if rest == b"--":
                return i, True
    return None


class Event:
    __slots__ = ("kind", "lines", "part")

    def __init__(self, kind: str, part: Part, lines: list[Line]) -> None:
        self.kind, self.part, self.lines = kind, part, lines


def events(data: BinaryIO) -> Iterator[Event]:
    """The stored message as header fields, header ends, body lines and delimiters."""
    count = 0

    def new(parent: Part | None, root: bool) -> Part:
        nonlocal count
        signed = parent is not None and (parent.signed or parent.kind == "multipart/signed")
        p = Part(count, parent, root, signed)
        count += 1
        return p

    cur = new(None, True)
    stack: list[Part] = []  # open multiparts, outermost first
    state = FIELD  # FIELD (in a header block), BODY, FILL
    fld: list[Line] = []
    fsize = 0
    huge = False  # the current field outgrew FIELD_CAP: its rest goes as RAWHEAD
    bol = True  # this piece starts a line

    def begin_body(p: Part) -> tuple[Part, str]:
        k = p.kind
        if k.startswith("multipart/") and p.boundary and p.cte in PLAIN_CTE:
            p.container = True
            stack.append(p)
            return p, FILL
        if k in ("message/rfc822", "message/news") and p.cte in PLAIN_CTE:
            p.container = True
            return new(p, True), FIELD
        return p, BODY

    for block in _blocks(data):
        i, n = 0, len(block)
        while i < n:
            if state != FIELD:  # body lines in bulk, up to the next delimiter
                j = n
                if stack:
                    for j in range(i, n):
                        line, nl = block[j]
                        if (nl and line[:2] == b"--" and (block[j - 1][1] if j > i else bol)
                                and _boundary_hit(stack, line) is not None):
                            break
                    else:
                        j = n
                if j > i:
                    yield Event(state, cur, block[i:j])
                    bol = block[j - 1][1]
                    i = j
                    if i == n:
                        break
            line, nl = block[i]
            i += 1
            start, bol = bol, nl
            if stack and start and nl and line[:2] == b"--":
                hit = _boundary_hit(stack, line)
                if hit is not None:
                    if state == FIELD:
                        if fld:
                            _note_field(cur, fld)
                            yield Event(FIELD, cur, fld)
                            fld = []
                        yield Event(ENDHEAD, cur, [])
                    k, closing = hit
                    mp = stack[k]
                    del stack[k + 1:]
                    yield Event(DELIM, mp, [(line, nl)])
                    if closing:
                        stack.pop()
                        cur, state = mp, FILL
                    else:
                        cur, state = new(mp, False), FIELD
                    huge = False
                    continue
            if state == FIELD:
                if not start or ((fld or huge) and line[:1] in (b" ", b"\t")):
                    if huge:
                        yield Event(RAWHEAD, cur, [(line, nl)])
                        if not line.isascii():
                            cur.huge8 = True
                        continue
                    fld.append((line, nl))
                    fsize += len(line)
                    if fsize > FIELD_CAP:
                        _note_field(cur, fld)
                        if cur.head8:
                            cur.huge8 = True
                        yield Event(RAWHEAD, cur, fld)
                        fld, huge = [], True
                    continue
                huge = False
                if fld:
                    _note_field(cur, fld)
                    yield Event(FIELD, cur, fld)
                    fld = []
                if line == b"" and nl:
                    yield Event(ENDHEAD, cur, [(line, nl)])
                    cur, state = begin_body(cur)
                    continue
                if _NAME.match(line) or (not nl and _NAME_START.fullmatch(line)):
                    fld, fsize = [(line, nl)], len(line)
                    continue
                yield Event(ENDHEAD, cur, [])
                cur, state = begin_body(cur)
                if state == FIELD:  # a message/rfc822 body that starts with a non-header line
                    yield Event(ENDHEAD, cur, [])
                    cur, state = begin_body(cur)
            yield Event(state, cur, [(line, nl)])
    if state == FIELD:
        if fld:
            _note_field(cur, fld)
            yield Event(FIELD, cur, fld)
        yield Event(ENDHEAD, cur, [])


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


def plan(data: BinaryIO, *, eightbit: bool, utf8_headers: bool = True, size: int = 0) -> Plan:
    """Decide how the stored message must change for a relay.

    `eightbit`: the relay offers 8BITMIME. `utf8_headers`: the message's own
    header may stay 8-bit (the relay offers SMTPUTF8, or the message never
    asked for it); if not, its 8-bit fields must have an exact 7-bit form.
    """
    if utf8_headers and not needs_change(data, eightbit=eightbit):
        return Plan(size=size)
    seven = not eightbit
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
            lines = ev.lines
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
                if ev.kind == BODY and not p.ctype and p.utf8:
                    if p.decoder is None:
                        p.decoder = codecs.getincrementaldecoder("utf-8")()
                    try:
                        p.decoder.decode(_raw(lines))
                    except UnicodeDecodeError:
                        p.utf8 = False
    out = Plan(changed=True, seven=seven, size=size)
    trouble: list[tuple[Part, str]] = []
    grow = 0
    for p in parts.values():
        p.decoder = None
        q: Part | None = p
        while q is not None:
            q.total += p.nbytes + 100
            q.total_high += p.nhigh
            q = q.parent
    for p in parts.values():
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
            if p.huge8:
                trouble.append((p, "an 8-bit header field too large to encode"))
            elif p.signed:
                trouble.append((p, "8-bit header data inside a multipart/signed part"))
            elif p.root and p.parent is not None:
                trouble.append((p, "8-bit header data in an attached message"))
            else:
                out.encode_heads.add(p.idx)
                grow += 200
        if p.container:
            if seven and p.cte in ("8bit", "binary"):
                out.relabel.add(p.idx)
            if p.eight and seven:
                trouble.append((p, "8-bit data outside the MIME parts"))
            if p.long:
                out.actions[p.idx] = HARD
                grow += 2 * (p.nbytes // LIMIT + 1)
            continue
        act = _leaf_action(p, seven)
        if act == IMPOSSIBLE:
            trouble.append((p, _why(p)))
            continue
        if act != NONE:
            out.actions[p.idx] = act
        if act in (QP, REQP):
            grow += 2 * p.nhigh + 3 * (p.nbytes + 2 * p.nhigh) // 73 + 60
            if not p.ctype and act == QP:
                out.charset[p.idx] = ("us-ascii" if not p.nhigh else
                                      "utf-8" if p.utf8 else "unknown-8bit")
                grow += 60
        elif act in (HARD, WRAP):
            grow += 2 * (p.nbytes // 76 + 1)
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


# --- headers ------------------------------------------------------------------------


def fold(line: bytes, width: int = LIMIT) -> bytes:
    """Fold one physical header line to lines of at most `width` octets, at white space.

    Unfolding (removing the inserted LFs) gives the line back exactly. Where a
    stretch has no white space to fold at, a LF and a space are inserted (one
    space more after unfolding): Postfix's choice, the least damage that still
    reaches a relay that enforces the limit.
    """
    if len(line) <= width:
        return line
    out: list[bytes] = []
    rest = line
    while len(rest) > width:
        cut = max(rest.rfind(b" ", 1, width + 1), rest.rfind(b"\t", 1, width + 1))
        if cut > 0 and rest[:cut].strip(WSP):
            out.append(rest[:cut])
            rest = rest[cut:]
        else:
            out.append(rest[:width])
            rest = b" " + rest[width:]
    out.append(rest)
    return b"\n".join(out)


_WORD = re.compile(rb"[ \t\n]+|[^ \t\n]+")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")


ADDRESS_FIELDS = frozenset((
    b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc", b"resent-from", b"resent-sender",
    b"resent-reply-to", b"resent-to", b"resent-cc", b"resent-bcc", b"mail-followup-to",
    b"mail-reply-to", b"disposition-notification-to"))
UNSTRUCTURED = frozenset((b"subject", b"comments", b"content-description", b"organization",
                          b"thread-topic", b"user-agent", b"x-mailer"))
MIME_PARAMS = frozenset((b"content-type", b"content-disposition"))
_QTOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[ \t\n]+|[^ \t\n"]+|"')
_SPECIALS = frozenset(b'@<>[]\\",;:()')


def encode_field(text: bytes, strict: bool = False) -> bytes | None:
    """A header field with 8-bit bytes -> 7-bit: RFC 2231 for MIME parameters, else RFC 2047.

    `text` may be folded (LFs before white space); the result is one unfolded
    line for `fold` to fold again. `strict` (a message's own header, which
    SMTPUTF8 would have carried as it is): None unless the decoded text is
    exactly the original, i.e. the 8-bit text is only in unstructured text,
    display names, quoted strings of a phrase or comments, never in an
    address, a message id or a trace field.
    """
    raw = text.replace(b"\n", b"")
    name, colon, value = raw.partition(b":")
    try:
        value.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "unknown-8bit"
    key = name.strip().lower()
    if key in MIME_PARAMS:
        value = _PARAM.sub(lambda m: _rfc2231(m, charset), value)
        if value.isascii():
            return name + colon + value
    address = key in ADDRESS_FIELDS
    if strict and not address and key not in UNSTRUCTURED and not key.startswith(b"x-"):
        return None  # Message-ID, References, Received, DKIM-Signature, ...: not text
    words = (_QTOKEN if address else _WORD).findall(value)
    out: list[bytes] = []
    i = 0
    while i < len(words):
        if words[i].isascii():
            out.append(words[i])
            i += 1
            continue
        j = i  # extend over white space to the next 8-bit word
        while j + 2 < len(words) and not words[j + 2].isascii() and not words[j + 1].strip(b" \t"):
            j += 2
        run = words[i:j + 1]
        lead = trail = b""
        if address:  # a phrase: quoted strings lose their quotes, comments keep their ()
            run = [re.sub(rb"\\(.)", rb"\1", w[1:-1]) if w[:1] == b'"' and len(w) > 1 else w
                   for w in run]
            if words[i][:1] != b'"':
                lead = run[0][:len(run[0]) - len(run[0].lstrip(b"("))]
                run[0] = run[0][len(lead):]
            if words[j][:1] != b'"':
                trail = run[-1][len(run[-1].rstrip(b"),;:")):]
                run[-1] = run[-1][:len(run[-1]) - len(trail)]
            core = b"".join(w for w, orig in zip(run, words[i:j + 1], strict=True)
                            if orig[:1] != b'"')
            if strict and any(c in _SPECIALS for c in core):
                return None
        elif strict and key.startswith(b"x-") and any(b"@" in w for w in run):
            return None  # maybe an address in an X- field
        out.append(lead + _encoded_words(b"".join(run), charset) + trail)
        i = j + 1
    return name + colon + b"".join(out)


def _rfc2231(m: re.Match[bytes], charset: str) -> bytes:
    whole, pname, pvalue = m.group(0), m.group(1), m.group(2)
    if pvalue.isascii():
        return whole
    if pvalue.startswith(b'"') and pvalue.endswith(b'"') and len(pvalue) >= 2:
        pvalue = re.sub(rb"\\(.)", rb"\1", pvalue[1:-1])
    enc = "".join(chr(b) if b in _SAFE or b in b"._~" else f"%{b:02X}" for b in pvalue)
    return b"; " + pname + b"*=" + charset.encode() + b"''" + enc.encode("ascii")


def _encoded_words(text: bytes, charset: str) -> bytes:
    """RFC 2047 Q encoded-words of at most 75 octets, split between characters."""
    prefix = f"=?{charset}?q?".encode()
    room = 75 - len(prefix) - 2
    words: list[bytes] = []
    cur: list[bytes] = []
    used = 0
    i = 0
    while i < len(text):
        b = text[i]
        n = 1
        if charset == "utf-8" and b >= 0xC0:  # keep a UTF-8 sequence in one word
            while i + n < len(text) and 0x80 <= text[i + n] < 0xC0 and n < 4:
                n += 1
        seq = text[i:i + n]
        enc = b"".join(bytes([c]) if c in _SAFE else b"_" if c == 0x20 else
                       f"={c:02X}".encode() for c in seq)
        if used + len(enc) > room and cur:
            words.append(prefix + b"".join(cur) + b"?=")
            cur, used = [], 0
        cur.append(enc)
        used += len(enc)
        i += n
    if cur:
        words.append(prefix + b"".join(cur) + b"?=")
    return b" ".join(words)


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
