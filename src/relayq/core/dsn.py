"""Delivery status notifications (RFC 3464, RFC 6533): bounces and delay warnings.

Pure: the caller passes the clock (`now`, `tz_offset`), the names and the
stored message as an iterable of chunks, and gets the report back as chunks of
stored-message bytes (LF line ends, like everything in our queue). The original
is streamed, never held whole: a 100 MB message costs one chunk of memory, and
when only its headers are wanted we stop reading at the blank line.

Every header value we write is flattened first: a recipient address, an ENVID
or a server's reply can never add a header line or a MIME boundary.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from relayq.core import dsnparams
from relayq.core.envelope import flatten
from relayq.core.headers import format_date

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from relayq.core.envelope import Envelope, Recipient

FAILED = "failed"
DELAYED = "delayed"

# Longest header value we write; keeps every line far below RFC 5322's 998.
MAX_VALUE = 900
# The header block of a stored message is buffered to find its end and to see
# whether it holds 8-bit bytes; past this size it is cut at a line end.
MAX_HEADER_BLOCK = 1_000_000

_BCHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?")

_NOTIFY_WORD = {
    "failed": "FAILURE",
    "failure": "FAILURE",
    "delayed": "DELAY",
    "delay": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
    "success": "SUCCESS",
}


# -- policy ------------------------------------------------------------------


def should_bounce(env: Envelope) -> bool:
    """May a report about `env` be sent at all?

    Never to the null sender, and never about a message that is itself a
    report: that is what keeps a bounce of a bounce from looping.
    """
    return bool(env.sender) and not env.is_dsn


def wanted(r: Recipient, action: str) -> bool:
    """Does the recipient's NOTIFY (RFC 3461) ask for a report of `action`?

    "" (no NOTIFY given) means the default: failures and delays are
    reported, successes are not. NEVER means no report at all; an explicit
    list reports only the events it names.
    """
    try:
        word = _NOTIFY_WORD[action.lower()]
    except KeyError:
        raise ValueError(f"unknown DSN action {action!r}") from None
    notify = {w.strip().upper() for w in r.notify.split(",") if w.strip()}
    if not notify:
        return word != "SUCCESS"
    if "NEVER" in notify:
        return False
    return word in notify


def is_smtp_reply(reply: str) -> bool:
    """True when `reply` is a server's words ("550 5.1.1 ...") rather than our reason."""
    return (
        len(reply) >= 3
        and reply[0] in "2345"
        and reply[1] in "0123456789"
        and reply[2] in "0123456789"
        and (len(reply) == 3 or reply[3] in " -")
    )


def status_code(reply: str, action: str = FAILED) -> str:
    """The RFC 3463 status for a recipient's reply.

    "550 5.1.1 No such user" -> "5.1.1"; "550 No such user" -> "5.0.0"; a reply
    whose enhanced code disagrees with its class falls back to "X.0.0". Our own
    reasons (connection refused, timed out, "") -> "4.4.1" for a delay,
    "5.0.0" for a failure.
    """
    if not is_smtp_reply(reply):
        head = reply.split(None, 1)[0] if reply.strip() else ""
        parts = head.split(".")
        if (len(parts) == 3 and parts[0] in ("4", "5")
                and all(p.isascii() and p.isdigit() and 0 < len(p) <= 3 for p in parts)):
            return head  # our own reason with its code, e.g. "4.4.7 Message expired ..."
        return "4.4.1" if action == DELAYED else "5.0.0"
    cls = reply[0]
    words = reply[4:].split(None, 1)
    if words:
        parts = words[0].split(".")
        if (
            len(parts) == 3
            and parts[0] == cls
            and all(p.isascii() and p.isdigit() and 0 < len(p) <= 3 for p in parts)
        ):
            return f"{cls}.{int(parts[1])}.{int(parts[2])}"
    return f"{cls}.0.0"


# -- formatting helpers --------------------------------------------------------


def _interval(seconds: float) -> str:
    """sendmail's pintvl in words: '4 hours', '1 hour', '30 minutes'."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        n, unit = seconds // 3600, "hour"
    else:
        n, unit = max(1, seconds // 60), "minute"
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _clean(text: str, limit: int = MAX_VALUE) -> str:
    """One safe header value: no CR, LF or other controls, bounded length."""
    text = flatten(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def boundary(qid: str, now: float) -> str:
    """A MIME boundary for a report: valid for any host name (RFC 2046's 70
    characters and alphabet), unguessable, so no original can contain it."""
    import secrets

    return f"{qid}.{int(now)}.{secrets.token_hex(12)}/relayq"


def _qp(text: str) -> str:
    """Quoted-printable (RFC 2045) for a part of our own text that is not ASCII:
    a report goes out 7-bit, through any relay."""
    import binascii

    return binascii.b2a_qp(text.encode("utf-8", "surrogateescape"), istext=True).decode("ascii")


def _original_recipient(orcpt: str) -> str:
    """Stored ORCPT "rfc822;xtext" -> "rfc822;decoded" for Original-Recipient."""
    parts = dsnparams.orcpt_address(orcpt)
    if parts is None:
        return ""
    kind, addr = parts
    return f"{kind};{addr.strip()}"


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _needs_utf8(text: str) -> bool:
    return not text.isascii()


def _split_header_block(chunks: Iterator[bytes]) -> tuple[bytes, bytes, bytes]:
    """Read chunks until the blank line ending the header block.

    Returns (header block with its last LF, the blank line or b"", the bytes
    read past it); joined, they are exactly what was read. The header block
    is bounded by MAX_HEADER_BLOCK: a longer one is cut at a line end.
    """
    buf = bytearray()
    searched = 0
    for chunk in chunks:
        buf += chunk
        if buf[:1] == b"\n":
            return b"", b"\n", bytes(buf[1:])
        end = buf.find(b"\n\n", max(0, searched - 1))
        if end >= 0:
            return bytes(buf[: end + 1]), b"\n", bytes(buf[end + 2 :])
        searched = len(buf)
        if len(buf) > MAX_HEADER_BLOCK:
            cut = buf.rfind(b"\n", 0, MAX_HEADER_BLOCK) + 1 or MAX_HEADER_BLOCK
            return bytes(buf[:cut]), b"", bytes(buf[cut:])
    return bytes(buf), b"", b""


# -- the report ----------------------------------------------------------------


def build(
    *,
    env: Envelope,
    failed: list[Recipient],
    delayed: list[Recipient],
    reporting_mta: str,
    postmaster_domain: str,
    original: Iterable[bytes],
    original_size: int,
    now: float,
    tz_offset: int,
    boundary: str,
    max_full: int = 1_000_000,
    remote_mta: str = "",
) -> Iterator[bytes]:
    """Yield an RFC 3464 report about `env` as stored-message bytes.

    A failure report when `failed` is not empty (it also lists `delayed`
    recipients, as sendmail does), else a delay warning. `boundary` must be
    random (the caller's job: the original is streamed, so it cannot be
    checked against it). `remote_mta` names the relay whose replies are
    quoted; Remote-MTA is written only when it is given and the recipient's
    reply is an SMTP reply.
    """
    if not failed and not delayed:
        raise ValueError("a report needs at least one failed or delayed recipient")
    if not env.sender:
        raise ValueError("no report is sent to the null sender (check should_bounce)")
    if not (0 < len(boundary) <= 70 and set(boundary) <= _BCHARS):
        raise ValueError(f"bad MIME boundary {boundary!r}")
    return _generate(
        env,
        failed,
        delayed,
        _clean(reporting_mta),
        _clean(postmaster_domain),
        iter(original),
        original_size,
        now,
        tz_offset,
        boundary,
        max_full,
        _clean(remote_mta),
    )


def _generate(
    env: Envelope,
    failed: list[Recipient],
    delayed: list[Recipient],
    reporting_mta: str,
    postmaster_domain: str,
    chunks: Iterator[bytes],
    original_size: int,
    now: float,
    tz_offset: int,
    boundary: str,
    max_full: int,
    remote_mta: str,
) -> Iterator[bytes]:
    kind = FAILED if failed else DELAYED
    full = env.ret.upper() != "HDRS" and original_size <= max_full
    try:
        head, blank, rest = _split_header_block(chunks)
        everyone = failed + delayed
        # UTF-8 addresses make the report itself need SMTPUTF8; a UTF-8 original
        # only needs message/global, sent in base64 (RFC 6532 3.5) so that the
        # report can reach a sender whose relay lacks SMTPUTF8 (the usual reason
        # for such a bounce).
        addr_utf8 = _needs_utf8(env.sender) or any(
            _needs_utf8(r.address) or _needs_utf8(r.orcpt) for r in everyone
        )
        orig_utf8 = env.smtputf8 or any(b >= 0x80 for b in head)
        utf8 = addr_utf8 or orig_utf8
        # an 8-bit original travels in base64 too: a report never needs a
        # capability (8BITMIME) that its original's relay may lack
        encoded = orig_utf8 or (full and env.body.upper() == "8BITMIME")

        yield _encode(_top_headers(env, kind, postmaster_domain, reporting_mta, now, tz_offset,
                                   boundary))
        yield _encode(f"This is a MIME-encapsulated message\n\n--{boundary}\n")
        yield _encode(_human_part(env, failed, delayed, now, tz_offset, full, original_size))
        yield _encode(f"\n--{boundary}\n")
        yield _encode(
            _status_part(env, failed, delayed, reporting_mta, remote_mta, now, tz_offset,
                         addr_utf8)
        )
        yield _encode(f"\n--{boundary}\n")

        if full:
            ctype = "message/global" if utf8 or encoded else "message/rfc822"
        else:
            ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
        part = f"Content-Type: {ctype}\n"
        if encoded:
            part += "Content-Transfer-Encoding: base64\n"
        if not full:
            part += "Content-Description: Headers of the undelivered message\n"
        else:
            part += "Content-Description: Undelivered message\n"
        yield _encode(part + "\n")

        def original_bytes() -> Iterator[bytes]:
            yield head
            if full:
                yield blank
                yield rest
                yield from chunks

        last = b"\n"
        if encoded:
            yield from _base64_lines(original_bytes())
        else:
            for chunk in original_bytes():
                if chunk:
                    yield chunk
                    last = chunk[-1:]
        if last != b"\n":
            yield b"\n"
        yield _encode(f"\n--{boundary}--\n")
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _base64_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Stream base64 in 76-character lines (57 input bytes each)."""
    import binascii

    pending = b""
    for chunk in chunks:
        pending += chunk
        cut = len(pending) - len(pending) % 57
        if cut:
            block, pending = pending[:cut], pending[cut:]
            yield b"".join(
                binascii.b2a_base64(block[i : i + 57]) for i in range(0, cut, 57)
            )
    if pending:
        yield binascii.b2a_base64(pending)


def _top_headers(
    env: Envelope,
    kind: str,
    postmaster_domain: str,
    reporting_mta: str,
    now: float,
    tz_offset: int,
    boundary: str,
) -> str:
    if kind == FAILED:
        subject = "Returned mail: see transcript for details"
    else:
        subject = f"Warning: could not send message for past {_interval(now - env.created)}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(int(now)))
    tag = "F" if kind == FAILED else "D"
    lines = [
        f"From: Mail Delivery Subsystem <MAILER-DAEMON@{postmaster_domain}>",
        f"To: <{_clean(env.sender)}>",
        f"Subject: {subject}",
        f"Date: {format_date(now, tz_offset)}",
        f"Message-ID: <{stamp}.{_clean(env.qid)}.{tag}@{reporting_mta}>",
        f"Auto-Submitted: auto-generated ({'failure' if kind == FAILED else 'delay'})",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    return "\n".join(lines) + "\n\n"


def _human_part(
    env: Envelope,
    failed: list[Recipient],
    delayed: list[Recipient],
    now: float,
    tz_offset: int,
    full: bool,
    original_size: int,
) -> str:
    lines: list[str] = []
    if not failed:
        lines += [
            "    **********************************************",
            "    **      THIS IS A WARNING MESSAGE ONLY      **",
            "    **  YOU DO NOT NEED TO RESEND YOUR MESSAGE  **",
            "    **********************************************",
            "",
        ]
    lines.append(f"The original message was received at {format_date(env.created, tz_offset)}")
    if env.user:
        lines.append(f"from local user {_clean(env.user, 100)}")
    lines.append("")
    if failed:
        lines.append("   ----- The following addresses had permanent fatal errors -----")
        for r in failed:
            lines += _reason_lines(env, r)
        lines.append("")
    if delayed:
        lines.append("   ----- The following addresses had transient non-fatal errors -----")
        for r in delayed:
            lines += _reason_lines(env, r)
        lines.append("")
    if not failed:
        lines += [
            f"Warning: message still undelivered after {_interval(now - env.created)}",
            "It will be tried again; you will be told if it finally fails.",
            "",
        ]
    if not full:
        if env.ret.upper() == "HDRS":
            lines.append("As requested (RET=HDRS), only the headers of the message are returned.")
        else:
            lines.append(
                f"The message was too large ({original_size} bytes) to return whole; "
                "its headers follow."
            )
        lines.append("")
    text = "\n".join(lines).rstrip("\n") + "\n"
    charset = "us-ascii" if text.isascii() else "utf-8"
    head = f"Content-Type: text/plain; charset={charset}\n"
    if charset != "us-ascii":
        head += "Content-Transfer-Encoding: quoted-printable\n"
        text = _qp(text)
    return head + "Content-Description: Notification\n\n" + text


def _reason_lines(env: Envelope, r: Recipient) -> list[str]:
    reason = _clean(r.reply or env.error) or "no reason recorded"
    return [f"<{_clean(r.address)}>", f"    (reason: {reason})"]


def _status_part(
    env: Envelope,
    failed: list[Recipient],
    delayed: list[Recipient],
    reporting_mta: str,
    remote_mta: str,
    now: float,
    tz_offset: int,
    utf8: bool,
) -> str:
    """The machine-readable part; pure ASCII unless it is message/global-delivery-status."""
    safe = _clean if utf8 else (lambda s: _ascii(_clean(s)))
    ctype = "message/global-delivery-status" if utf8 else "message/delivery-status"
    head = [f"Content-Type: {ctype}"]
    if utf8:
        head.append("Content-Transfer-Encoding: 8bit")  # UTF-8 addresses (RFC 6533)
    head += ["Content-Description: Delivery report", ""]
    out = [f"Reporting-MTA: dns; {reporting_mta}"]
    if env.envid:
        out.append(f"Original-Envelope-Id: {safe(dsnparams.xtext_decode(env.envid))}")
    out.append(f"Arrival-Date: {format_date(env.created, tz_offset)}")
    last = format_date(env.last_try or now, tz_offset)
    for action, group in ((FAILED, failed), (DELAYED, delayed)):
        for r in group:
            reply = r.reply or env.error
            smtp = r.remote and is_smtp_reply(reply)
            out.append("")
            if r.orcpt:
                orig = _original_recipient(r.orcpt)
                if orig:
                    out.append(f"Original-Recipient: {safe(orig)}")
            addr_type = "rfc822" if r.address.isascii() else "utf-8"
            out.append(f"Final-Recipient: {addr_type}; {safe(r.address)}")
            out.append(f"Action: {action}")
            out.append(f"Status: {status_code(reply, action)}")
            if smtp and remote_mta:
                out.append(f"Remote-MTA: dns; {remote_mta}")
            if smtp:
                out.append(f"Diagnostic-Code: smtp; {safe(reply)}")
            elif reply:  # our own decision: not labelled as a server's words
                out.append(f"Diagnostic-Code: X-Relayq; {safe(reply)}")
            out.append(f"Last-Attempt-Date: {last}")
    body = "\n".join(out) + "\n"
    return "\n".join(head) + "\n" + body
