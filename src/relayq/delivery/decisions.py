"""The runner's decisions: pure functions of an envelope, the relay's results and the clock.

Nothing here reads a file, a socket or the time: the runner (relayq.delivery.runner)
calls these between the records it makes, and decide() composes them in the
runner's order for the unit tests. Each function changes only the Envelope it
is given (an in-memory record) and returns what is to be said, as data:

- start_attempt: the attempt count and the next try (capped backoff);
- apply: the relay's per-recipient outcomes to the recipients' states, once each,
  with the log notes (a recipient accepted once is never pending again);
- should_expire / expire: mail still pending past max_queue_age is returned,
  only after a failed attempt (as Postfix) and never for a mail loop;
- expand_alias: an alias's bookkeeping (new recipients, unknown users);
- reports / made / mark: the reports the recorded state owes (a bounce, a delay
  warning, a postmaster copy, or a dead letter), each recipient reported once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from relayq.core import address, dsn, policy
from relayq.core.envelope import BOUNCE, DOUBLE, WARNING, Envelope, Recipient
from relayq.core.outcome import DEFERRED, FAILED, PENDING, SENT, Outcome

if TYPE_CHECKING:
    from collections.abc import Sequence

    from relayq.core.config import Config

# Steps of settling besides making a report (BOUNCE, WARNING, DOUBLE): no report wanted
# (NOTIFY), a dead letter (a failed notice to the postmaster), no delay warning owed.
UNWANTED = "unwanted"
DEAD = "dead"
WARNED = "warned"


@dataclass(frozen=True)
class Rules:
    """The settings the decisions depend on (seconds; the defaults are config's)."""

    retry_min: float = 300.0
    retry_max: float = 4000.0
    max_queue_age: float = 5 * 86400.0
    delay_warning: float = 0.0  # 0: no delay warnings

    @classmethod
    def of(cls, cfg: Config) -> Rules:
        return cls(cfg.retry_min, cfg.retry_max, cfg.max_queue_age, cfg.delay_warning)


class Note(NamedTuple):
    """One recipient's outcome, for the log and -v (relayq.delivery.logline)."""

    recipient: Recipient
    mailer: str  # "local", "relay", "relay, relay=HOST [IP]"
    status: str  # SENT | FAILED | DEFERRED
    reply: str
    dsn_code: str


class Step(NamedTuple):
    """One step of settling: a report to make (kind BOUNCE, WARNING or DOUBLE) about
    the recipients at `indices`, or UNWANTED, DEAD or WARNED bookkeeping."""

    kind: str
    indices: list[int]


@dataclass
class Decision:
    """What one attempt decided (see decide)."""

    notes: list[Note]
    expired: list[tuple[Recipient, str]]  # recipient, the last reason it quotes
    steps: list[Step]


def code(reply: str) -> str:
    return dsn.status_code(reply)


def start_attempt(env: Envelope, now: float, rules: Rules, spread: float) -> None:
    """An attempt begins: counted, and the next one scheduled (spread: a draw in [0, 1))."""
    env.attempts += 1
    env.last_try = now
    env.next_try = now + policy.next_delay(env.attempts, rules.retry_min, rules.retry_max,
                                           spread)


def later(env: Envelope, now: float, rules: Rules, spread: float) -> None:
    """A report that failed is tried again on the retry schedule, not at once."""
    env.next_try = max(env.next_try, now + policy.next_delay(
        max(1, env.attempts), rules.retry_min, rules.retry_max, spread))


def apply(env: Envelope, pending: Sequence[Recipient], outcomes: Sequence[Outcome | None],
          applied: dict[int, Outcome], mailer: str) -> tuple[list[Note], str]:
    """Apply the outcomes not applied yet (`applied` remembers them, by position in
    `pending`); returns their notes and the first deferral reply among them.

    Only a pending recipient changes: a relay's late or repeated answer never
    takes back an acceptance or a failure already recorded.
    """
    notes: list[Note] = []
    deferral = ""
    for i, out in enumerate(outcomes):
        if out is None or applied.get(i) is out:
            continue
        applied[i] = out
        r = pending[i]
        if r.state != PENDING:
            continue
        notes.append(Note(r, mailer, out.status, out.reply, out.dsn_code))
        r.reply = out.reply
        r.remote = out.remote
        env.unsure = env.unsure or out.unsure
        if out.status == SENT:
            r.state = SENT
        elif out.status == FAILED:
            r.state = FAILED
        else:
            deferral = deferral or out.reply
    return notes, deferral


def deferred(error: str) -> str:
    """The envelope's `error` while recipients wait (mailq shows it)."""
    return "Deferred: " + error


def waits_on_us(r: Recipient) -> bool:
    """Does this recipient wait on a mail loop, a revoked OAuth2 grant, a removed
    account or a sending limit (policy.waits_on_us)? Our own configuration's fault,
    or a provider's quota, is no reason to return it, whatever its age."""
    return code(r.reply) == policy.LOOP_STATUS or policy.waits_on_us(r.reply, r.remote)


def should_expire(env: Envelope, now: float, rules: Rules) -> bool:
    """After an attempt: is some of the mail still pending to be returned? Only once
    it is older than max_queue_age, and only for the pending recipients that do not
    wait on us (waits_on_us): those keep waiting, each on its own."""
    return (policy.expired(env.created, now, rules.max_queue_age)
            and any(not waits_on_us(r) for r in env.pending()))


def expire(env: Envelope, rules: Rules) -> list[tuple[Recipient, str]]:
    """Fail every pending recipient that does not wait on us (4.4.7), quoting its
    last reason; the others stay pending."""
    span = age_text(rules.max_queue_age)
    out = []
    for r in env.pending():
        if waits_on_us(r):
            continue
        reason = r.reply or env.error or "no delivery attempt succeeded"
        r.state = FAILED
        r.remote = False  # our decision, quoting the last reason
        r.reply = f"4.4.7 Message could not be delivered for {span}: {reason}"
        out.append((r, reason))
    return out


def age_text(age: float) -> str:
    return (f"{age / 86400:g} days" if age >= 86400 and age % 3600 == 0
            else f"{age / 3600:g} hours" if age >= 3600 and age % 60 == 0
            else f"{age:g} seconds")


def expand_alias(env: Envelope, r: Recipient, records: list[str], unknown: list[str],
                 orcpt: str, domain: str, known: set[str]) -> list[tuple[Recipient, str]]:
    """An alias's bookkeeping: `records` join the envelope as pending recipients (once
    each: `known` holds the addresses already there), and `r` is marked sent,
    "expanded to ...". Unknown users become new recipients that fail; they are
    returned with their reply, not added: the caller adds them after the writes."""
    for rec in records:
        if rec not in known:
            known.add(rec)
            env.recipients.append(Recipient(rec, notify=r.notify, orcpt=orcpt))
    failing = []
    for name in unknown:
        addr = f"{name}@{address.split(r.address)[1] or domain}"
        if addr not in known:
            known.add(addr)
            failing.append((Recipient(addr, PENDING, r.notify, orcpt),
                            f"550 5.1.1 <{addr}>... User unknown"))
    r.state = SENT
    r.reply = expanded(records)
    return failing


def expanded(records: list[str]) -> str:
    """The reply recorded for an expanded alias (shown by mailq and in the log)."""
    text = ", ".join(records)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"250 2.1.5 expanded to {text}"


def reports(env: Envelope, now: float, rules: Rules) -> list[Step]:
    """What the recorded state owes, in order: for the failures not yet reported, a
    bounce to the sender (those whose NOTIFY wants one) and UNWANTED for the rest;
    for a bounce's or the null sender's failures a postmaster copy (DOUBLE), or,
    when that copy itself failed, DEAD; then the one delay warning, if it is due
    (WARNED when no pending recipient wants it). Call it with no notice in hand."""
    steps: list[Step] = []
    owed = env.owed()
    if owed:
        if dsn.should_bounce(env):
            wanted = [i for i in owed if dsn.wanted(env.recipients[i], dsn.FAILED)]
            if wanted:
                steps.append(Step(BOUNCE, wanted))
            if len(wanted) < len(owed):  # NOTIFY said no: the sender's choice
                steps.append(Step(UNWANTED, [i for i in owed if i not in wanted]))
        elif env.double_bounce:  # a notice to the postmaster that failed: nobody is left
            steps.append(Step(DEAD, owed))
        else:  # a bounce or the null sender's mail failed: the postmaster is told
            steps.append(Step(DOUBLE, owed))
    if (rules.delay_warning and not env.warned and env.pending()
            and dsn.should_bounce(env) and now - env.created >= rules.delay_warning):
        delayed = [i for i, r in enumerate(env.recipients)
                   if r.state == PENDING and dsn.wanted(r, dsn.DELAYED)]
        steps.append(Step(WARNING, delayed) if delayed else Step(WARNED, []))
    return steps


def made(env: Envelope, kind: str, indices: list[int]) -> None:
    """A report is committed: its recipients are reported (a warning: the sender warned)."""
    if kind == WARNING:
        env.warned = True
    else:
        env.reported.update(indices)


def mark(env: Envelope, step: Step) -> None:
    """The bookkeeping of an UNWANTED, DEAD or WARNED step."""
    if step.kind == WARNED:
        env.warned = True
        return
    env.reported.update(step.indices)
    if step.kind == DEAD:
        first = env.recipients[step.indices[0]]
        env.dead = f"undeliverable notice to the postmaster <{first.address}>: {first.reply}"


def max_full(chosen: Sequence[Recipient]) -> int:
    """How much of the message a report may quote: refused for its size, the same
    relay would refuse it inside a report, so then only the headers."""
    return 0 if any(code(r.reply) in ("5.3.4", "5.2.3") for r in chosen) else 1_000_000


def decide(env: Envelope, results: Sequence[Outcome], now: float, rules: Rules,
           error: str = "", spread: float = 0.5) -> Decision:
    """One attempt in full, without I/O: the relay's `results` for the pending
    recipients (in order) applied, expiry, and the reports owed, each taken as
    made. The runner makes the same calls in this order, recording between them."""
    notes: list[Note] = []
    expired: list[tuple[Recipient, str]] = []
    pending = env.pending()
    if pending:
        start_attempt(env, now, rules, spread)
        notes, deferral = apply(env, pending, results, {}, "relay")
        if env.pending():
            env.error = deferred(error or deferral)
        if should_expire(env, now, rules):
            expired = expire(env, rules)
    steps = reports(env, now, rules)
    for step in steps:
        if step.kind in (BOUNCE, WARNING, DOUBLE):
            made(env, step.kind, step.indices)
        else:
            mark(env, step)
    return Decision(notes, expired, steps)


def all_deferred(pending: Sequence[Recipient], reply: str) -> list[Outcome]:
    """The outcomes of an attempt that reached no relay (for tests and callers)."""
    return [Outcome(r.address, DEFERRED, reply, code(reply)) for r in pending]
