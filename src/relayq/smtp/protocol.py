"""Sans-I/O SMTP client core: command bytes out, typed replies in.

This module owns the SMTP wire format as seen by a client and nothing else:
building command lines (refusing anything that could smuggle a second line),
parsing replies with hard size limits, reading EHLO capabilities, encoding
AUTH payloads and MAIL/RCPT parameters, and turning a stored message (LF or
CRLF line ends) into DATA bytes. It never touches a socket, a file or the
clock, so every rule here is unit-tested without fixtures (h11's shape).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relayq.core import dsnparams

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

MAX_REPLY_LINES = 512
MAX_COMMAND_LINE = 512  # octets with CRLF (RFC 5321 4.5.3.1.4)
MAX_REPLY_BYTES = 64 * 1024
CRLF = b"\r\n"


class SmtpProtocolError(Exception):
    """The server broke the protocol (malformed, oversized or unexpected reply).

    The connection can no longer be trusted to be in step: close it.
    """


class CommandError(ValueError):
    """A command argument would not fit on one safe command line."""


# --- replies ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...] = ("",)

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status code of the first line, or ''."""
        word = self.lines[0].split(" ", 1)[0] if self.lines else ""
        parts = word.split(".")
        if (
            len(parts) == 3
            and parts[0] in ("2", "4", "5")
            and parts[0] == str(self.code)[0]
            and all(p.isdigit() and 0 < len(p) <= 3 for p in parts[1:])
        ):
            return word
        return ""

    @property
    def dsn_code(self) -> str:
        """Enhanced code if given, else one derived from the basic code."""
        return self.enhanced or f"{self.code // 100}.0.0"

    @property
    def text(self) -> str:
        """All lines' text joined by spaces (for logs and bounces)."""
        return " ".join(line for line in self.lines if line)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        text = self.text
        return f"{self.code} {text}" if text else str(self.code)


class ReplyParser:
    """Accumulates received bytes and yields complete replies, bounded.

    A reply of more than MAX_REPLY_LINES lines or MAX_REPLY_BYTES bytes, a
    line without a 3-digit code, or a continuation line whose code differs,
    raises SmtpProtocolError: a broken or hostile server must not make us
    buffer without limit or guess what it meant.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0
        self._reply_bytes = 0

    def feed(self, data: bytes) -> None:
        """Add received bytes; call next_reply() after each feed (it checks the limits)."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned reply."""
        return len(self._buf) + self._reply_bytes

    def discard(self) -> int:
        """Drop everything buffered (before a TLS handshake); return its size."""
        n = self.buffered
        self._buf.clear()
        self._lines, self._code, self._reply_bytes = [], 0, 0
        return n

    def next_reply(self) -> Reply | None:
        """Return the next complete reply, or None if more bytes are needed."""
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if self._reply_bytes + len(self._buf) > MAX_REPLY_BYTES:
                    raise SmtpProtocolError(f"reply longer than {MAX_REPLY_BYTES} bytes")
                return None
            raw = bytes(self._buf[: end + 1])
            del self._buf[: end + 1]
            self._reply_bytes += len(raw)
            if self._reply_bytes > MAX_REPLY_BYTES:
                raise SmtpProtocolError(f"reply longer than {MAX_REPLY_BYTES} bytes")
            line = raw.rstrip(b"\r\n")
            bad_sep = len(line) > 3 and line[3:4] not in b" -"
            if len(line) < 3 or not line[:3].isdigit() or bad_sep:
                raise SmtpProtocolError(f"malformed reply line {_show(line)}")
            code = int(line[:3])
            if not 200 <= code < 600:
                raise SmtpProtocolError(f"reply code out of range {_show(line)}")
            if self._lines and code != self._code:
                raise SmtpProtocolError(f"reply code changed within a reply {_show(line)}")
            self._code = code
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if len(self._lines) > MAX_REPLY_LINES:
                raise SmtpProtocolError(f"reply of more than {MAX_REPLY_LINES} lines")
            if line[3:4] != b"-":
                reply = Reply(code, tuple(self._lines))
                self._lines, self._code, self._reply_bytes = [], 0, 0
                return reply


def _show(line: bytes) -> str:
    return repr(line[:60])


# --- capabilities ------------------------------------------------------------


@dataclass
class Capabilities:
    """What the server offered in its EHLO reply (all off after HELO)."""

    esmtp: bool = False
    size: int | None = None  # None: SIZE not offered; 0: offered without a limit
    eightbitmime: bool = False
    smtputf8: bool = False
    pipelining: bool = False
    starttls: bool = False
    dsn: bool = False
    enhancedstatuscodes: bool = False
    auth: tuple[str, ...] = ()
    keywords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        caps = cls(esmtp=True)
        auth: list[str] = []
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if "=" in keyword and keyword.upper().startswith("AUTH="):  # old "AUTH=LOGIN PLAIN"
                keyword, params = "AUTH", keyword[5:] + " " + params
            keyword = keyword.upper()
            caps.keywords[keyword] = params.strip()
            if keyword == "SIZE":
                word = params.strip().split(" ", 1)[0]
                caps.size = int(word) if word.isdigit() else 0
            elif keyword == "8BITMIME":
                caps.eightbitmime = True
            elif keyword == "SMTPUTF8":
                caps.smtputf8 = True
            elif keyword == "PIPELINING":
                caps.pipelining = True
            elif keyword == "STARTTLS":
                caps.starttls = True
            elif keyword == "DSN":
                caps.dsn = True
            elif keyword == "ENHANCEDSTATUSCODES":
                caps.enhancedstatuscodes = True
            elif keyword == "AUTH":
                auth.extend(m.upper() for m in params.split() if m.upper() not in auth)
        caps.auth = tuple(auth)
        return caps


# --- commands --------------------------------------------------------------


def check_arg(value: str, what: str = "argument") -> str:
    """Refuse C0 controls (CR, LF, NUL...) and DEL: they could end the line early."""
    for ch in value:
        if ord(ch) < 32 or ord(ch) == 127:
            raise CommandError(f"{what} contains a control character ({ord(ch):#04x})")
    return value


def command(verb: str, *args: str) -> bytes:
    """One command line, CRLF-terminated, after checking every argument."""
    check_arg(verb, "command")
    parts = [verb] + [check_arg(a) for a in args if a != ""]
    return " ".join(parts).encode("utf-8", "surrogateescape") + CRLF


def _path(address: str, what: str) -> str:
    check_arg(address, what)
    if "<" in address or ">" in address:
        raise CommandError(f"{what} contains < or >")
    return f"<{address}>"


def _params(params: Iterable[str]) -> list[str]:
    out = []
    for p in params:
        check_arg(p, "parameter")
        if not p or " " in p:
            raise CommandError("ESMTP parameter is empty or contains a space")
        out.append(p)
    return out


def ehlo(name: str) -> bytes:
    if not name or " " in name:
        raise CommandError("EHLO name is empty or contains a space")
    return command("EHLO", name)


def helo(name: str) -> bytes:
    if not name or " " in name:
        raise CommandError("HELO name is empty or contains a space")
    return command("HELO", name)


def mail(sender: str, params: Iterable[str] = ()) -> bytes:
    """MAIL FROM:<sender> [params]; sender '' is the null sender <>."""
    return command("MAIL", "FROM:" + _path(sender, "sender"), *_params(params))


def rcpt(address: str, params: Iterable[str] = ()) -> bytes:
    if not address:
        raise CommandError("empty recipient")
    return command("RCPT", "TO:" + _path(address, "recipient"), *_params(params))


DATA = b"DATA\r\n"
RSET = b"RSET\r\n"
QUIT = b"QUIT\r\n"
NOOP = b"NOOP\r\n"
STARTTLS = b"STARTTLS\r\n"


def mail_params(
    caps: Capabilities,
    *,
    size: int = 0,
    body: str = "",
    smtputf8: bool = False,
    ret: str = "",
    envid: str = "",
) -> list[str]:
    """MAIL FROM parameters the server offered and the message needs."""
    out: list[str] = []
    if caps.size is not None and size > 0:
        out.append(f"SIZE={size}")
    if body in ("8BITMIME", "7BIT") and caps.eightbitmime:
        out.append(f"BODY={body}")
    if smtputf8 and caps.smtputf8:
        out.append("SMTPUTF8")
    if caps.dsn:
        if ret:
            out.append(f"RET={_checked('RET', ret)}")
        envid = _queued_envid(envid) if envid else ""
        if envid:
            out.append(f"ENVID={envid}")
    return out


def _checked(name: str, value: str, utf8: bool = False) -> str:
    """A value through relayq.core.dsnparams, the rule every way in applied already."""
    try:
        return dsnparams.check(name, value, utf8)
    except dsnparams.BadParam as exc:
        raise CommandError(str(exc)) from None


def _queued_envid(value: str) -> str:
    """ENVID as queued, through dsnparams.recorded_envid (an older relayq's non-xtext
    ENVID goes out encoded or left out); a damaged record is a CommandError."""
    try:
        return dsnparams.recorded_envid(value)[0]
    except dsnparams.BadParam as exc:
        raise CommandError(str(exc)) from None


def rcpt_params(caps: Capabilities, *, notify: str = "", orcpt: str = "") -> list[str]:
    """RCPT TO parameters (DSN only, and only when offered)."""
    out: list[str] = []
    if caps.dsn:
        if notify:
            out.append("NOTIFY=" + _checked("NOTIFY", notify))
        if orcpt:  # UTF-8 (an older relayq stored it so) goes out as xtext
            out.append("ORCPT=" + _checked("ORCPT", orcpt, utf8=True))
    return out


# --- AUTH --------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def auth_plain(user: str, secret: str) -> str:
    """RFC 4616 initial response: authzid NUL authcid NUL passwd."""
    if "\0" in user or "\0" in secret:
        raise CommandError("AUTH user or secret contains NUL")
    return b64(b"\0" + user.encode("utf-8") + b"\0" + secret.encode("utf-8"))


def auth_xoauth2(user: str, token: str) -> str:
    """Google/Microsoft XOAUTH2 initial response."""
    if any(c in user + token for c in "\x01\r\n\0"):
        raise CommandError("XOAUTH2 user or token contains a control character")
    return b64(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def auth_oauthbearer(user: str, token: str, host: str, port: int) -> str:
    """RFC 7628 initial response: the GS2 header naming the user, then host, port and
    the bearer token, each ended by %x01."""
    if any(c in user + token + host for c in "\x01\r\n\0"):
        raise CommandError("OAUTHBEARER user or token contains a control character")
    saslname = user.replace("=", "=3D").replace(",", "=2C")  # RFC 5801's escapes
    return b64(f"n,a={saslname},\x01host={host}\x01port={port}\x01auth=Bearer {token}"
               "\x01\x01".encode())


def oauth_error(challenge: str) -> str:
    """The status of a server's SASL OAuth error challenge (RFC 7628 3.2.2: base64 of
    a JSON object), as one short printable word; "" when it says nothing usable."""
    import json

    try:
        obj = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except ValueError:
        return ""
    status = obj.get("status") if isinstance(obj, dict) else None
    if not isinstance(status, str | int) or isinstance(status, bool):
        return ""
    word = str(status)[:40]
    return word if all(c.isascii() and (c.isalnum() or c in "-_.") for c in word) else ""


def secret_forms(user: str, secret: str) -> tuple[str, ...]:
    """The secret and the base64 forms AUTH PLAIN, LOGIN and XOAUTH2 send of it."""
    u, s = user.encode("utf-8", "replace"), secret.encode("utf-8", "replace")
    forms = (secret, b64(s), b64(b"\0" + u + b"\0" + s),
             b64(b"user=" + u + b"\x01auth=Bearer " + s + b"\x01\x01"))
    # longest first: one form may hold another; never mask "" or a letter everywhere
    return tuple(sorted((f for f in forms if len(f) >= 4), key=len, reverse=True))


def masked(reply: Reply, hide: tuple[str, ...], mask: str) -> Reply:
    """The reply with every form of a secret in `hide` replaced by `mask`."""
    lines = []
    for line in reply.lines:
        for secret in hide:
            line = line.replace(secret, mask)
        lines.append(line)
    return Reply(reply.code, tuple(lines))


def auth_login_steps(user: str, secret: str) -> tuple[str, str]:
    """The two base64 answers of AUTH LOGIN (user name, then password)."""
    return b64(user.encode("utf-8")), b64(secret.encode("utf-8"))


# --- DATA ------------------------------------------------------------------


class DataEncoder:
    """Stored message bytes -> DATA wire bytes, chunk by chunk.

    Rules (RFC 5321 4.5.2, and Postfix's outbound smuggling defence):
    LF and CRLF end a line and become CRLF; a CR not followed by LF becomes a
    space (a stray CR must never reach the wire, and turning it into a line
    break could split a header); a line starting with '.' gets one more '.';
    `finish()` ends an unterminated last line and adds '.' CRLF. Each chunk
    is handled with a few bytes.replace() passes, so a 100 MB message costs
    flat memory and C speed; the only state between chunks is a held-back
    trailing CR and whether the output ends at the start of a line.
    """

    def __init__(self) -> None:
        self._cr = False  # last chunk ended in CR; its meaning depends on the next byte
        self._bol = True  # output so far ends at the beginning of a line

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
            if not chunk:
                return b""
        data = chunk.replace(b"\r\n", b"\n").replace(b"\r", b" ")
        data = data.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if self._bol and data.startswith(b"."):
            data = b"." + data
        self._bol = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        tail = b""
        if self._cr:  # a CR at the very end is stray too
            self._cr = False
            tail = self.feed(b" ")
        if not self._bol:
            tail += CRLF
        self._bol = True
        return tail + b".\r\n"


def encode_data(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Convenience generator over DataEncoder; yields non-empty pieces."""
    enc = DataEncoder()
    for chunk in chunks:
        out = enc.feed(chunk)
        if out:
            yield out
    yield enc.finish()
