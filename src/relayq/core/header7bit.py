"""Header fields made fit for a relay: folded to the line limit, 8-bit text encoded.

RFC 2047 encoded-words for text, RFC 2231 for MIME parameters; `strict`
refuses (None) where the 7-bit form would not decode to exactly the
original, i.e. where only SMTPUTF8 could carry the field (relayq.core.wire).
"""

from __future__ import annotations

import re

from relayq.core.mimescan import LIMIT, PARAM, WSP


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
MIMEPARAMS = frozenset((b"content-type", b"content-disposition"))
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
    if key in MIMEPARAMS:
        value = PARAM.sub(lambda m: _rfc2231(m, charset), value)
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

