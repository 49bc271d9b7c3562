"""One message on an open SMTP session: the checks before it, and its transactions.

SmtpTransport (relayq.delivery.smtp_transport) owns the session: which relay,
the connection cache, TLS and AUTH. This module owns what is said on it for
one message: whether the relay can carry the message at all (precheck), and
one MAIL/RCPT.../DATA transaction for some of its recipients, turning every
reply into a per-recipient Outcome. It never decides to resend: a reply that
may not be about this recipient (out of step, intermediate) ends the session
with ProtocolViolation, a deferral.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from relayq.core import wire
from relayq.core.outcome import DEFERRED, FAILED, SENT, Outcome
from relayq.smtp import protocol as proto
from relayq.smtp.client import ConnectionLost, ProtocolViolation, SmtpError

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config
    from relayq.smtp.client import SmtpClient
    from relayq.smtp.protocol import Reply


@dataclass
class OutgoingMessage:
    qid: str
    sender: str  # "" = null sender <>
    recipients: list[tuple[str, str, str]]  # (address, notify, orcpt)
    data: BinaryIO  # LF line ends, positioned at 0
    size: int = 0
    body: str = ""  # "" | "7BIT" | "8BITMIME"
    smtputf8: bool = False
    envid: str = ""
    ret: str = ""  # "" | "FULL" | "HDRS"
    wire: wire.Plan | None = None  # how it goes to the current relay (set by precheck)
    utf8: bool = False  # SMTPUTF8 asked for and needed: a non-ASCII envelope or header


def precheck(client: SmtpClient, msg: OutgoingMessage) -> Callable[[str], Outcome] | None:
    """Refuse, without sending, what this relay cannot carry, even converted.

    8-bit data for a relay without 8BITMIME and lines over 998 octets are
    converted on the way out (relayq.core.wire). Without SMTPUTF8 (RFC 6531
    3.2) a message goes only if its envelope is ASCII and its UTF-8
    header text has an exact RFC 2047 form (Subject, display names). A
    message submitted with SMTPUTF8 whose envelope and header are ASCII goes
    without it, to any relay (a provider may refuse the parameter, and an
    all-ASCII message never needed it).
    """
    caps = client.caps
    reply = ""
    msg.wire = None
    envelope_ascii = msg.sender.isascii() and all(
        a.isascii() and o.isascii() for a, _, o in msg.recipients)
    msg.utf8 = msg.smtputf8 and (not envelope_ascii or wire.header_8bit(msg.data))
    if msg.utf8 and not caps.smtputf8 and not envelope_ascii:
        reply = f"553 5.6.7 relay {client.relay} does not support SMTPUTF8"
    else:
        msg.wire = wire.plan(msg.data, eightbit=caps.eightbitmime,
                             utf8_headers=caps.smtputf8 or not msg.utf8, size=msg.size)
        if msg.wire.refusal_code == "5.6.7" and msg.wire.refusal:
            reply = (f"553 5.6.7 relay {client.relay} does not support SMTPUTF8 and "
                     f"{msg.wire.refusal}")
        elif msg.wire.refusal:
            reply = (f"554 5.6.3 relay {client.relay} does not support 8BITMIME and the "
                     f"message cannot be converted: {msg.wire.refusal}")
        elif caps.size and msg.wire.size > caps.size:
            reply = f"552 5.3.4 Message is too large; {caps.size} bytes max at {client.relay}"
    if not reply:
        return None
    code = reply.split(" ")[1]
    return lambda addr: Outcome(addr, FAILED, reply, code)


def transaction(
    cfg: Config,
    client: SmtpClient,
    msg: OutgoingMessage,
    idx: list[int],
    outcomes: list[Outcome | None],
    reset: bool = False,
) -> tuple[str, int, list[int]]:
    """One MAIL/RCPT.../DATA transaction for recipients `idx`.

    Returns (a deferral reason, how many recipients the relay accepted and
    took the message for, the recipients it refused as too many: 452 or
    552 at RCPT, RFC 5321 4.5.3.1.10, to be tried in another transaction).
    `reset`: the connection carried an earlier transaction; its RSET goes in
    the same pipelined write as MAIL (one round trip per message, not two).
    """
    # message_deadline 0: none; else it grows with the size
    client.set_deadline(cfg.message_deadline and cfg.message_deadline
                        + msg.size / cfg.min_data_rate, "message transaction")
    mail_line, rcpts = _commands(client, msg, idx, outcomes)
    if mail_line is None:
        return "", 0, []
    if not rcpts:
        if reset:
            client.rset()
        return "", 0, []
    client.dirty = True
    mail_reply, rcpt_replies, data_reply = _envelope(client, mail_line, rcpts, reset)
    expect_final(client, mail_reply, "MAIL FROM")
    if not mail_reply.positive:
        discard_data(client, data_reply)
        status = FAILED if mail_reply.permanent else DEFERRED
        for i, _ in rcpts:
            outcomes[i] = Outcome(msg.recipients[i][0], status, str(mail_reply),
                                  mail_reply.dsn_code, remote=True)
        return (f"{mail_reply} (in reply to MAIL FROM)" if status == DEFERRED else ""), 0, []
    accepted, too_many = _recipients(client, msg, rcpts, rcpt_replies, outcomes)
    if not accepted:
        discard_data(client, data_reply)
        client.rset()
        return "", 0, []
    if data_reply is None:
        data_reply = client.command(proto.DATA, "DATA")
    expect_in_step(client, data_reply, "DATA")
    if data_reply.code != 354:
        if not (data_reply.transient or data_reply.permanent):
            client.close()
            raise ProtocolViolation(f"unexpected reply to DATA from {client.where}: {data_reply}")
        return settle(msg, accepted, data_reply, outcomes, "DATA"), 0, []
    final = _body(client, msg, accepted, outcomes)
    taken = len(accepted) if final.positive else 0
    return settle(msg, accepted, final, outcomes, "end of data"), taken, too_many


def _commands(client: SmtpClient, msg: OutgoingMessage, idx: list[int],
              outcomes: list[Outcome | None]) -> tuple[bytes | None, list[tuple[int, bytes]]]:
    """The MAIL line (None: refused, every recipient failed) and the RCPT lines that
    can be written; a recipient whose line cannot be written fails here."""
    caps = client.caps
    try:
        mail_line = proto.mail(msg.sender, proto.mail_params(
            caps, size=msg.wire.size if msg.wire else msg.size, body=msg.body,
            smtputf8=msg.utf8,
            ret=msg.ret, envid=msg.envid))
    except proto.CommandError as exc:
        for i in idx:
            outcomes[i] = Outcome(msg.recipients[i][0], FAILED,
                                  f"553 5.1.7 bad sender or parameter: {exc}", "5.1.7")
        return None, []
    rcpts: list[tuple[int, bytes]] = []
    for i in idx:
        addr, notify, orcpt = msg.recipients[i]
        try:
            rcpts.append((i, proto.rcpt(addr, proto.rcpt_params(caps, notify=notify,
                                                                 orcpt=orcpt))))
        except proto.CommandError as exc:
            outcomes[i] = Outcome(addr, FAILED, f"553 5.1.3 bad recipient: {exc}", "5.1.3")
    return mail_line, rcpts


def _envelope(client: SmtpClient, mail_line: bytes, rcpts: list[tuple[int, bytes]],
              reset: bool) -> tuple[Reply, list[Reply], Reply | None]:
    """Send RSET (if `reset`), MAIL, RCPTs (and DATA, pipelined); the replies to
    MAIL, to each RCPT, and to DATA (None: not sent yet)."""
    if client.caps.pipelining:
        group = [(mail_line, "MAIL FROM")] + [(line, "RCPT TO") for _, line in rcpts]
        if reset:
            group.insert(0, (proto.RSET, "RSET"))
        replies = client.pipeline([*group, (proto.DATA, "DATA")])
        if reset:
            rset_reply, *replies = replies
            if not rset_reply.positive:
                client.close()
                raise ConnectionLost(f"{client.where} refused RSET: {rset_reply}")
        return replies[0], replies[1:-1], replies[-1]
    mail_reply = client.command(mail_line, "MAIL FROM")
    rcpt_replies: list[Reply] = []
    if mail_reply.positive:
        rcpt_replies = [client.command(line, "RCPT TO") for _, line in rcpts]
    return mail_reply, rcpt_replies, None


def _recipients(client: SmtpClient, msg: OutgoingMessage, rcpts: list[tuple[int, bytes]],
                replies: list[Reply], outcomes: list[Outcome | None]
                ) -> tuple[list[int], list[int]]:
    """The RCPT replies: (accepted, refused as too many); a refusal is an outcome."""
    accepted: list[int] = []
    too_many: list[int] = []
    for (i, _), reply in zip(rcpts, replies, strict=True):
        expect_final(client, reply, "RCPT TO")
        expect_in_step(client, reply, "RCPT TO")
        if reply.positive:
            accepted.append(i)
        else:
            # 552 at RCPT is "too many recipients" (RFC 5321 4.5.3.1.10), like 452
            status = FAILED if reply.permanent and reply.code != 552 else DEFERRED
            if reply.code in (452, 552):
                too_many.append(i)
            outcomes[i] = Outcome(msg.recipients[i][0], status, str(reply), reply.dsn_code,
                                  remote=True)
    return accepted, too_many


def _body(client: SmtpClient, msg: OutgoingMessage, accepted: list[int],
          outcomes: list[Outcome | None]) -> Reply:
    """Send the data after 354; the reply to its final dot. Lost after the dot, the
    accepted recipients are deferred and marked unsure (the relay may have it)."""
    msg.data.seek(0)
    try:
        final = client.send_data(wire.wire_reader(msg.data, msg.wire) if msg.wire else msg.data)
    except SmtpError as exc:
        if client.after_dot:  # the relay may have taken it
            for i in accepted:
                outcomes[i] = Outcome(msg.recipients[i][0], DEFERRED, str(exc),
                                      exc.dsn_code, unsure=True)
        raise
    expect_final(client, final, "end of data")
    return final


def settle(msg: OutgoingMessage, accepted: list[int], reply: Reply,
           outcomes: list[Outcome | None], what: str) -> str:
    """The accepted recipients' outcome from the reply to DATA or its final dot."""
    status = SENT if reply.positive else FAILED if reply.permanent else DEFERRED
    for i in accepted:
        outcomes[i] = Outcome(msg.recipients[i][0], status, str(reply), reply.dsn_code,
                              remote=True)
    return f"{reply} (in reply to {what})" if status == DEFERRED else ""


def discard_data(client: SmtpClient, data_reply: Reply | None) -> None:
    """A pipelined DATA was accepted although nothing may follow: send an empty body."""
    if data_reply is not None and data_reply.code == 354:
        client.send(b".\r\n", "end of data")
        client.read_reply("end of data")


def expect_in_step(client: SmtpClient, reply: Reply, what: str) -> None:
    """503 (bad sequence) to RCPT or DATA after MAIL was accepted: the replies are
    out of step with the commands (an extra or a missing reply), so every later
    one answers something else. Defer, never bounce on a reply that may not be
    about this recipient."""
    if reply.code == 503:
        client.close()
        raise ProtocolViolation(f"replies from {client.where} out of step with the commands: "
                                f"{reply} to {what} after MAIL FROM was accepted")


def expect_final(client: SmtpClient, reply: Reply, what: str) -> None:
    """MAIL, RCPT and end of data never answer 1xx/3xx: that is a mis-paired reply."""
    if reply.intermediate:
        client.close()
        raise ProtocolViolation(f"unexpected reply to {what} from {client.where}: {reply}")
