"""What a report says: the RFC 3464 message a notice stands for, queued under its id.

The runner (relayq.delivery.runner) decides when a report is owed and makes it
in three recorded steps (see Runner.settle); this module writes step two's
message: a bounce or delay warning to the sender, or a copy to the postmaster
about a message that cannot be returned, quoting the original from its data.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from relayq.core import address, dsn, dsnparams
from relayq.core.envelope import DOUBLE, WARNING, Envelope, Recipient
from relayq.delivery import decisions, logline

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO

    from relayq.core.config import Config
    from relayq.core.envelope import Notice
    from relayq.queue.claim import Claim
    from relayq.queue.spool import NewMessage
    from relayq.queue.submit import Context
    from relayq.system.log import Log


def _chunks(f: BinaryIO, size: int = 1 << 16) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def write(cfg: Config, ctx: Context, log: Log, claim: Claim, notice: Notice, now: float,
          msg: NewMessage) -> None:
    """Queue the RFC 3464 report `notice` describes, under its recorded queue id."""
    env = claim.envelope
    chosen = [env.recipients[i] for i in notice.indices if i < len(env.recipients)]
    failed = chosen if notice.kind != WARNING else []
    delayed = chosen if notice.kind == WARNING else []
    double = notice.kind == DOUBLE
    to = env.sender
    # local_forward applies to our own reports: cron's bounce must reach the admin
    bare = bool(env.user) and to.lower() == ctx.envelope_sender(env.user).lower()
    about = env
    if double:  # to the postmaster, about a message that cannot be returned
        bare = not address.split(cfg.postmaster or "postmaster")[1]
        to = address.qualify(cfg.postmaster or "postmaster", ctx.domain)
        about = Envelope(env.qid, to, env.recipients, env.created)
        about.size, about.msgid, about.user = env.size, env.msgid, env.user
        about.last_try, about.error = env.last_try, env.error
    try:
        eight_bit = _write_dsn(ctx, claim, about, failed, delayed, chosen, now, msg)
        rcpt = _recipient(ctx, to, bare)
        report = Envelope(msg.qid, "", [rcpt], now)
        report.is_dsn = True
        report.double_bounce = double
        report.about = env.qid
        report.size = msg.size
        report.body = "8BITMIME" if eight_bit else "7BIT"  # 7-bit unless an address is UTF-8
        report.smtputf8 = address.needs_smtputf8(rcpt.address)
        report.user = "MAILER-DAEMON"
        msg.commit(report)
    except BaseException:
        msg.abort()
        raise
    msg.release()
    log.info(logline.report_made(msg.qid, env, double, failed, delayed, now))
    log.info(logline.report_queued(msg.qid, report.size))
    if rcpt.address != to:
        log.info(f"{msg.qid}: to=<{to}>, forwarded to <{rcpt.address}> (local_forward)")


def _recipient(ctx: Context, to: str, bare: bool) -> Recipient:
    """The report's recipient, through local_forward as enqueue() routes one (Context.route);
    the original kept as its ORCPT."""
    new = ctx.forwarded(to, bare)
    if new is None:
        return Recipient(to)
    try:
        orcpt = dsnparams.check("ORCPT", f"rfc822;{to}")
    except dsnparams.BadParam:
        orcpt = ""
    return Recipient(new, orcpt=orcpt)

def _write_dsn(ctx: Context, claim: Claim, about: Envelope, failed: list[Recipient],
               delayed: list[Recipient], chosen: list[Recipient], now: float,
               msg: NewMessage) -> bool:
    """The report's text into `msg`; True if any of it is 8-bit."""
    env = claim.envelope
    eight_bit = False
    with claim.open_data() as data:
        for chunk in dsn.build(
            env=about,
            failed=failed,
            delayed=delayed,
            reporting_mta=ctx.fqdn,
            postmaster_domain=ctx.domain,
            original=_chunks(data),
            original_size=env.size,
            now=now,
            tz_offset=-time.timezone,
            boundary=dsn.boundary(msg.qid, now),
            remote_mta=env.relay,
            max_full=decisions.max_full(chosen),
        ):
            eight_bit = eight_bit or not chunk.isascii()
            msg.write(chunk)
    return eight_bit
