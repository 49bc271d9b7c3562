"""Mail addresses: a tolerant header address-list parser and strict envelope checks.

Two audiences, two tempers:

* `parse_list` reads address lists inside header fields (To, Cc, From ...) the
  way sendmail does: it understands display names, quoted strings, nested
  comments, angle addresses, groups, obsolete routes and folded lines, and it
  never raises. Junk is skipped. Each result carries its span in the value so
  a caller can rewrite one address in place and leave every other byte alone.
* `parse_mailbox` and `parse_recipient_args` read addresses given on the
  command line (`-f`, `-r`, recipients). They refuse anything that could
  smuggle a line break, an option or a second address into the envelope, with
  a `DataError` that names the offending value.

Strings are `str` decoded with utf-8/surrogateescape: every character at or
above U+0080 (including the surrogates standing for undecodable bytes) is
treated as an ordinary atom character, so 8-bit and UTF-8 addresses pass
through unchanged.

Pure code: no I/O, and only the `relayq.core.errors` import.
"""

from __future__ import annotations

from relayq.core.errors import DataError

MAX_ADDRESS = 998  # RFC 5322 line limit; nothing longer can be a sane address

# Token kinds. Specials are represented by the character itself.
_ATOM = "a"
_QUOTED = "q"
_LITERAL = "l"
_COMMENT = "c"

_SPACE = " \t\r\n"
# RFC 5322 specials that split atoms. '.' is deliberately absent: dots are part
# of atoms here, which accepts obsolete and broken local parts ("a..b", "a.").
_SPECIALS = '()<>[]:;@,"'
_WORD = (_ATOM, _QUOTED)


class Found:
    """An address inside a header value: value[start:end] is the addr-spec as written."""

    __slots__ = ("addr", "end", "start")

    def __init__(self, start: int, end: int, addr: str) -> None:
        self.start = start
        self.end = end
        self.addr = addr

    def __repr__(self) -> str:
        return f"Found({self.start}, {self.end}, {self.addr!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Found):
            return NotImplemented
        return (self.start, self.end, self.addr) == (other.start, other.end, other.addr)

    def __hash__(self) -> int:
        return hash((self.start, self.end, self.addr))


# A token is (kind, start, end); kept as plain tuples for speed.
_Token = tuple[str, int, int]


def _skip_delimited(text: str, i: int, close: str, nests: bool) -> tuple[int, bool]:
    """Scan from just after an opening delimiter; return (end, terminated).

    Backslash quotes the next character. With `nests`, '(' opens a nested
    level (comments). An unterminated construct runs to the end of `text`.
    """
    n = len(text)
    depth = 1
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == close:
            depth -= 1
            if depth == 0:
                return i + 1, True
        elif nests and c == "(":
            depth += 1
        i += 1
    return n, False


def _tokenize(text: str) -> tuple[list[_Token], bool]:
    """Split `text` into tokens; the flag is False if a quote, comment or literal is unclosed."""
    tokens: list[_Token] = []
    ok = True
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c == '"':
            end, closed = _skip_delimited(text, i + 1, '"', False)
            tokens.append((_QUOTED, i, end))
            ok = ok and closed
            i = end
        elif c == "(":
            end, closed = _skip_delimited(text, i + 1, ")", True)
            tokens.append((_COMMENT, i, end))
            ok = ok and closed
            i = end
        elif c == "[":
            end, closed = _skip_delimited(text, i + 1, "]", False)
            tokens.append((_LITERAL, i, end))
            ok = ok and closed
            i = end
        elif c in _SPECIALS:
            # ')' and ']' outside their constructs land here as lone specials.
            tokens.append((c, i, i + 1))
            i += 1
        else:
            start = i
            while i < n:
                c = text[i]
                if c == "\\":
                    i = min(i + 2, n)
                    continue
                if c in _SPACE or c in _SPECIALS:
                    break
                i += 1
            tokens.append((_ATOM, start, i))
    return tokens, ok


def _joined(text: str, a: _Token, b: _Token) -> bool:
    """May tokens a and b (in that order) belong to one dotted word sequence?"""
    if a[2] == b[1]:
        return True  # adjacent: "a"b, a"b"
    # Obsolete syntax allows CFWS around the dots: "a . b", "a. b".
    return text[a[2] - 1] == "." or text[b[1]] == "."


def _addr_spec(text: str, toks: list[_Token]) -> tuple[int, int] | None:
    """Span of `toks` if they form exactly one addr-spec (local ["@" domain]), else None."""
    if not toks or toks[0][0] not in _WORD:
        return None
    n = len(toks)
    i = 1
    while i < n and toks[i][0] in _WORD and _joined(text, toks[i - 1], toks[i]):
        i += 1
    if i < n:
        if toks[i][0] != "@" or i + 1 >= n:
            return None
        i += 1
        if toks[i][0] not in (_ATOM, _LITERAL):
            return None
        i += 1
        while i < n and toks[i][0] in (_ATOM, _LITERAL) and _joined(text, toks[i - 1], toks[i]):
            i += 1
        if i < n:
            return None
    start, end = toks[0][1], toks[-1][2]
    if not text[start:end].strip(". \t\r\n"):
        return None  # a lone dot is not an address
    return start, end


def _angle_inner(toks: list[_Token], strict: bool) -> list[_Token] | None:
    """The tokens between the first '<' and its '>' with any obsolete route removed.

    Returns None for a malformed angle address (missing '>' in strict mode,
    route without ':').
    """
    first = next(k for k, t in enumerate(toks) if t[0] == "<")
    inner: list[_Token] = []
    closed = False
    for t in toks[first + 1 :]:
        if t[0] == ">":
            closed = True
            break
        inner.append(t)
    if strict and not closed:
        return None
    if inner and inner[0][0] == "@":
        # obs-route: "<@relay1,@relay2:user@host>"
        colon = next((k for k, t in enumerate(inner) if t[0] == ":"), -1)
        if colon < 0:
            return None
        inner = inner[colon + 1 :]
    return inner


def _mailbox(text: str, unit: list[_Token]) -> Found | None:
    """Tolerantly read one mailbox from the tokens of one list element."""
    toks = [t for t in unit if t[0] != _COMMENT]
    if not toks:
        return None
    if any(t[0] == "<" for t in toks):
        inner = _angle_inner(toks, strict=False)
        if not inner:
            return None  # "<>" or a broken route: nothing to deliver to
        toks = inner
    span = _addr_spec(text, toks)
    if span is None:
        return None
    return Found(span[0], span[1], text[span[0] : span[1]])


def _units(tokens: list[_Token]) -> tuple[list[list[_Token]], bool]:
    """Split the tokens of an address list into mailbox units.

    Commas separate mailboxes except inside an angle address where the comma
    belongs to an obsolete route ("<@a,@b:c@d>"). A ':' outside angle
    brackets opens a group whose display name is dropped; ';' closes it.
    Also says whether a group was seen (the command line allows none).
    """
    units: list[list[_Token]] = []
    cur: list[_Token] = []
    in_angle = False
    in_group = False
    grouped = False
    for k, tok in enumerate(tokens):
        kind = tok[0]
        if kind == "<":
            in_angle = True
        elif kind == ">":
            in_angle = False
        elif kind == ",":
            nxt = tokens[k + 1][0] if k + 1 < len(tokens) else ""
            if in_angle and nxt == "@":
                cur.append(tok)
                continue
            in_angle = False  # an unclosed '<' ends at the next separator
            units.append(cur)
            cur = []
            continue
        elif kind == ":" and not in_angle and not in_group:
            in_group = grouped = True
            cur = []  # the group's display name
            continue
        elif kind == ";" and not in_angle:
            units.append(cur)
            cur = []
            in_group = False
            continue
        cur.append(tok)
    units.append(cur)
    return units, grouped


def parse_list(value: str) -> list[Found]:
    """Find every address in a header value (an RFC 5322 address-list), tolerantly.

    Accepts display names, quoted strings, nested comments, angle addresses,
    groups ("undisclosed-recipients:;", "team: a@x, b@y;"), obsolete routes,
    folded lines, bare local parts ("root") and cron's "root (Cron Daemon)".
    Elements that are not addresses are skipped; this never raises.

    `addr` is the addr-spec exactly as written (value[start:end]); in the rare
    obsolete form with whitespace or comments inside it, pass it through
    `compact` before using it as an envelope address.
    """
    tokens, _ok = _tokenize(value)
    found: list[Found] = []
    for unit in _units(tokens)[0]:
        f = _mailbox(value, unit)
        if f is not None:
            found.append(f)
    return found


def compact(addr: str) -> str:
    """Remove whitespace and comments outside quoted strings from an addr-spec as written."""
    if not any(c in addr for c in " \t\r\n("):
        return addr
    tokens, _ok = _tokenize(addr)
    return "".join(addr[t[1] : t[2]] for t in tokens if t[0] != _COMMENT)


# ---------------------------------------------------------------------------
# Strict parsing for the command line


def _refuse(what: str, text: str, reason: str) -> DataError:
    return DataError(f"invalid {what} {text!r}: {reason}")


def _check_chars(text: str, what: str) -> None:
    for c in text:
        o = ord(c)
        if o < 32 or o == 127:
            names = {"\r": "CR", "\n": "LF", "\0": "NUL"}
            raise _refuse(what, text, f"contains a control character ({names.get(c, hex(o))})")


def _strict_one(text: str, toks: list[_Token], what: str) -> str:
    """One address from the (comment-free) tokens of one command-line element."""
    if any(t[0] == "<" for t in toks):
        opens = [k for k, t in enumerate(toks) if t[0] == "<"]
        closes = [k for k, t in enumerate(toks) if t[0] == ">"]
        if len(opens) != 1 or len(closes) != 1 or closes[0] < opens[0]:
            raise _refuse(what, text, "unbalanced or repeated '<' '>'")
        if closes[0] != len(toks) - 1:
            raise _refuse(what, text, "text after '>'")
        if any(t[0] not in _WORD for t in toks[: opens[0]]):
            raise _refuse(what, text, "malformed display name")
        inner = _angle_inner(toks, strict=True)
        if inner is None:
            raise _refuse(what, text, "malformed route")
        if not inner:
            return ""
        toks = inner
    elif any(t[0] == ">" for t in toks):
        raise _refuse(what, text, "unbalanced '>'")
    if not toks:
        raise _refuse(what, text, "empty address")
    span = _addr_spec(text, toks)
    if span is None:
        if len(toks) > 1 and all(t[0] in (_ATOM, _QUOTED, _LITERAL, "@") for t in toks):
            raise _refuse(what, text, "unquoted whitespace or more than one address")
        raise _refuse(what, text, "not a valid address")
    addr = text[span[0] : span[1]]
    if compact(addr) != addr:
        raise _refuse(what, text, "unquoted whitespace inside the address")
    if addr.startswith("-"):
        raise _refuse(what, text, "must not start with '-'")
    if len(addr) > MAX_ADDRESS:
        raise _refuse(what, text, f"longer than {MAX_ADDRESS} characters")
    return addr


def _strict_elements(text: str, what: str) -> list[list[_Token]]:
    """Check `text` and split it at top-level commas into the (comment-free) tokens of each."""
    _check_chars(text, what)
    if text.lstrip().startswith("-"):
        raise _refuse(what, text, "must not start with '-'")
    tokens, ok = _tokenize(text)
    if not ok:
        raise _refuse(what, text, "unbalanced quote, comment or bracket")
    for t in tokens:
        if t[0] in (")", "]", ";"):
            raise _refuse(what, text, f"unexpected {t[0]!r}")
    units, grouped = _units(tokens)
    if grouped:
        raise _refuse(what, text, "unexpected ':' (groups are not allowed here)")
    return [[t for t in unit if t[0] != _COMMENT] for unit in units]


def parse_mailbox(text: str, what: str = "address") -> str:
    """One envelope address from argv or -f/-r; return the bare addr-spec.

    Accepts "a@b", "<a@b>", "Name <a@b>", comments, quoted local parts and
    "<>" (the null address, returned as ""). Raises `DataError` naming `what`
    and the value for control characters (CR, LF, NUL, other C0, DEL),
    unbalanced '<' '>' or quotes, unquoted whitespace, more than one address,
    a leading '-' or more than 998 characters.
    """
    if len(text) > MAX_ADDRESS:
        raise _refuse(what, text[:60] + "...", f"longer than {MAX_ADDRESS} characters")
    elements = _strict_elements(text, what)
    if len(elements) != 1:
        raise _refuse(what, text, "more than one address")
    return _strict_one(text, elements[0], what)


def parse_recipient_args(text: str) -> list[str]:
    """The addresses in one command-line recipient argument ("a@x, Name <b@y>").

    Empty list elements ("a@x,,b@y", a trailing comma) are ignored, as
    sendmail does; an argument with no address at all is refused. Each
    address gets the checks of `parse_mailbox`; "<>" is not a recipient.
    """
    what = "recipient"
    out: list[str] = []
    for toks in _strict_elements(text, what):
        if not toks:
            continue
        addr = _strict_one(text, toks, what)
        if not addr:
            raise _refuse(what, text, "the null address <> is not a recipient")
        out.append(addr)
    if not out:
        raise _refuse(what, text, "no address")
    return out


# ---------------------------------------------------------------------------
# Small helpers


def split(addr: str) -> tuple[str, str]:
    """(local, domain) at the last '@' outside quotes; domain is "" if there is none."""
    at = -1
    quoted = False
    i = 0
    n = len(addr)
    while i < n:
        c = addr[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "@" and not quoted:
            at = i
        i += 1
    if at < 0:
        return addr, ""
    return addr[:at], addr[at + 1 :]


def qualify(addr: str, domain: str) -> str:
    """Append "@domain" to a bare local part; qualified addresses and "" are unchanged."""
    if not addr or not domain:
        return addr
    if split(addr)[1] or addr.endswith("@"):
        return addr
    return f"{addr}@{domain}"


def needs_smtputf8(addr: str) -> bool:
    """True if the address has any non-ASCII character (SMTPUTF8 is needed to send it)."""
    return not addr.isascii()


def check_text(text: str, what: str) -> None:
    """Refuse text that would break a header or envelope line (CR, LF or NUL)."""
    for bad, name in (("\r", "CR"), ("\n", "LF"), ("\0", "NUL")):
        if bad in text:
            raise DataError(f"invalid {what} {text!r}: contains {name}")
