"""The runner applies exactly what decisions.decide decides: one real attempt against a
loopback smarthost, recorded by the real Runner, against the same answers given to the
pure function (tests/unit/test_decisions.py tests the rules themselves)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import Relayq

from relayq.core.errors import EX_OK
from relayq.core.outcome import DEFERRED, FAILED, SENT, Outcome
from relayq.delivery import decisions
from relayq.delivery.runner import Runner
from relayq.queue.submit import Context
from relayq.system import configfile
from relayq.system.log import Log

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

MSG = b"Subject: decisions\n\nbody\n"
REPLIES = {"bad@example.org": "550 5.1.1 no such user", "later@example.org": "451 4.3.0 busy"}


def test_one_attempt_records_what_decide_decides(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(rcpt_replies=REPLIES)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue")
    rcpts = ["good@example.org", "bad@example.org", "later@example.org"]
    assert rq.sendmail("-f", "alice@example.org", *rcpts, input=MSG).returncode == EX_OK
    [(before, _)] = rq.queued()
    qid = before.qid
    cfg = configfile.load(str(rq.config), explicit=True)
    with Runner(cfg, rq.spool, Log(use_syslog=False, path=str(rq.log_file)),
                Context(cfg)) as runner:
        assert runner.process(qid, force=True) == 1  # "later" waits
        assert runner.reports_left == 0  # the bounce went out over the same connection
    after = rq.spool.read_envelope(qid)
    expected = copy.deepcopy(before)
    answers = {"good@example.org": Outcome("", SENT, "250 2.0.0 Ok", "2.0.0", remote=True)}
    for addr, reply in REPLIES.items():
        status = FAILED if reply.startswith("5") else DEFERRED
        answers[addr] = Outcome(addr, status, reply, decisions.code(reply), remote=True)
    d = decisions.decide(expected, [answers[r.address] for r in expected.pending()],
                         after.last_try, runner.rules)
    assert [r.state for r in after.recipients] == [r.state for r in expected.recipients]
    assert after.reported == expected.reported == {1}
    assert [s.kind for s in d.steps] == ["bounce"]
    assert after.attempts == expected.attempts == 1
    assert [n.recipient.address for n in d.notes] == rcpts
    assert sum(1 for t in sh.transactions if t.mail_from in ("", "<>")) == 1  # the bounce
