"""enqueue(): the single funnel through which every new message enters the queue.

Reads the message stream, fixes its header (relayq.core.headers), streams the body
to the spool in chunks (memory stays flat for any size), and commits. On
return the message is durable and still locked by the caller, who may hand
the lock to a delivering child or deliver it in-process.
"""

from __future__ import annotations

import time

from relayq.core import address, dsnparams, headers, policy
from relayq.core.envelope import Envelope, Recipient
from relayq.core.errors import DataError, UsageError
from relayq.core.lines import Normalizer
from relayq.system import hostname

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Iterable

    from relayq.core.config import Config
    from relayq.queue.spool import NewMessage, Spool
    from relayq.system.log import Log

MAX_HEADER = 1 << 20
MAX_HOPS = policy.MAX_HOPS


class Request:
    """What the caller asked for; filled from argv (sendmail) or SMTP (listener)."""

    __slots__ = (
        "body",
        "bs",
        "drop",
        "envid",
        "extract",
        "full_name",
        "hops",
        "identified",
        "ignore_dots",
        "notify",
        "rcpt_params",
        "received_from",
        "recipients",
        "ret",
        "sender",
        "uid",
        "user",
    )

    def __init__(self, *, user: str, uid: int) -> None:
        self.user = user
        self.uid = uid
        self.sender: str | None = None  # None: the submitting user; "": null sender
        self.full_name = ""
        self.extract = False
        self.ignore_dots = False
        self.recipients: list[str] = []  # argv arguments, each maybe a list
        # per-recipient DSN parameters from SMTP (address as given -> (NOTIFY, ORCPT))
        self.rcpt_params: dict[str, tuple[str, str]] = {}
        self.received_from = ""  # SMTP: "HELO (localhost [127.0.0.1])" for the trace field
        self.identified = False  # SMTP: user/uid are the client socket's owner (the kernel's)
        self.notify = ""
        self.ret = ""
        self.envid = ""
        self.body = ""
        self.hops: int | None = None
        self.bs = False  # an SMTP session on stdin (sendmail -bs), not the listener
        self.drop = ""  # the maildrop/ file this is a copy of (maildrop.identity)


class Context:
    """Names computed once per process: domain, local domains, masquerading."""

    __slots__ = ("domain", "fqdn", "local", "masquerade")

    def __init__(self, cfg: Config) -> None:
        self.domain = hostname.mail_domain(cfg.domain)
        name = hostname.fqdn()
        self.fqdn = name if "." in name else self.domain  # for Received and Message-ID
        self.local = hostname.local_domains(self.domain)
        self.masquerade = cfg.masquerade_as

    def envelope_sender(self, addr: str) -> str:
        """Qualify a local sender, then masquerade it (seed: submit.cf masquerading)."""
        if not addr:
            return ""
        local, domain = address.split(addr)
        if self.masquerade and (not domain or domain.lower() in self.local):
            return f"{local}@{self.masquerade}"
        return address.qualify(addr, self.domain)


def _read_header(norm: Normalizer, source: Iterable[bytes]) -> tuple[bytes, bool]:
    """Collect normalized bytes until the header block must be complete."""
    buf = bytearray()
    for chunk in source:
        buf += norm.feed(chunk)
        if b"\n\n" in buf or buf.startswith(b"\n") or len(buf) >= MAX_HEADER or norm.ended:
            return bytes(buf), False
    buf += norm.finish()
    return bytes(buf), True


def enqueue(
    cfg: Config,
    spool: Spool,
    req: Request,
    source: Iterable[bytes],
    log: Log,
    ctx: Context | None = None,
) -> tuple[NewMessage, Envelope]:
    ctx = ctx or Context(cfg)
    now = time.time()
    argv_rcpts: list[str] = []
    for arg in req.recipients:
        argv_rcpts.extend(address.parse_recipient_args(arg))
    if req.sender is None:
        sender = ctx.envelope_sender(req.user)
    elif req.sender:
        sender = ctx.envelope_sender(address.parse_mailbox(req.sender, "sender"))
    else:
        sender = ""
    address.check_text(req.full_name, "full name")
    _check_dsn(req)  # every caller checks; the envelope must not trust it
    warning = _auth_warning(cfg, ctx, req, sender)

    source = iter(source)
    norm = Normalizer(req.ignore_dots)
    head, at_eof = _read_header(norm, source)
    text = head.decode("utf-8", "surrogateescape")
    fields, rest, complete = headers.parse_block(text)
    if not complete and not at_eof and not norm.ended:
        raise DataError("message header too long (over 1 MiB without an empty line)")

    msg = spool.create()
    try:
        opts = headers.Options(
            domain=ctx.domain,
            masquerade_as=ctx.masquerade,
            local_domains=ctx.local,
            sender=sender,
            full_name=req.full_name,
            extract=req.extract,
            qid=msg.qid,
            user=req.user,
            now=now,
            tz_offset=-time.timezone if time.localtime(now).tm_isdst <= 0 else -time.altzone,
            hostname=ctx.fqdn,
            received_from=req.received_from,
            auth_warning=warning if cfg.auth_warnings else "",
        )
        result = headers.rewrite(fields, opts, argv_rcpts)
        if not result.recipients:
            if req.extract:
                raise UsageError("No recipient addresses found in header")
            raise UsageError("Recipient names must be specified")
        hops = req.hops if req.hops is not None else result.hops
        refusal = policy.hop_refusal(hops)
        if refusal:
            raise DataError(refusal)

        eight_bit = result.eight_bit_headers
        msg.write(headers.serialize(result.fields))
        body = rest.encode("utf-8", "surrogateescape")
        if body:
            eight_bit = eight_bit or not body.isascii()
            msg.write(body)
        if not at_eof:
            for chunk in source:
                out = norm.feed(chunk)
                if out:
                    eight_bit = eight_bit or not out.isascii()
                    msg.write(out)
            out = norm.finish()
            if out:
                eight_bit = eight_bit or not out.isascii()
                msg.write(out)
        if cfg.max_message_size and msg.size > cfg.max_message_size:
            raise DataError(
                f"Message is too large ({msg.size} bytes; the limit is {cfg.max_message_size})"
            )

        rcpts = []
        for r in result.recipients:
            notify, orcpt = req.rcpt_params.get(r, (req.notify, ""))
            rcpts.append(Recipient(r, notify=notify, orcpt=orcpt))
        env = Envelope(msg.qid, sender, rcpts, now)
        env.user, env.uid = req.user, req.uid
        env.size = msg.size
        env.msgid = result.msgid
        env.envid, env.ret = req.envid, req.ret
        env.drop = req.drop
        env.smtputf8 = result.eight_bit_headers or any(
            address.needs_smtputf8(a) for a in [sender, *result.recipients]
        )
        env.body = "8BITMIME" if eight_bit or req.body == "8BITMIME" else req.body
        msg.commit(env)
    except BaseException:
        msg.abort()
        raise
    log.info(
        f"{msg.qid}: from=<{sender}>, size={msg.size}, class=0, nrcpts={len(env.recipients)}, "
        f"msgid={env.msgid}, relay={req.user}@localhost"
    )
    if warning:
        log.info(f"{msg.qid}: authentication warning: {warning} (uid {req.uid})")
    return msg, env


def _check_dsn(req: Request) -> None:
    """The DSN parameters through the rule the SMTP client applies (relayq.core.dsnparams),
    made canonical: what is queued is what a relay will be sent, never a refusal later."""
    try:
        req.envid = dsnparams.envid(req.envid) if req.envid else ""
        req.ret = dsnparams.ret(req.ret) if req.ret else ""
        req.notify = dsnparams.notify(req.notify) if req.notify else ""
        req.body = dsnparams.body(req.body) if req.body else ""
        req.rcpt_params = {
            rcpt: (dsnparams.notify(notify) if notify else "",
                   dsnparams.orcpt(orcpt) if orcpt else "")
            for rcpt, (notify, orcpt) in req.rcpt_params.items()}
    except dsnparams.BadParam as exc:
        raise DataError(str(exc)) from None


def _auth_warning(cfg: Config, ctx: Context, req: Request, sender: str) -> str:
    """sendmail's X-Authentication-Warning: an untrusted user chose the sender."""
    if req.uid == 0 or req.user in cfg.trusted_users:
        return ""
    if req.bs:
        return f"{ctx.fqdn}: {req.user} owned process doing -bs"
    if (req.received_from and not req.identified) or req.sender is None:
        return ""  # the listener, not knowing who connected; or no -f
    local, domain = address.split(sender) if sender else ("", "")
    if local == req.user and (not domain or domain.lower() in ctx.local
                              or domain.lower() == ctx.masquerade.lower()):
        return ""
    # a local user's MAIL FROM is that user's -f (the listener learnt who from the kernel)
    how = "SMTP" if req.received_from else "-f"
    return f"{ctx.fqdn}: {req.user} set sender to {sender or '<>'} using {how}"
