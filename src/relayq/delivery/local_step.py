"""The local recipients of one attempt: aliases expanded, mailboxes written.

Runner's share of local delivery (local_delivery on), kept apart from the
queue-run loop in delivery/runner: each local write is recorded at once, so
a crash repeats at most the one write in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayq.core.outcome import DEFERRED, FAILED, SENT
from relayq.delivery import decisions
from relayq.delivery.decisions import Note

if TYPE_CHECKING:
    from relayq.core.config import Config
    from relayq.core.envelope import Envelope, Recipient
    from relayq.delivery.local_transport import LocalTarget, LocalTransport
    from relayq.queue.claim import Claim
    from relayq.queue.submit import Context


class LocalStep:
    """Mixed into Runner: what it does with the recipients in local_domains."""

    cfg: Config
    ctx: Context
    _local: LocalTransport | None

    if TYPE_CHECKING:
        def _note(self, env: Envelope, note: Note, now: float, start: float) -> None: ...

    def local(self) -> LocalTransport:
        if self._local is None:
            from relayq.delivery.local_transport import LocalTransport

            # this host's domains as the funnel decides them (Context.route)
            self._local = LocalTransport(self.cfg, self.ctx.domain, self.ctx.forward_domains)
        return self._local

    def _deliver_local(
        self, claim: Claim, mine: list[Recipient], now: float, start: float
    ) -> tuple[list[Recipient], str]:
        """Expand and deliver local recipients; returns (failed, first deferral reply).

        An alias becomes new pending recipients (remote addresses and local
        targets) and is itself marked sent, "expanded to ...". Each local
        write is recorded at once, so a crash repeats at most the one write
        in flight. Failures are applied last, after every successful write
        was recorded: a failure on disk always has its bounce (made by
        deliver() before the final record).
        """
        env = claim.envelope
        failures: list[tuple[Recipient, str]] = []
        added_failed: list[Recipient] = []  # unknown users an alias named: added last
        jobs, deferral = self._expand_local(env, mine, now, start, failures, added_failed)
        jobs += self._recorded_targets(env, failures)
        if jobs:
            claim.record()  # the expansions, before anything is written
            written = self._write_local(claim, jobs, now, start, failures)
            deferral = deferral or written
        env.recipients.extend(added_failed)
        failed = []
        for r, reply in failures:
            r.state = FAILED
            r.reply = reply
            failed.append(r)
            self._note(env, Note(r, "local", FAILED, reply, decisions.code(reply)), now, start)
        return failed, deferral

    def _expand_local(self, env: Envelope, mine: list[Recipient], now: float, start: float,
                      failures: list[tuple[Recipient, str]], added_failed: list[Recipient],
                      ) -> tuple[list[tuple[Recipient, LocalTarget]], str]:
        """Expand each local recipient: (its own mailbox's jobs, the first deferral);
        aliases are expanded in place (decisions.expand_alias)."""
        from relayq.delivery import local_transport as lt

        transport = self.local()
        deferral = ""
        known = {r.address for r in env.recipients}
        jobs: list[tuple[Recipient, LocalTarget]] = []
        for r in mine:
            if lt.is_record(r.address):
                continue
            exp = transport.expand(r.address)
            if exp.status == lt.DELIVER and exp.direct is not None:
                jobs.append((r, exp.direct))
            elif exp.status == DEFERRED:
                r.reply = exp.reply
                deferral = deferral or exp.reply
                self._note(env, Note(r, "local", DEFERRED, exp.reply,
                                     decisions.code(exp.reply)), now, start)
            elif exp.status == FAILED:
                failures.append((r, exp.reply))
            else:
                orcpt = r.orcpt or lt.orcpt_for(r.address)
                failing = decisions.expand_alias(env, r, exp.records, exp.unknown, orcpt,
                                                 self.ctx.domain, known)
                added_failed += [bad for bad, _ in failing]
                failures += failing
                self._note(env, Note(r, "local", SENT, r.reply, "2.1.5"), now, start)
        return jobs, deferral

    def _recorded_targets(self, env: Envelope, failures: list[tuple[Recipient, str]]
                          ) -> list[tuple[Recipient, LocalTarget]]:
        """Jobs for the local targets recorded as recipients ("|cmd", "/file", "\\user"):
        only those the current aliases still expand some other recipient of the
        message to; any other is an unknown user (it may have been typed)."""
        from relayq.delivery import local_transport as lt

        transport = self.local()
        jobs: list[tuple[Recipient, LocalTarget]] = []
        trusted: dict[str, LocalTarget] | None = None
        for r in env.pending():
            if not lt.is_record(r.address):
                continue
            if trusted is None:
                originals = [
                    x.address for x in env.recipients
                    if x.state != FAILED and not lt.is_record(x.address)
                    and transport.local_part(x.address) is not None
                ]
                trusted = transport.trusted_targets(originals)
            target = trusted.get(r.address)
            if target is None:
                failures.append((r, f"550 5.1.1 <{r.address}>... User unknown "
                                    "(no alias of this message names it now)"))
            else:
                jobs.append((r, target))
        return jobs

    def _write_local(self, claim: Claim, jobs: list[tuple[Recipient, LocalTarget]],
                     now: float, start: float, failures: list[tuple[Recipient, str]]) -> str:
        """Write each job, recording each success at once; the first deferral reply."""
        from relayq.delivery import local_transport as lt

        env = claim.envelope
        transport = self.local()
        deferral = ""
        with claim.open_data() as data:
            for r, target in jobs:
                to = r.address
                if lt.is_record(r.address):
                    to = lt.delivered_to(r.address, r.orcpt, target, self.ctx.domain)
                out = transport.deliver(target, data, sender=env.sender, recipient=to, now=now)
                self._note(env, Note(r, "local", out.status, out.reply, out.dsn_code), now,
                           start)
                if out.status == SENT:
                    r.state = SENT
                    r.reply = out.reply
                    claim.record()
                elif out.status == FAILED:
                    failures.append((r, out.reply))
                else:
                    r.reply = out.reply
                    deferral = deferral or out.reply
        return deferral
