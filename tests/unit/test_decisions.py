"""The runner's decisions (relayq.delivery.decisions) with a fake clock: no files, no
sockets, no sleeps. The clock is a number passed in; it may go back."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.core import policy
from relayq.core.envelope import BOUNCE, DOUBLE, WARNING, Envelope, Notice, Recipient
from relayq.core.outcome import DEFERRED, FAILED, PENDING, SENT, Outcome, Status
from relayq.delivery import decisions, logline
from relayq.delivery.decisions import DEAD, UNWANTED, WARNED, Note, Rules, Step

T0 = 1_764_120_000.0
DAY = 86400.0
RULES = Rules(retry_min=300, retry_max=4000, max_queue_age=5 * DAY, delay_warning=4 * 3600)
LOOP = f"{policy.LOOP_REASON} (smarthost [127.0.0.1]:25 is this relayq's own listener)"


def envelope(*addrs: str, sender: str = "alice@example.org", notify: str = "") -> Envelope:
    env = Envelope("6AQ1UaXXXX0001", sender, [Recipient(a, notify=notify) for a in addrs], T0)
    env.size = 100
    return env


def sent(addr: str) -> Outcome:
    return Outcome(addr, SENT, "250 2.0.0 Ok: queued as X", "2.0.0", remote=True)


def failed(addr: str) -> Outcome:
    return Outcome(addr, FAILED, "550 5.1.1 no such user", "5.1.1", remote=True)


def deferred(addr: str, reply: str = "451 4.3.0 try later") -> Outcome:
    return Outcome(addr, DEFERRED, reply, decisions.code(reply), remote=True)


def lost(addr: str, unsure: bool = False) -> Outcome:
    return Outcome(addr, DEFERRED, "4.4.2 connection lost", "4.4.2", unsure=unsure)


# -- the words ---------------------------------------------------------------------------


def test_outcome_words_are_the_queue_file_format() -> None:
    assert (Status.PENDING, Status.SENT, Status.FAILED, Status.DEFERRED) == (
        "pending", "sent", "failed", "deferred")
    env = envelope("a@example.org", "b@example.org", "c@example.org")
    env.recipients[1].state = SENT
    env.recipients[2].state = FAILED
    raw = env.dumps()
    assert b"rcpt\tpending\t" in raw and b"rcpt\tsent\t" in raw and b"rcpt\tfailed\t" in raw
    back = Envelope.loads(raw, env.qid)
    assert [r.state for r in back.recipients] == [PENDING, SENT, FAILED]


def test_outcome_words_cost_the_submission_path_no_heavy_import() -> None:
    """The envelope (on the sendmail path) takes its words from core.outcome: plain
    str constants, so no enum, typing or dataclasses comes with them."""
    probe = ("import sys, relayq.core.outcome, relayq.core.envelope; "
             "print(sorted(m for m in ('enum', 'typing', 'dataclasses') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, check=True,
                         timeout=60)
    assert out.stdout.decode().strip() == "[]"


def test_outcome_compares_by_value() -> None:
    assert sent("a@x") == sent("a@x")
    assert sent("a@x") != failed("a@x")
    assert "remote=True" in repr(sent("a@x"))


# -- one attempt --------------------------------------------------------------------------


def test_start_attempt_counts_and_schedules_within_the_cap() -> None:
    env = envelope("a@example.org")
    for n in range(1, 20):
        decisions.start_attempt(env, T0 + n, RULES, 0.999)
        assert env.attempts == n and env.last_try == T0 + n
        assert 0 < env.next_try - env.last_try <= RULES.retry_max


def test_apply_once_per_outcome_and_never_after_a_final_state() -> None:
    env = envelope("a@example.org", "b@example.org")
    pending = env.pending()
    applied: dict[int, Outcome] = {}
    first = [sent("a@example.org"), deferred("b@example.org")]
    notes, deferral = decisions.apply(env, pending, first, applied, "relay")
    assert [n.status for n in notes] == [SENT, DEFERRED]
    assert deferral == "451 4.3.0 try later"
    assert decisions.apply(env, pending, first, applied, "relay") == ([], "")  # nothing new
    # a later transaction: b is taken now; a relay repeating "a" failed changes nothing
    notes, _ = decisions.apply(env, pending, [failed("a@example.org"), sent("b@example.org")],
                               applied, "relay")
    assert [n.recipient.address for n in notes] == ["b@example.org"]
    assert [r.state for r in env.recipients] == [SENT, SENT]
    assert env.recipients[0].reply.startswith("250")


def test_apply_keeps_the_relays_words_and_a_lost_reply() -> None:
    env = envelope("a@example.org")
    decisions.apply(env, env.pending(), [lost("a@example.org", unsure=True)], {}, "relay")
    assert env.unsure and env.recipients[0].state == PENDING
    assert not env.recipients[0].remote
    decisions.apply(env, env.pending(), [failed("a@example.org")], {}, "relay")
    assert env.recipients[0].remote and env.recipients[0].state == FAILED


def test_expiry_only_when_old_and_still_pending() -> None:
    env = envelope("a@example.org")
    assert not decisions.should_expire(env, T0 + 6 * DAY, Rules(max_queue_age=0))
    env.recipients[0].reply = "451 4.3.0 try later"
    assert not decisions.should_expire(env, T0 + 5 * DAY - 1, RULES)
    assert decisions.should_expire(env, T0 + 5 * DAY, RULES)
    [(r, reason)] = decisions.expire(env, RULES)
    assert reason == "451 4.3.0 try later"
    assert r.state == FAILED and not r.remote
    assert r.reply == "4.4.7 Message could not be delivered for 5 days: 451 4.3.0 try later"
    assert not decisions.should_expire(env, T0 + 9 * DAY, RULES)  # nothing pending


def test_expiry_never_for_a_mail_loop() -> None:
    env = envelope("a@example.org", "b@example.org")
    for r in env.recipients:
        r.reply = LOOP
    assert not decisions.should_expire(env, T0 + 30 * DAY, RULES)
    env.recipients[1].reply = "451 4.3.0 try later"  # one waits on something else: it expires
    assert decisions.should_expire(env, T0 + 30 * DAY, RULES)
    [(r, _)] = decisions.expire(env, RULES)  # ... alone: the loop's recipient keeps waiting
    assert r is env.recipients[1] and env.recipients[0].state == PENDING
    assert not decisions.should_expire(env, T0 + 31 * DAY, RULES)


@pytest.mark.parametrize("reason", policy.OUR_WAITS)
def test_expiry_spares_the_recipients_that_wait_on_us(reason: str) -> None:
    """Another recipient of the message expiring never returns one a limit (a dead
    grant, a removed account) holds: each recipient waits on its own reason."""
    env = envelope("a@example.org", "b@example.org")
    env.recipients[0].reply = f"4.7.0 {reason}: account shop"
    env.recipients[1].reply = "451 4.2.0 mailbox busy"
    env.recipients[1].remote = True
    assert decisions.should_expire(env, T0 + 30 * DAY, RULES)
    assert [r.address for r, _ in decisions.expire(env, RULES)] == ["b@example.org"]
    assert env.recipients[0].state == PENDING


@pytest.mark.parametrize("reply", [
    "[192.0.2.1] refused the connection: 421 4.7.0 sending limit reached for this IP",
    "AUTH XOAUTH2 failed at relay [192.0.2.1]: 535 re-authorization needed: run relayq "
    "oauth2 login", "4.7.0 the relay says: account no longer configured"])
def test_only_relayqs_own_replies_wait_on_us(reply: str) -> None:
    """A relay's words recorded as remote False (its greeting, its AUTH refusal) start
    with its name: quoting one of OUR_WAITS never holds the mail."""
    assert not policy.waits_on_us(reply, False)
    for ours in ("451 4.3.5 account no longer configured: shop",
                 "4.7.0 sending limit reached: recipients_per_day = 3",
                 "re-authorization needed: run relayq oauth2 login (account default)"):
        assert policy.waits_on_us(ours, False) and not policy.waits_on_us(ours, True)


@pytest.mark.parametrize("reason", policy.OUR_WAITS)
def test_expiry_never_while_mail_waits_on_us(reason: str) -> None:
    """A revoked OAuth2 grant, a removed account or a sending limit never returns mail;
    the same words in a relay's reply (remote) do not hold it."""
    env = envelope("a@example.org")
    env.recipients[0].reply = f"4.7.0 {reason} (account shop)"
    assert not decisions.should_expire(env, T0 + 30 * DAY, RULES)
    env.recipients[0].remote = True
    assert decisions.should_expire(env, T0 + 30 * DAY, RULES)


@pytest.mark.parametrize(("age", "text"), [
    (5 * DAY, "5 days"), (36 * 3600, "1.5 days"), (5400, "1.5 hours"), (90, "90 seconds"),
    (3600.5, "3600.5 seconds")])
def test_expiry_names_the_age(age: float, text: str) -> None:
    assert decisions.age_text(age) == text


def test_later_never_brings_the_next_try_forward() -> None:
    env = envelope("a@example.org")
    env.attempts, env.next_try = 3, T0 + 10 * DAY
    decisions.later(env, T0, RULES, 0.5)
    assert env.next_try == T0 + 10 * DAY
    env.next_try = 0
    decisions.later(env, T0, RULES, 0.5)
    assert env.next_try == T0 + 1200


# -- aliases -------------------------------------------------------------------------------


def test_expand_alias_adds_each_target_once_and_unknown_users_apart() -> None:
    env = envelope("team@example.org", "bob@example.org")
    team = env.recipients[0]
    known = {r.address for r in env.recipients}
    failing = decisions.expand_alias(env, team, ["bob@example.org", "carol@remote.example",
                                                 "|/usr/bin/log"], ["ghost"], "rfc822;team",
                                     "example.org", known)
    assert [r.address for r in env.recipients] == [
        "team@example.org", "bob@example.org", "carol@remote.example", "|/usr/bin/log"]
    assert all(r.orcpt == "rfc822;team" for r in env.recipients[2:])
    assert [(r.address, reply) for r, reply in failing] == [
        ("ghost@example.org", "550 5.1.1 <ghost@example.org>... User unknown")]
    assert team.state == SENT
    assert team.reply == ("250 2.1.5 expanded to bob@example.org, carol@remote.example, "
                          "|/usr/bin/log")


def test_expanded_reply_is_bounded() -> None:
    reply = decisions.expanded([f"user{i}@example.org" for i in range(100)])
    assert len(reply) == len("250 2.1.5 expanded to ") + 300 and reply.endswith("...")


# -- reports ------------------------------------------------------------------------------


def test_a_failure_is_owed_one_bounce_and_notify_never_is_logged_instead() -> None:
    env = envelope("a@example.org", "b@example.org", "c@example.org")
    env.recipients[1].notify = "NEVER"
    for r in env.recipients[:2]:
        r.state = FAILED
    steps = decisions.reports(env, T0, RULES)
    assert steps == [Step(BOUNCE, [0]), Step(UNWANTED, [1])]
    decisions.made(env, BOUNCE, [0])
    decisions.mark(env, steps[1])
    assert env.reported == {0, 1} and decisions.reports(env, T0, RULES) == []


def test_a_bounce_that_fails_goes_to_the_postmaster_and_then_nowhere() -> None:
    bounce = envelope("alice@example.org", sender="")
    bounce.is_dsn = True
    bounce.recipients[0].state = FAILED
    assert decisions.reports(bounce, T0, RULES) == [Step(DOUBLE, [0])]
    copy = envelope("postmaster@example.org", sender="")
    copy.is_dsn = copy.double_bounce = True
    copy.recipients[0].state = FAILED
    copy.recipients[0].reply = "550 5.1.1 gone"
    [step] = decisions.reports(copy, T0, RULES)
    assert step == Step(DEAD, [0])
    decisions.mark(copy, step)
    assert copy.dead == "undeliverable notice to the postmaster <postmaster@example.org>: " \
                        "550 5.1.1 gone"
    assert not copy.unsettled()


def test_a_notice_in_hand_is_not_owed_again() -> None:
    env = envelope("a@example.org")
    env.recipients[0].state = FAILED
    env.notice = Notice("6AQ1UaXXXX0002", BOUNCE, [0])
    assert env.owed() == []


def test_one_delay_warning_when_due_and_wanted() -> None:
    env = envelope("a@example.org", "b@example.org")
    assert decisions.reports(env, T0 + 4 * 3600 - 1, RULES) == []
    assert decisions.reports(env, T0 + 4 * 3600, RULES) == [Step(WARNING, [0, 1])]
    decisions.made(env, WARNING, [0, 1])
    assert env.warned and decisions.reports(env, T0 + DAY, RULES) == []
    quiet = envelope("a@example.org", notify="FAILURE")
    [step] = decisions.reports(quiet, T0 + DAY, RULES)
    assert step == Step(WARNED, [])
    decisions.mark(quiet, step)
    assert quiet.warned
    assert decisions.reports(envelope("a@example.org"), T0 + DAY, Rules()) == []  # off


def test_a_report_quotes_only_the_headers_of_mail_refused_for_its_size() -> None:
    big, other = Recipient("a@x"), Recipient("b@x")
    big.reply = "552 5.3.4 Message is too large"
    other.reply = "550 5.1.1 no"
    assert decisions.max_full([other, big]) == 0
    assert decisions.max_full([other]) == 1_000_000


# -- log lines -------------------------------------------------------------------------------


def test_note_lines_read_as_sendmails() -> None:
    env = envelope("a@example.org")
    r = env.recipients[0]
    line, shown = logline.note(env, Note(r, "relay, relay=mx.example [192.0.2.1]", SENT,
                                         "250 2.0.0 Ok: queued", "2.0.0"), T0 + 3725, 2)
    assert line == ("6AQ1UaXXXX0001: to=<a@example.org>, delay=01:02:05, xdelay=00:00:02, "
                    "mailer=relay, relay=mx.example [192.0.2.1], dsn=2.0.0, stat=Sent (Ok: queued)")
    assert shown == "a@example.org... Sent (Ok: queued)"
    line, shown = logline.note(env, Note(r, "relay", DEFERRED, "451 4.3.0 later", "4.3.0"),
                               T0 + DAY + 1, 0)
    assert line.endswith("delay=1+00:00:01, xdelay=00:00:00, mailer=relay, dsn=4.3.0, "
                         "stat=Deferred: 451 4.3.0 later")
    line, _ = logline.note(env, Note(r, "local", FAILED, "550 5.1.1 no", "5.1.1"), T0 - 5, 0)
    assert line.endswith("delay=00:00:00, xdelay=00:00:00, mailer=local, dsn=5.1.1, "
                         "stat=550 5.1.1 no")  # a clock that went back shows no delay
    assert logline.text("250 Ok") == "Ok" and logline.text("connection lost") == "connection lost"


def test_note_lines_name_a_non_default_account() -> None:
    # after the mailer (and its relay=), before dsn=: the default's lines stay as they were
    env = envelope("a@example.org")
    env.account = "shop"
    r = env.recipients[0]
    line, _ = logline.note(env, Note(r, "relay, relay=mx.example [192.0.2.1]", SENT,
                                     "250 2.0.0 Ok", "2.0.0"), T0, 0)
    assert "mailer=relay, relay=mx.example [192.0.2.1], account=shop, dsn=2.0.0, " in line
    line, _ = logline.note(env, Note(r, "local", SENT, "250 2.0.0 Ok", "2.0.0"), T0, 0)
    assert "account=" not in line  # a local mailbox is no account's relay
    assert "mailer=relay, account=shop, dsn=4.4.7, stat=Expired: " in \
        logline.expired(env, r, "451 later", T0)


def test_report_lines_read_as_sendmails() -> None:
    # the original's id, the report's, the kind in sendmail's words, and for a bounce
    # the reason exactly as the original's to= line gave it in stat= (logwatch pairs them)
    env = envelope("a@example.org")
    r = env.recipients[0]
    r.reply = "550 5.1.1 <a@example.org>... User unknown"
    line, _ = logline.note(env, Note(r, "relay", FAILED, r.reply, "5.1.1"), T0, 0)
    stat = line.split(", stat=", 1)[1]
    assert logline.report_made("kC26p6KE008517", env, False, [r], [], T0) == \
        f"{env.qid}: kC26p6KE008517: DSN: {stat}"
    assert logline.report_made("kC26p6KE008517", env, True, [r], [], T0) == \
        f"{env.qid}: kC26p6KE008517: postmaster notify: {stat}"
    assert logline.report_made("kC26p6KE008517", env, False, [], [r], T0 + 4 * 3600 + 59) == \
        f"{env.qid}: kC26p6KE008517: sender notify: Warning: could not send message for " \
        "past 4 hours"
    assert logline.report_queued("kC26p6KE008517", 2534) == \
        "kC26p6KE008517: from=<>, size=2534, class=0, nrcpts=1, relay=MAILER-DAEMON"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 minutes"), (60, "1 minute"), (3599, "59 minutes"), (3600, "1 hour"),
    (4 * 3600 + 1, "4 hours"), (47 * 3600, "47 hours"), (5 * DAY, "5 days"), (-5, "0 minutes")])
def test_warning_ages_read_as_sendmails(seconds: float, text: str) -> None:
    assert logline.age_text(seconds) == text


# -- sequences of attempts ----------------------------------------------------------------

KINDS = ("250", "451", "550", "lost", "lost-after-dot", "loop")


def result(kind: str, addr: str) -> Outcome:
    return {"250": sent, "550": failed, "451": deferred, "lost": lost,
            "lost-after-dot": lambda a: lost(a, unsure=True),
            "loop": lambda a: Outcome(a, DEFERRED, LOOP, policy.LOOP_STATUS)}[kind](addr)


attempts = st.lists(
    st.tuples(st.floats(min_value=-2 * DAY, max_value=3 * DAY),  # the clock's step
              st.lists(st.sampled_from(KINDS), min_size=4, max_size=4)),  # per recipient
    min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(attempts=attempts, sender=st.sampled_from(["alice@example.org", ""]),
       notify=st.sampled_from(["", "NEVER", "FAILURE", "DELAY"]),
       spread=st.floats(min_value=0, max_value=0.999))
def test_property_sequences_of_results(attempts: list[tuple[float, list[str]]], sender: str,
                                       notify: str, spread: float) -> None:
    addrs = ["a@example.org", "b@example.org", "c@example.org", "d@example.org"]
    env = envelope(*addrs, sender=sender, notify=notify)
    now = T0
    told: Counter[int] = Counter()  # failed recipients: how many reports named each
    warnings = 0
    for step, kinds in attempts:
        now += step
        states = [r.state for r in env.recipients]
        pending = env.pending()
        results = [result(kinds[addrs.index(r.address)], r.address) for r in pending]
        all_loops = all(kinds[addrs.index(r.address)] == "loop" for r in pending)
        d = decisions.decide(env, results, now, RULES, spread=spread)
        for before, r in zip(states, env.recipients, strict=True):
            if before != PENDING:  # final stays final, with its reply
                assert r.state == before
        if pending:
            assert env.last_try == now
            assert 0 < env.next_try - now <= RULES.retry_max  # bounded backoff
        else:
            assert d.notes == [] and d.expired == []  # no attempt: nothing tried
        if d.expired:  # only after an attempt that left recipients pending
            assert pending and now - env.created >= RULES.max_queue_age
            assert not all_loops
            # a loop's recipient is never among them (each waits on its own reason)
            assert all(kinds[addrs.index(r.address)] != "loop" for r, _ in d.expired)
            assert all(r.reply.startswith("4.4.7 ") for r, _ in d.expired)
        if pending and all_loops:
            assert d.expired == []  # never for a loop
        for s in d.steps:
            if s.kind in (BOUNCE, DOUBLE, UNWANTED, DEAD):
                told.update(s.indices)
            elif s.kind in (WARNING, WARNED):
                warnings += 1
        assert not env.owed()  # each report taken as made: nothing left owed
    final_failed = {i for i, r in enumerate(env.recipients) if r.state == FAILED}
    assert set(told) == final_failed  # every failed recipient reported ...
    assert all(n == 1 for n in told.values())  # ... exactly once
    assert warnings <= 1
    assert env.unsettled() == bool(env.pending())
    if not sender:
        assert not any(s.kind == BOUNCE for s in decisions.reports(env, now, RULES))


@settings(max_examples=200, deadline=None)
@given(kinds=st.lists(st.lists(st.sampled_from(KINDS), min_size=3, max_size=3), min_size=1,
                      max_size=6))
def test_property_transactions_of_one_attempt(kinds: list[list[str]]) -> None:
    """Several transactions' outcomes within one attempt (the journal's commits): a
    recipient accepted once is never pending again, whatever came after."""
    env = envelope("a@example.org", "b@example.org", "c@example.org")
    pending = env.pending()
    applied: dict[int, Outcome] = {}
    accepted: set[int] = set()
    for row in kinds:
        outs: list[Outcome | None] = [result(k, r.address) for k, r in zip(row, pending,
                                                                         strict=True)]
        decisions.apply(env, pending, outs, applied, "relay")
        accepted |= {i for i, r in enumerate(env.recipients) if r.state == SENT}
        assert all(env.recipients[i].state == SENT for i in accepted)
