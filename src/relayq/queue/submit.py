"""enqueue(): the single funnel through which every new message enters the queue.

Reads the message stream, fixes its header (relayq.core.headers), streams the body
to the spool in chunks (memory stays flat for any size), and commits. On
return the message is durable and still locked by the caller, who may hand
the lock to a delivering child or deliver it in-process.
"""

from __future__ import annotations

import time

from relayq.core import address, dsnparams, headers, policy, rewrite
from relayq.core.envelope import Envelope, Recipient
from relayq.core.errors import ConfigError, DataError, UsageError
from relayq.core.lines import Normalizer
from relayq.system import hostname

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Iterable

    from relayq.core.config import Config
    from relayq.queue.spool import NewMessage, Spool
    from relayq.system.log import Log

MAX_HEADER = 1 << 20
MAX_GENERICS = 1 << 20  # a generics map is a few lines; more is a mistake, not a map
MAX_HOPS = policy.MAX_HOPS
LOCAL, FORWARD, RELAY = "local", "forward", "relay"  # Context.route's answers


class Request:
    """What the caller asked for: from argv (cli.submission.request_for), SMTP (the
    listener) or a maildrop/ file (the taker), each through the one constructor."""

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

    def __init__(
        self,
        *,
        user: str,
        uid: int,
        sender: str | None = None,
        full_name: str = "",
        extract: bool = False,
        ignore_dots: bool = False,
        recipients: list[str] | None = None,
        rcpt_params: dict[str, tuple[str, str]] | None = None,
        received_from: str = "",
        identified: bool = False,
        notify: str = "",
        ret: str = "",
        envid: str = "",
        body: str = "",
        hops: int | None = None,
        bs: bool = False,
        drop: str = "",
    ) -> None:
        """The one way to build a request: sendmail's argv, the listener's SMTP
        transaction and the maildrop taker's file each give their fields here."""
        self.user = user
        self.uid = uid
        self.sender = sender  # None: the submitting user; "": null sender
        self.full_name = full_name
        self.extract = extract
        self.ignore_dots = ignore_dots
        self.recipients = recipients if recipients is not None else []  # argv arguments
        # per-recipient DSN parameters from SMTP (address as given -> (NOTIFY, ORCPT))
        self.rcpt_params = rcpt_params if rcpt_params is not None else {}
        self.received_from = received_from  # SMTP: "HELO (localhost [127.0.0.1])" (trace)
        self.identified = identified  # SMTP: user/uid are the client socket's owner
        self.notify = notify
        self.ret = ret
        self.envid = envid
        self.body = body
        self.hops = hops
        self.bs = bs  # an SMTP session on stdin (sendmail -bs), not the listener
        self.drop = drop  # the maildrop/ file this is a copy of (maildrop.identity)


class Context:
    """Names computed once per process: domain, local domains, masquerading, and the
    rewriting settings (relayq.core.rewrite) with the generics map, read when it changes."""

    __slots__ = ("_generics", "all_mail_from", "domain", "forward", "forward_domains",
                 "forward_hosts", "forward_system", "fqdn", "generics_apply", "generics_file",
                 "local", "local_delivery", "masquerade")

    def __init__(self, cfg: Config) -> None:
        self.domain = hostname.mail_domain(cfg.domain)
        name = hostname.fqdn()
        self.fqdn = name if "." in name else self.domain  # for Received and Message-ID
        self.local = hostname.local_domains(self.domain)
        self.masquerade = cfg.masquerade_as
        # local delivery wins for what it delivers: no forward address then
        self.local_delivery = cfg.local_delivery
        self.forward = "" if cfg.local_delivery else cfg.local_forward
        # the runner's rule of which domains are this host's (cfg.local_domains or ours)
        explicit = frozenset(d.lower().rstrip(".") for d in cfg.local_domains)
        self.forward_domains = explicit or self.local
        # local_forward's: the mail domain is often the organisation's, so only the
        # host's own names (or what the admin set), and names typed bare
        self.forward_hosts = explicit or hostname.host_names()
        self.forward_system = cfg.local_forward_users == "system"
        self.generics_file = cfg.generics_file
        self.generics_apply = cfg.generics_apply
        self.all_mail_from = cfg.all_mail_from
        self._generics: tuple[tuple[int, int, int, int], dict[str, str]] | None = None

    def generics(self) -> dict[str, str]:
        """The generics map ({} when none is set), parsed again only when the file changes;
        ConfigError (78) when it cannot be read or has a bad line."""
        path = self.generics_file
        if not path:
            return {}
        import os
        import stat

        try:  # O_NONBLOCK: a FIFO put there must not hang sendmail
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise ConfigError(f"generics_file: {path} is not a regular file")
                if st.st_size > MAX_GENERICS:
                    raise ConfigError(f"generics_file: {path} is over {MAX_GENERICS} bytes")
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if self._generics is None or self._generics[0] != key:
                    data = f.read(MAX_GENERICS + 1)
                    if len(data) > MAX_GENERICS:
                        raise ConfigError(f"generics_file: {path} is over {MAX_GENERICS} bytes")
                    text = data.decode("utf-8", "surrogateescape")
                    self._generics = (key, rewrite.parse_generics(text, path))
        except OSError as exc:
            raise ConfigError(f"generics_file: cannot read {path}: {exc.strerror or exc}"
                              ) from None
        return self._generics[1]

    def generic(self, addr: str, part: str) -> str | None:
        """The generics map's address for a sender in `part` ("envelope" or "header"),
        or None (not mapped, or the map does not apply there)."""
        if not self.generics_file or self.generics_apply not in ("both", part):
            return None
        return rewrite.generic(addr, self.generics(), self.forward_domains, self.domain)

    def forwarded(self, rcpt: str, bare: bool = False) -> str | None:
        """Where local_forward sends a recipient (`bare`: typed without a domain), or None."""
        if not self.forward:
            return None
        uid_of = _system_uid if self.forward_system else None
        return rewrite.forward(rcpt, self.forward, self.forward_hosts, uid_of, bare)

    def route(self, rcpt: str, bare: bool = False) -> tuple[str, str]:
        """Where a qualified recipient goes, decided once for enqueue() and `sendmail -bv`:
        (LOCAL, rcpt) delivered here (local_delivery, one of this host's domains: the
        runner's local transport then), (FORWARD, address) by local_forward, else
        (RELAY, rcpt) to the smarthost."""
        if self.local_delivery and rewrite.is_local(rcpt, self.forward_domains):
            return LOCAL, rcpt
        new = self.forwarded(rcpt, bare)
        return (FORWARD, new) if new is not None else (RELAY, rcpt)

    def envelope_sender(self, addr: str) -> str:
        """Qualify a local sender, then masquerade it (seed: submit.cf masquerading)."""
        if not addr:
            return ""
        local, domain = address.split(addr)
        if self.masquerade and (not domain or domain.lower() in self.local):
            return f"{local}@{self.masquerade}"
        return address.qualify(addr, self.domain)


def _system_uid(name: str) -> int | None:
    """The uid of a local user, or None (local_forward_users = "system")."""
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except (KeyError, ValueError):
        return None


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
    """Check the request, fix the header, stream the message and commit it; the
    returned message is durable and still locked by the caller."""
    ctx = ctx or Context(cfg)
    now = time.time()
    argv_rcpts: list[str] = []
    for arg in req.recipients:
        argv_rcpts.extend(address.parse_recipient_args(arg))
    given, sender, header_sender = _senders(req, ctx)
    address.check_text(req.full_name, "full name")
    _check_dsn(req)  # every caller checks; the envelope must not trust it
    warning = _auth_warning(cfg, ctx, req, given)

    source = iter(source)
    norm = Normalizer(req.ignore_dots)
    head, at_eof = _read_header(norm, source)
    text = head.decode("utf-8", "surrogateescape")
    fields, rest, complete = headers.parse_block(text)
    if not complete and not at_eof and not norm.ended:
        raise DataError("message header too long (over 1 MiB without an empty line)")

    msg = spool.create()
    try:
        opts = _options(cfg, ctx, req, header_sender, msg.qid, now, warning)
        result = headers.rewrite(fields, opts, argv_rcpts)
        account = account_for(cfg, sender)
        sender = _own_from(cfg, sender, account, result)
        _check_result(req, result)
        msg.write(headers.serialize(result.fields))
        body = rest.encode("utf-8", "surrogateescape")
        eight_bit = _write_body(msg, body, source, norm, at_eof)
        if cfg.max_message_size and msg.size > cfg.max_message_size:
            raise DataError(
                f"Message is too large ({msg.size} bytes; the limit is {cfg.max_message_size})"
            )
        forwarded = _forward(ctx, req, result)
        env = _envelope(msg, req, result, sender, now, eight_bit or result.eight_bit_headers)
        env.account = account  # chosen before rewrite_from: the new sender must not move it
        msg.commit(env)
    except BaseException:
        msg.abort()
        raise
    log.info(
        f"{msg.qid}: from=<{sender}>, size={msg.size}, class=0, nrcpts={len(env.recipients)}, "
        f"msgid={env.msgid}, relay={_relay(req)}"
    )
    for orig, new in forwarded:
        log.info(f"{msg.qid}: to=<{orig}>, forwarded to <{new}> (local_forward)")
    if warning:
        log.info(f"{msg.qid}: Authentication-Warning: {warning} (uid {req.uid})")
    return msg, env


def _relay(req: Request) -> str:
    """sendmail's relay= of a from= line: the SMTP client as our Received field names
    it ("alice@localhost [127.0.0.1]", "localhost [::1]"), else the submitting user."""
    inner = req.received_from.partition(" (")[2].removesuffix(")")
    return inner or f"{req.user}@localhost"


def _senders(req: Request, ctx: Context) -> tuple[str, str, str]:
    """(the sender as given, qualified and masqueraded; the envelope sender; the sender
    a From: field the header lacks gets): the submitting user's, the given one, or ""
    (null), through the generics map and all_mail_from (relayq.core.rewrite)."""
    if req.sender is None:
        raw = req.user
    elif req.sender:
        raw = address.parse_mailbox(req.sender, "sender")
    else:
        return "", "", ""
    return sender_addresses(ctx, raw)


def sender_addresses(ctx: Context, raw: str) -> tuple[str, str, str]:
    """(qualified and masqueraded, envelope sender, From: address) of a non-null sender
    as given (a user name or an address): for each message, and `relayq test`'s."""
    given = ctx.envelope_sender(raw)
    envelope = ctx.generic(raw, "envelope") or given
    header = ctx.generic(raw, "header") or given
    return given, rewrite.all_mail_from(envelope, ctx.all_mail_from), header


def account_for(cfg: Config, sender: str) -> str:
    """The account (core/accounts) serving the envelope sender as rewritten, as the
    envelope records it: "" for the default (the null sender's too)."""
    from relayq.core.accounts import DEFAULT, for_sender

    name = for_sender(cfg, sender)
    return "" if name == DEFAULT else name


def _own_from(cfg: Config, sender: str, account: str, result: headers.Result) -> str:
    """rewrite_from: the account's own address (core/rewrite.own_address) in From and as
    the envelope sender (<> stays <>), for the account the envelope sender names."""
    from relayq.core.accounts import DEFAULT

    acc = cfg.accounts()[account or DEFAULT]
    if not acc.rewrite_from:
        return sender
    own = rewrite.own_address(acc.from_address, acc.user)
    result.fields = rewrite.from_fields(result.fields, own)
    return own if sender else sender


def _forward(ctx: Context, req: Request, result: headers.Result) -> list[tuple[str, str]]:
    """local_forward applied to the recipients in place (duplicates after it merged);
    the original is kept as the ORCPT unless the client gave one. Returns what moved.

    Merged duplicates get every notice any of them asked for (NOTIFY merged); a
    recipient the client named itself keeps its own ORCPT over a forwarded one's."""
    if not ctx.forward:
        return []
    moved: list[tuple[str, str]] = []
    kept: dict[str, tuple[str, str, str, bool]] = {}  # key -> address, NOTIFY, ORCPT, named
    for rcpt in result.recipients:
        kind, new = ctx.route(rcpt, rcpt in result.bare)
        notify, orcpt = req.rcpt_params.get(rcpt, (req.notify, ""))
        named = kind != FORWARD
        if not named:
            moved.append((rcpt, new))
            if not orcpt:
                try:
                    orcpt = dsnparams.check("ORCPT", f"rfc822;{rcpt}")
                except dsnparams.BadParam:
                    orcpt = ""
            rcpt = new
        key = rcpt.lower()
        if key in kept:
            addr, was_notify, was_orcpt, was_named = kept[key]
            if was_named or not named:
                orcpt = was_orcpt
            kept[key] = (addr, dsnparams.merge_notify(was_notify, notify), orcpt,
                         named or was_named)
        else:
            kept[key] = (rcpt, notify, orcpt, named)
    result.recipients = [addr for addr, _, _, _ in kept.values()]
    for addr, notify, orcpt, _ in kept.values():
        req.rcpt_params[addr] = (notify, orcpt)
    return moved


def _options(cfg: Config, ctx: Context, req: Request, sender: str, qid: str, now: float,
             warning: str) -> headers.Options:
    """What the header rewrite needs to know of this submission."""
    return headers.Options(
        domain=ctx.domain,
        masquerade_as=ctx.masquerade,
        local_domains=ctx.local,
        generics=ctx.generics() if ctx.generics_apply in ("both", "header") else {},
        generics_domains=ctx.forward_domains,
        sender=sender,
        full_name=req.full_name,
        extract=req.extract,
        qid=qid,
        user=req.user,
        now=now,
        tz_offset=-time.timezone if time.localtime(now).tm_isdst <= 0 else -time.altzone,
        hostname=ctx.fqdn,
        received_from=req.received_from,
        auth_warning=warning if cfg.auth_warnings else "",
    )


def _check_result(req: Request, result: headers.Result) -> None:
    """UsageError without recipients; DataError for a message that has looped."""
    if not result.recipients:
        if req.extract:
            raise UsageError("No recipient addresses found in header")
        raise UsageError("Recipient names must be specified")
    hops = req.hops if req.hops is not None else result.hops
    refusal = policy.hop_refusal(hops)
    if refusal:
        raise DataError(refusal)


def _write_body(msg: NewMessage, body: bytes, source: Iterable[bytes], norm: Normalizer,
                at_eof: bool) -> bool:
    """The body read with the header, then the rest of the stream, normalized, to
    the spool; True if any of it is 8-bit."""
    eight_bit = False
    if body:
        eight_bit = not body.isascii()
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
    return eight_bit


def _envelope(msg: NewMessage, req: Request, result: headers.Result, sender: str,
              now: float, eight_bit: bool) -> Envelope:
    """The queued envelope of a written message (eight_bit: any 8-bit header or body)."""
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
    return env


def _check_dsn(req: Request) -> None:
    """The DSN parameters through the rule the SMTP client applies (relayq.core.dsnparams),
    made canonical: what is queued is what a relay will be sent, never a refusal later."""
    try:
        req.notify, req.ret, req.envid, req.body = dsnparams.envelope(
            req.notify, req.ret, req.envid, req.body)
        req.rcpt_params = {
            rcpt: (dsnparams.check("NOTIFY", notify) if notify else "",
                   dsnparams.check("ORCPT", orcpt) if orcpt else "")
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
