"""The end of data, where a relay's fault is costliest (issue 6 §2): through the whole
runner, with the reason in mailq and the log."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq

from relayq.core.errors import EX_OK, EX_TEMPFAIL

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from relayq.testing.smarthost import RawSession, SmarthostFactory

MSG = b"Subject: eod\n\nbody\n"


def session(end: str, wait: float = 0.0) -> Callable[[RawSession], None]:
    """A relay that behaves until the final dot, then `end`s: drop, or 250 after `wait`."""

    def script(s: RawSession) -> None:
        s.send(b"220 raw.example.org ESMTP\r\n")
        while line := s.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                s.send(b"250-raw.example.org\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                s.send(b"354 go ahead\r\n")
                if not s.read_data():
                    return
                if end == "drop":
                    return  # the connection closes with no reply to the dot
                time.sleep(wait)
                s.send(b"250 2.0.0 queued as LATE\r\n")
            elif verb == b"QUIT":
                s.send(b"221 bye\r\n")
                return
            else:
                s.send(b"250 ok\r\n")

    return script


def test_connection_dropped_after_the_final_dot_defers_and_says_so(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    srv = smarthost_factory.scripted(script=session("drop"))
    rq = Relayq(tmp_path, smarthost=srv.smarthost)
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    [(env, _)] = rq.queued()
    assert env.pending() and env.attempts == 1  # not marked sent on a missing reply
    listing = rq.run("mailq").stdout.decode()
    assert "Deferred:" in listing and "[127.0.0.1]" in listing, listing
    assert "stat=Deferred" in rq.log()
    assert len(srv.messages) == 1  # the relay had it: the retry may duplicate, as anywhere
    assert "possible duplicate" not in rq.log()
    rq.sendmail("-q")  # issue 12 matrix: exactly one resend, with one warning line
    assert len(srv.messages) == 2
    assert rq.log().count("possible duplicate: an earlier attempt lost the relay's reply") == 1


@pytest.mark.timeout(240)  # the relay waits 30 s by design
def test_a_final_250_after_thirty_seconds_is_a_delivery(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    srv = smarthost_factory.scripted(script=session("late", wait=30.5))
    rq = Relayq(tmp_path, smarthost=srv.smarthost, timeout=60)
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    start = time.monotonic()
    r = rq.run("sendmail", "-q", timeout=120)
    assert r.returncode == EX_OK, r.stderr
    assert time.monotonic() - start >= 30
    assert rq.queued() == [] and "stat=Sent (queued as LATE)" in rq.log()
