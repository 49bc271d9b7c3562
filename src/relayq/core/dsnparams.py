"""DSN parameters (RFC 3461) and xtext: the one rule every way in and out applies.

ENVID, ORCPT, NOTIFY, RET and BODY reach relayq from sendmail's flags (-V,
-N, -R, -B), from SMTP (the listener and `sendmail -bs`), from a maildrop/
request file, and leave it on the relay's MAIL and RCPT lines. Each of those
places calls these functions, so a value accepted on the way in is a value
the SMTP client writes on the way out: never exit 0 (or 250) followed by a
refusal at the relay.

Each checker returns the canonical form (upper-case keywords, upper-case
xtext hex digits) or raises BadParam with a one-line reason; `check()` names
them by their SMTP keyword, `envelope()` checks a request's envelope-wide
set, and `recorded_envid()` is the one tolerance for an ENVID an older relayq
queued. Pure: no I/O.

xtext (RFC 3461 section 4): printable US-ASCII 33..126 except "+" and "=",
which, like any other octet, are written "+HH". Lower-case hex digits are
accepted on input, as sendmail's xtextok() does, and written upper-case.
"""

from __future__ import annotations

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
RETS = ("FULL", "HDRS")
BODIES = ("7BIT", "8BITMIME")
_HEX = frozenset("0123456789ABCDEFabcdef")


class BadParam(ValueError):
    """A DSN parameter that no relay could be sent; str() is the reason."""


def xtext_encode(text: str) -> str:
    """Any text -> xtext: octets outside 33..126, "+" and "=" as +HH (UTF-8 octets)."""
    out = []
    for c in text:
        if 33 <= ord(c) <= 126 and c not in "+=":
            out.append(c)
        else:
            out.extend(f"+{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
    return "".join(out)


def xtext_decode(text: str) -> str:
    """xtext -> text; the octets are read as UTF-8. A "+" not followed by two hex
    digits is kept as written (a record from an older relayq), never an error."""
    raw = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x2B and i + 3 <= len(raw) and all(chr(b) in _HEX for b in raw[i + 1:i + 3]):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def is_xtext(value: str) -> bool:
    """True if `value` is xtext as RFC 3461 writes it (any case of hex digits)."""
    try:
        _xtext(value, "value")
    except BadParam:
        return False
    return True


def _xtext(value: str, what: str) -> str:
    out = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "+":
            pair = value[i + 1:i + 3]
            if len(pair) != 2 or not all(h in _HEX for h in pair):
                raise BadParam(f"{what}: '+' must start a +HH escape (xtext)")
            out.append("+" + pair.upper())
            i += 3
            continue
        if not 33 <= ord(c) <= 126 or c == "=":
            shown = f"{ord(c):#04x}" if not 33 <= ord(c) <= 126 else repr(c)
            raise BadParam(f"{what}: character {shown} must be written as +HH (xtext)")
        out.append(c)
        i += 1
    return "".join(out)


def envid(value: str) -> str:
    """ENVID / sendmail -V: non-empty xtext of at most 100 characters."""
    if not value:
        raise BadParam("ENVID is empty")
    if len(value) > MAX_ENVID:
        raise BadParam(f"ENVID is longer than {MAX_ENVID} characters")
    return _xtext(value, "ENVID")


def orcpt(value: str, utf8: bool = False) -> str:
    """ORCPT: addr-type ";" xtext, at most 500 characters.

    `utf8` (an SMTPUTF8 client, RFC 6533): characters above 127 are accepted
    and stored as +HH of their UTF-8 octets, so that what is kept is xtext.
    """
    kind, sep, addr = value.partition(";")
    if not sep or not kind or not addr:
        raise BadParam("ORCPT must be addr-type;xtext")
    if not all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-/=?^_`{|}~") for c in kind):
        raise BadParam("ORCPT: the addr-type must be an atom")
    if utf8:
        if any(ord(c) > 127 and not c.isprintable() for c in addr):  # U+2028 and such
            raise BadParam("ORCPT: a non-printable character")
        addr = "".join(xtext_encode(c) if ord(c) > 127 else c for c in addr)
    out = f"{kind};{_xtext(addr, 'ORCPT')}"
    if len(out) > MAX_ORCPT:
        raise BadParam(f"ORCPT is longer than {MAX_ORCPT} characters")
    return out


def notify(value: str) -> str:
    """NOTIFY / sendmail -N: NEVER, or a list of SUCCESS, FAILURE and DELAY."""
    words = [w.strip().upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return "NEVER"
    if not value or any(w not in NOTIFY_WORDS for w in words):
        raise BadParam("NOTIFY must be NEVER or a list of SUCCESS, FAILURE and DELAY")
    return ",".join(dict.fromkeys(words))


def merge_notify(a: str, b: str) -> str:
    """One NOTIFY for two requests about the same mailbox (local_forward merging
    recipients): every notice either asked for; NEVER only if both said it; "" is the
    default (FAILURE, DELAY), kept as "" when nothing more was asked."""
    if a == b:
        return a
    default = ("FAILURE", "DELAY")
    words = {w for v in (a, b) if v != "NEVER"
             for w in (v.split(",") if v else default)}
    if not words:
        return "NEVER"
    if "" in (a, b) and words == set(default):
        return ""
    return ",".join(w for w in NOTIFY_WORDS if w in words)


def ret(value: str) -> str:
    """RET / sendmail -R: FULL or HDRS."""
    if value.upper() not in RETS:
        raise BadParam("RET must be FULL or HDRS")
    return value.upper()


def body(value: str) -> str:
    """BODY / sendmail -B: 7BIT or 8BITMIME."""
    if value.upper() not in BODIES:
        raise BadParam("BODY must be 7BIT or 8BITMIME")
    return value.upper()


_CHECKS = {"NOTIFY": notify, "RET": ret, "ENVID": envid, "BODY": body}


def check(name: str, value: str, utf8: bool = False) -> str:
    """One parameter by its SMTP keyword (NOTIFY, RET, ENVID, ORCPT, BODY), canonical.

    The entry of every way in: sendmail's -N, -R, -V and -B, the listener's
    MAIL and RCPT, a Request at enqueue(), a maildrop file, and the way out
    (the SMTP client's MAIL and RCPT lines). `utf8` is orcpt()'s.
    """
    if name == "ORCPT":
        return orcpt(value, utf8)
    return _CHECKS[name](value)


def given(params: dict[str, str], names: tuple[str, ...], utf8: bool = False
          ) -> dict[str, str]:
    """The `names` of one SMTP command's parameters, checked; "" for those not given
    (a parameter given empty, `NOTIFY=`, is refused)."""
    return {name: check(name, params[name], utf8) if name in params else "" for name in names}


def envelope(notify: str, ret: str, envid: str, body: str) -> tuple[str, str, str, str]:
    """A request's envelope-wide parameters ("": not given), each canonical:
    (NOTIFY, RET, ENVID, BODY)."""
    return (check("NOTIFY", notify) if notify else "", check("RET", ret) if ret else "",
            check("ENVID", envid) if envid else "", check("BODY", body) if body else "")


def recorded_envid(value: str) -> tuple[str, str]:
    """An ENVID read back from what relayq itself wrote (the queue, a maildrop file):
    (the ENVID to send, "" or a note for the log about how it had to change).

    An older relayq took any printable ASCII `-V` (`-V a=b`) with exit 0: such
    a value goes out xtext-encoded, or, too long then, is left out (it only
    labels reports), so the mail is not refused after that exit 0. Anything
    else (a space, a control or a non-ASCII character) is a damaged record:
    BadParam. (The maildrop taker used to encode those too; the SMTP client
    refused them: the stricter rule is kept, for both.)
    """
    try:
        return envid(value), ""
    except BadParam as exc:
        reason = str(exc)
    if not value or not all(33 <= ord(c) <= 126 for c in value):
        raise BadParam("ENVID is not valid xtext") from None
    try:
        encoded = envid(xtext_encode(value))
    except BadParam:
        return "", f"ENVID {value!r} ({reason}) left out"
    return encoded, f"ENVID {value!r} ({reason}) sent xtext-encoded as {encoded}"


def orcpt_address(value: str) -> tuple[str, str] | None:
    """A stored ORCPT "addr-type;xtext" -> (addr-type, address), the address
    xtext-decoded when the type is rfc822 (the one reading of an ORCPT, for
    Original-Recipient and Delivered-To); None without a ";"."""
    kind, sep, addr = value.partition(";")
    if not sep:
        return None
    kind, addr = kind.strip(), addr.strip()
    return kind, xtext_decode(addr) if kind.lower() == "rfc822" else addr
