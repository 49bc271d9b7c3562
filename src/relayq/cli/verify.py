"""`sendmail -bv`: the route each recipient would really take, in sendmail's shape.

Nothing here decides a route: the funnel's `Context.route` says whether a
recipient is delivered here, forwarded (local_forward) or relayed; the
runner's local transport expands aliases and :include: files and names each
mailbox, file and program; `smtp_connect.mx_route` gives a smarthost's MX
hosts as a delivery would look them up. One line per final recipient, as
sendmail prints them, with the alias or forward that led there first:

    root@host.example.org... aliased to admin@example.org, \\alice
    admin@example.org... deliverable: mailer relay, host [smtp.example.org]:587, user ...
    \\alice... deliverable: mailer local, user alice (/var/mail/alice)
    bob@host.example.org... User unknown

With [account.NAME] tables, a relayed recipient's line names the account the
sender (-f, else the caller) would be queued for, and that account's smarthosts:
`mailer relay, account shop, host [smtp.example.com]:587, user ...`.

Exit 67 (EX_NOUSER) when any recipient is undeliverable, else 75 when one
would wait (an unreadable :include:), else 0. It reads the configuration,
the aliases and the passwd database, never the queue, so any user may ask.
"""

from __future__ import annotations

from relayq.core import address, aliases
from relayq.core.errors import EX_NOUSER, EX_OK, EX_TEMPFAIL, UsageError
from relayq.core.outcome import DEFERRED, FAILED
from relayq.delivery import local_transport as lt
from relayq.delivery import smtp_connect
from relayq.queue.submit import FORWARD, LOCAL, Context
from relayq.smtp.client import SmtpError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config


def verify(cfg: Config, arguments: list[str], out: Callable[[str], None] = print,
           sender: str | None = None) -> int:
    """Print the route of every recipient in `arguments` (sendmail's argv form); the
    exit code says whether all are deliverable. `sender` (-f; None: the caller's
    login) chooses the account relayed mail would go through, as submission does."""
    if not arguments:
        raise UsageError("Recipient names must be specified")
    ctx = Context(cfg)
    rcpts = [(address.qualify(rcpt, ctx.domain),  # as submission qualifies them
              not address.split(rcpt)[1])
             for arg in arguments for rcpt in address.parse_recipient_args(arg)]
    route = Route(cfg, ctx, out)
    if len(cfg.accounts()) > 1:
        route.account = _account(cfg, ctx, sender)
    for rcpt, bare in rcpts:
        route.recipient(rcpt, bare)
    return route.status


def _account(cfg: Config, ctx: Context, sender: str | None) -> Config:
    """The account serving the envelope sender the submission would make (generics,
    all_mail_from), as queue/submit chooses it."""
    from relayq.cli.submission import user_names
    from relayq.queue.submit import account_for, sender_addresses

    raw = user_names()[0] if sender is None else \
        address.parse_mailbox(sender, "sender") if sender else ""
    envelope = sender_addresses(ctx, raw)[1] if raw else ""
    return cfg.accounts()[account_for(cfg, envelope) or "default"]


class Route:
    """The walk over one -bv command's recipients, printing as it goes."""

    def __init__(self, cfg: Config, ctx: Context, out: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.out = out
        self.local = lt.LocalTransport(cfg, ctx.domain, ctx.forward_domains)  # the runner's
        self.status = EX_OK
        self._seen: set[str] = set()
        self._hosts = ""
        self.account: Config | None = None  # the sender's, when there are several

    def recipient(self, rcpt: str, bare: bool = False) -> None:
        kind, where = self.ctx.route(rcpt, bare)
        if kind == FORWARD:
            self.out(f"{rcpt}... forwarded to {where} (local_forward)")
            self.relay(where)
        elif kind == LOCAL:
            self.local_recipient(rcpt)
        else:
            self.relay(rcpt)

    def local_recipient(self, rcpt: str) -> None:
        if lt.is_record(rcpt):  # typed as "|command": never run (local_transport)
            self.fail(rcpt, "User unknown")
            return
        exp = self.local.expand(rcpt)
        if exp.status == lt.DELIVER and exp.direct is not None:
            self.target(rcpt, exp.direct)
        elif exp.status in (FAILED, DEFERRED):
            self.fail(rcpt, exp.reply, temporary=exp.status == DEFERRED)
        else:
            self.out(f"{rcpt}... aliased to {', '.join(exp.records)}")
            for record in exp.records:
                found = exp.targets.get(record)
                if found is None:
                    self.relay(record)  # a remote address: relayed as it is
                else:
                    self.target(record, found)
            for name in exp.unknown:
                self.fail(name, "User unknown")

    def target(self, shown: str, target: lt.LocalTarget) -> None:
        """A mailbox, file or program, or the reply refusing it."""
        refused = self.local.refusal(target)
        if refused:
            self.fail(shown, refused)
        elif target.kind == aliases.USER:
            user = self.local.user(target.value)
            path = f" ({self.local.mailbox_path(user)})" if user is not None else ""
            self.final(shown, f"deliverable: mailer local, user {target.value}{path}")
        elif target.kind == aliases.FILE:
            self.final(shown, f"deliverable: mailer *file*, user {target.value}")
        else:
            self.final(shown, f"deliverable: mailer prog, user {target.record}")

    def relay(self, rcpt: str) -> None:
        self.final(rcpt, f"deliverable: mailer relay, {self.hosts()}, user {rcpt}")

    def hosts(self) -> str:
        """Every smarthost in order, with the MX hosts it stands for (looked up once)."""
        if not self._hosts:
            shown = []
            cfg = self.account or self.cfg
            for sh in cfg.smarthosts():
                text = repr(sh)
                try:
                    mx = smtp_connect.mx_route(cfg, sh.host, sh.mx)
                except SmtpError as exc:  # one line; the message would wait for DNS
                    text += f" ({exc})"
                else:
                    if mx == []:
                        text += " (no MX record)"
                    elif mx:
                        text += f" (MX: {', '.join(mx)})"
                shown.append(text)
            self._hosts = "host " + ", then ".join(shown)
            if self.account is not None:
                self._hosts = f"account {self.account.account}, {self._hosts}"
        return self._hosts

    def fail(self, shown: str, reply: str, *, temporary: bool = False) -> None:
        """An undeliverable recipient (exit 67), or one that would wait (75)."""
        text = _text(reply, shown)
        if temporary:
            self.final(shown, f"deferred: {text}")
            if self.status == EX_OK:
                self.status = EX_TEMPFAIL
        else:
            self.final(shown, text)
            self.status = EX_NOUSER

    def final(self, shown: str, what: str) -> None:
        """One line per final recipient, the first time it is reached."""
        key = shown if lt.is_record(shown) else shown.lower()
        if key not in self._seen:
            self._seen.add(key)
            self.out(f"{shown}... {what}")


def _text(reply: str, shown: str) -> str:
    """A reply without its codes and the address it starts with: "User unknown"."""
    words = reply.split(" ", 2)
    if len(words) == 3 and words[0].isdigit() and words[1][:1] in "245" and "." in words[1]:
        reply = words[2]
    return reply.removeprefix(f"<{shown}>... ")
