"""The runner's log lines, sendmail's style: what a note or a report looks like in the log.

Pure formatting (the decisions return notes as data, relayq.delivery.decisions);
the runner holds the lines until the outcome they describe is recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayq.core.outcome import FAILED, SENT
from relayq.system.log import delay

if TYPE_CHECKING:
    from relayq.core.envelope import Envelope, Recipient
    from relayq.delivery.decisions import Note


def note(env: Envelope, n: Note, now: float, elapsed: float) -> tuple[str, str]:
    """The log line for one recipient's outcome, and what -v shows for it."""
    head = (
        f"{env.qid}: to=<{n.recipient.address}>, delay={delay(now - env.created)}, "
        f"xdelay={delay(elapsed)}, mailer={n.mailer}{account(env, n.mailer)}, dsn={n.dsn_code}"
    )
    if n.status == SENT:
        shown = f"Sent ({text(n.reply)})"
    elif n.status == FAILED:
        shown = n.reply
    else:
        shown = f"Deferred: {n.reply}"
    return f"{head}, stat={shown}", f"{n.recipient.address}... {shown}"


def expired(env: Envelope, r: Recipient, reason: str, now: float) -> str:
    return (f"{env.qid}: to=<{r.address}>, delay={delay(now - env.created)}, "
            f"mailer=relay{account(env, 'relay')}, dsn=4.4.7, stat=Expired: {reason}")


def account(env: Envelope, mailer: str) -> str:
    """`, account=NAME` for mail relayed for a non-default account (core/accounts);
    nothing for the default's, so its lines read as sendmail's."""
    return f", account={env.account}" if env.account and mailer.startswith("relay") else ""


def possible_duplicate(env: Envelope) -> str:
    why = ("lost the relay's reply to the end of the message" if env.unsure
           else "ended between sending the message and recording the outcome")
    return (f"{env.qid}: possible duplicate: an earlier attempt {why}; "
            "the smarthost may have it already")


def report_made(qid: str, env: Envelope, double: bool, failed: list[Recipient],
                delayed: list[Recipient], now: float) -> str:
    """The line naming a report just queued, as sendmail's: the original's id, the
    report's, then `DSN:` (a bounce), `sender notify:` (a delay warning) or
    `postmaster notify:` (a copy to the postmaster), and the reason as the
    original's to= line gave it in stat= (log parsers pair the two)."""
    if double:
        what = f"postmaster notify: {failed[0].reply}"
    elif failed:
        what = f"DSN: {failed[0].reply}"
    else:
        what = f"sender notify: Warning: could not send message for past " \
               f"{age_text(now - env.created)}"
    return f"{env.qid}: {qid}: {what}"


def report_queued(qid: str, size: int) -> str:
    return f"{qid}: from=<>, size={size}, class=0, nrcpts=1, relay=MAILER-DAEMON"


def age_text(seconds: float) -> str:
    """sendmail's `for past 4 hours`: whole hours (days from two days on), else minutes."""
    hours = int(max(0.0, seconds) // 3600)
    if hours >= 48:
        return f"{hours // 24} days"
    if hours:
        return f"{hours} hour{'s' if hours > 1 else ''}"
    minutes = int(max(0.0, seconds) // 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def text(reply: str) -> str:
    """The reply without its numeric codes, as sendmail's stat=Sent (...) shows it."""
    parts = reply.split(" ", 2)
    if len(parts) == 3 and parts[0].isdigit() and parts[1][:1].isdigit() and "." in parts[1]:
        return parts[2]
    if len(parts) >= 2 and parts[0].isdigit():
        return reply.split(" ", 1)[1]
    return reply
