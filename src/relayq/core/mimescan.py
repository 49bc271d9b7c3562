"""The stored message read as MIME: header fields, header ends, body lines, delimiters.

One pass over the seekable stored file (LF line ends) in blocks of READ
octets, with memory bounded by PIECE (a longer line comes in pieces) and
FIELD_CAP (a longer header field is passed on raw) whatever the message
size. `events()` numbers the MIME entities (`Part`) in document order, the
same on every pass: relayq.core.wire scans once to plan a conversion and
again to stream it. `needs_change()` is the cheap check that lets a message
already fit for the relay skip both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import codecs
    from collections.abc import Generator, Iterator

LIMIT = 998  # octets per line, without the CRLF
READ = 256 * 1024
PIECE = 64 * 1024  # a longer line is handled in pieces of this size
FIELD_CAP = 256 * 1024  # a header field kept whole up to this size
WSP = b" \t"
PLAIN_CTE = ("", "7bit", "8bit", "binary")


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
PARAM = re.compile(rb';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.S)


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
        for m in PARAM.finditer(v):
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
    s = _Scan()
    for block in _blocks(data):
        i, n = 0, len(block)
        while i < n:
            if s.state != FIELD:  # body lines in bulk, up to the next delimiter
                j = s.body_end(block, i)
                if j > i:
                    yield Event(s.state, s.cur, block[i:j])
                    s.bol = block[j - 1][1]
                    i = j
                    if i == n:
                        break
            line, nl = block[i]
            i += 1
            start, s.bol = s.bol, nl
            if s.stack and start and nl and line[:2] == b"--":
                hit = _boundary_hit(s.stack, line)
                if hit is not None:
                    yield from s.delimiter(line, nl, hit)
                    continue
            if s.state == FIELD and (yield from s.header_line(line, nl, start)):
                continue
            yield Event(s.state, s.cur, [(line, nl)])
    yield from s.end()


class _Scan:
    """The scanner's state between two lines: the part being read, what is open around it."""

    __slots__ = ("bol", "count", "cur", "fld", "fsize", "huge", "stack", "state")

    def __init__(self) -> None:
        self.count = 0
        self.stack: list[Part] = []  # open multiparts, outermost first
        self.cur = self.new(None, True)
        self.state = FIELD  # FIELD (in a header block), BODY, FILL
        self.fld: list[Line] = []  # the header field being gathered
        self.fsize = 0
        self.huge = False  # the current field outgrew FIELD_CAP: its rest goes as RAWHEAD
        self.bol = True  # the next piece starts a line

    def new(self, parent: Part | None, root: bool) -> Part:
        signed = parent is not None and (parent.signed or parent.kind == "multipart/signed")
        p = Part(self.count, parent, root, signed)
        self.count += 1
        return p

    def begin_body(self) -> None:
        """The header block of the current part ended: what its body is."""
        p = self.cur
        k = p.kind
        if k.startswith("multipart/") and p.boundary and p.cte in PLAIN_CTE:
            p.container = True
            self.stack.append(p)
            self.state = FILL
        elif k in ("message/rfc822", "message/news") and p.cte in PLAIN_CTE:
            p.container = True
            self.cur, self.state = self.new(p, True), FIELD
        else:
            self.state = BODY

    def body_end(self, block: list[Line], i: int) -> int:
        """Where the body lines from block[i] end: at a delimiter line or the block's end."""
        stack, n = self.stack, len(block)
        if not stack:
            return n
        for j in range(i, n):
            line, nl = block[j]
            if (nl and line[:2] == b"--" and (block[j - 1][1] if j > i else self.bol)
                    and _boundary_hit(stack, line) is not None):
                return j
        return n

    def end_field(self) -> Iterator[Event]:
        """The field being gathered is complete."""
        if self.fld:
            _note_field(self.cur, self.fld)
            yield Event(FIELD, self.cur, self.fld)
            self.fld = []

    def delimiter(self, line: bytes, nl: bool, hit: tuple[int, bool]) -> Iterator[Event]:
        """A delimiter line of an open multipart (`hit` from _boundary_hit)."""
        if self.state == FIELD:
            yield from self.end_field()
            yield Event(ENDHEAD, self.cur, [])
        k, closing = hit
        mp = self.stack[k]
        del self.stack[k + 1:]
        yield Event(DELIM, mp, [(line, nl)])
        if closing:
            self.stack.pop()
            self.cur, self.state = mp, FILL
        else:
            self.cur, self.state = self.new(mp, False), FIELD
        self.huge = False

    def header_line(self, line: bytes, nl: bool, start: bool) -> Generator[Event, None, bool]:
        """A line (or piece) in a header block; False: it is the first line of the body."""
        cur = self.cur
        if not start or ((self.fld or self.huge) and line[:1] in (b" ", b"\t")):
            if self.huge:
                yield Event(RAWHEAD, cur, [(line, nl)])
                if not line.isascii():
                    cur.huge8 = True
                return True
            self.fld.append((line, nl))
            self.fsize += len(line)
            if self.fsize > FIELD_CAP:
                _note_field(cur, self.fld)
                if cur.head8:
                    cur.huge8 = True
                yield Event(RAWHEAD, cur, self.fld)
                self.fld, self.huge = [], True
            return True
        self.huge = False
        yield from self.end_field()
        if line == b"" and nl:
            yield Event(ENDHEAD, cur, [(line, nl)])
            self.begin_body()
            return True
        if _NAME.match(line) or (not nl and _NAME_START.fullmatch(line)):
            self.fld, self.fsize = [(line, nl)], len(line)
            return True
        yield Event(ENDHEAD, cur, [])
        self.begin_body()
        if self.state == FIELD:  # a message/rfc822 body that starts with a non-header line
            yield Event(ENDHEAD, self.cur, [])
            self.begin_body()
        return False

    def end(self) -> Iterator[Event]:
        """The end of the file: a header block still open is ended."""
        if self.state == FIELD:
            yield from self.end_field()
            yield Event(ENDHEAD, self.cur, [])
