"""relayq.core.metrics' text, the statistics' counting rule and the census' reading
of an envelope, without a queue (issue 15 §3)."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from tests.integration.test_metrics import metric, samples

from relayq.core import metrics
from relayq.core.envelope import Envelope, Recipient
from relayq.delivery.tally import label
from relayq.queue import stats
from relayq.queue.census import account_of, state_of
from relayq.system import textfile

if TYPE_CHECKING:
    from pathlib import Path


def _snapshot(relays: dict[str, dict[str, object]]) -> dict[str, object]:
    empty = metrics.histogram([], metrics.AGE_BUCKETS)
    return {"states": {"queued": 1, "deferred": 0, "held": 0, "quarantined": 0,
                       "maildrop": None},
            "dead_letters": 0, "oldest_age_seconds": 5,
            "size_histograms": {"queued": metrics.histogram([1500.0], metrics.SIZE_BUCKETS)},
            "age_histograms": {"queued": metrics.histogram([5.0], metrics.AGE_BUCKETS),
                               "held": empty},
            "stats": {"relays": relays}}


def test_histograms_are_cumulative() -> None:
    h = metrics.histogram([1, 10, 11, 5e9], (1.0, 10.0, 100.0))
    assert h == {"buckets": [1, 2, 3], "sum": 5e9 + 22, "count": 4}


def test_the_text_parses_and_names_each_series_once() -> None:
    data = stats.empty()
    now = time.time()
    stats.add(data, "mail.example.org", "sent", 2, now)
    stats.add(data, "mail.example.org", "deferred", 1, now, "421 4.7.0 try later")
    stats.add(data, 'we"ird\\relay', "bounced", 1, now, "550 5.1.1 no")
    text = metrics.render(_snapshot(data["relays"]), daemon_up=False)
    found = samples(text)
    assert metric(found, "relayq_smtp_messages_processed_total", relay="mail.example.org",
                  status="sent") == 1
    assert metric(found, "relayq_smtp_recipients_processed_total", relay="mail.example.org",
                  status="sent") == 2
    assert metric(found, "relayq_smtp_messages_processed_total", relay='we"ird\\relay',
                  status="bounced") == 1
    assert metric(found, "relayq_last_delivery_timestamp_seconds",
                  relay="mail.example.org") == now
    assert metric(found, "relayq_queue_messages", state="maildrop") is None  # unknown
    assert metric(found, "relayq_showq_message_size_bytes_bucket", queue="queued",
                  le="1000") == 0
    assert metric(found, "relayq_showq_message_size_bytes_bucket", queue="queued",
                  le="+Inf") == 1
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"relayq_up", "relayq_daemon_up", "relayq_queue_messages",
            "relayq_showq_message_age_seconds", "relayq_smtp_messages_processed"} <= names


@given(st.text(min_size=1, max_size=40))
def test_any_relay_name_is_a_valid_label(name: str) -> None:
    data = stats.empty()
    stats.add(data, name, "sent", 1, 1.0)
    found = samples(metrics.render(_snapshot(data["relays"]), daemon_up=True))
    assert metric(found, "relayq_smtp_messages_processed_total", relay=name,
                  status="sent") == 1


def test_the_store_keeps_a_bounded_number_of_relays_and_one_error_line() -> None:
    data = stats.empty()
    for i in range(stats.MAX_RELAYS + 5):
        stats.add(data, f"r{i}", "deferred", 1, float(i), "421\n4.7.0   try later " * 50)
    assert len(data["relays"]) == stats.MAX_RELAYS and "r0" not in data["relays"]
    error = data["relays"]["r10"]["last_error"]
    assert error.startswith("421 4.7.0 try later") and len(error) == stats.MAX_ERROR
    assert stats._loads(b"{not json") == stats.empty()  # a damaged file: a counter reset
    raw = json.dumps(data).encode()
    assert stats._loads(raw + b'me": 3}}') == data  # a rewrite cut before its truncate


def test_relay_labels() -> None:
    assert label("mail.example.org [192.0.2.1]") == "mail.example.org"
    assert label("[127.0.0.1]") == "127.0.0.1"
    assert label("") == "local"


def test_the_census_reads_an_envelope_without_parsing_it() -> None:
    env = Envelope("Q1", "a@example.org", [Recipient("b@example.org")], 1.0)
    env.size = 1234
    assert state_of(env.dumps()) == ("queued", 1234)
    env.error = "Deferred: Connection refused"
    assert state_of(env.dumps())[0] == "deferred"
    env.error, env.attempts = "", 2
    assert state_of(env.dumps())[0] == "deferred"
    env.held = True
    assert state_of(env.dumps())[0] == "held"
    env.held, env.error = False, "x\theld\t1"  # free text never makes a line of its own
    assert state_of(env.dumps())[0] == "deferred"
    assert state_of(b"garbage") == ("queued", 0)


def test_the_census_reads_the_account_without_parsing_the_envelope() -> None:
    env = Envelope("Q1", "a@example.org", [Recipient("b@example.org")], 1.0)
    assert account_of(env.dumps()) == ""  # the default's: no field
    env.account = "shop"
    assert account_of(env.dumps()) == "shop"
    env.account, env.error = "", "x\naccount\tshop"  # free text never makes a line
    assert account_of(env.dumps()) == ""
    assert Envelope.loads(env.dumps(), "Q1").account == ""


def test_publishing_never_writes_through_a_prepared_temporary_name(tmp_path: Path) -> None:
    """The collector's directory may be writable by other accounts: a file, hard link or
    symlink waiting at a guessable temporary name must never be written through (the
    temporary file is created new, O_EXCL, under a name nobody can guess)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "collector" / "relayq.prom"
    target.parent.mkdir()
    os.link(victim, target.parent / f".relayq.prom.{os.getpid()}.tmp")  # the old name
    (target.parent / f".relayq.prom.{os.getpid() + 1}.tmp").symlink_to(victim)
    for text in ("relayq_up 1\n", "relayq_up 0\n"):
        textfile.publish(str(target), text)
        assert target.read_text() == text
        assert target.stat().st_mode & 0o777 == 0o644
    assert victim.read_text() == "precious\n"
    left = sorted(p.name for p in target.parent.iterdir())
    assert left == sorted([f".relayq.prom.{os.getpid()}.tmp",
                           f".relayq.prom.{os.getpid() + 1}.tmp", "relayq.prom"]), left
