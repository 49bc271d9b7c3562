"""`mailq --json-lines`: `postqueue -j`'s objects, so `postqueue -j | jq` scripts carry over
(issue 15 §3). Queues built by real submissions (sendmail -odq), a real failed run
(nothing listens on port 9) and relayq hold."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import Relayq

from relayq.core.errors import EX_OK

if TYPE_CHECKING:
    from pathlib import Path

MSG = b"Subject: json lines\n\nhello\n"
FIELDS = {"queue_name", "queue_id", "arrival_time", "message_size", "sender", "recipients"}


def lines(rq: Relayq, *args: str) -> list[dict[str, object]]:
    r = rq.run("mailq", "--json-lines", *args)
    assert (r.returncode, r.stderr) == (EX_OK, b""), r.stderr
    text = r.stdout.decode("ascii")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_empty_queue_prints_nothing(tmp_path: Path) -> None:
    assert lines(Relayq(tmp_path)) == []


def test_one_object_per_message_with_postqueues_fields(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    before = int(time.time())
    assert rq.sendmail("-odq", "-f", "alice@host.example.org", "bob@example.org",
                       "carol@example.net", input=MSG).returncode == EX_OK
    [obj] = lines(rq)
    assert set(obj) == FIELDS  # no forced_expire: relayq never force-expires a message
    [qid] = rq.spool.ids()
    [(_env, data)] = rq.queued()
    assert obj["queue_id"] == qid and obj["queue_name"] == "incoming"  # never tried yet
    assert isinstance(obj["arrival_time"], int) and before - 1 <= obj["arrival_time"] <= time.time()
    assert obj["message_size"] == len(data)
    assert obj["sender"] == "alice@host.example.org"
    assert obj["recipients"] == [{"address": "bob@example.org"},
                                 {"address": "carol@example.net"}]


def test_states_map_to_postfix_queue_names(tmp_path: Path) -> None:
    """never tried: incoming; tried and failed: deferred (with the reason); held: hold;
    being delivered (locked): active."""
    rq = Relayq(tmp_path)
    for rcpt in ("a@example.org", "b@example.org", "c@example.org"):
        assert rq.sendmail("-odq", rcpt, input=MSG).returncode == EX_OK
    assert rq.run("relayq", "flush").returncode != EX_OK  # nothing listens on port 9
    assert rq.sendmail("-odq", "d@example.org", input=MSG).returncode == EX_OK
    a, b, c, d = rq.spool.ids()
    assert rq.run("relayq", "hold", b).returncode == EX_OK
    claim = rq.spool.claim(c)
    assert claim is not None
    try:
        objs = {o["queue_id"]: o for o in lines(rq)}
    finally:
        claim.release()
    assert {q: o["queue_name"] for q, o in objs.items()} == {
        a: "deferred", b: "hold", c: "active", d: "incoming"}
    [rcpt] = objs[a]["recipients"]  # type: ignore[misc]
    assert rcpt["address"] == "a@example.org"
    assert "127.0.0.1" in rcpt["delay_reason"] and "refused" in rcpt["delay_reason"].lower()
    assert objs[d]["recipients"] == [{"address": "d@example.org"}]


def test_selectors_and_null_sender(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    assert rq.sendmail("-odq", "-f", "<>", "x@example.org", input=MSG).returncode == EX_OK
    assert rq.sendmail("-odq", "y@example.org", input=MSG).returncode == EX_OK
    [obj] = lines(rq, "-qRx@")
    assert obj["sender"] == "" and obj["recipients"] == [{"address": "x@example.org"}]
    assert [o["recipients"] for o in lines(rq, "-q!Rx@")] == [[{"address": "y@example.org"}]]


def test_relayq_mailq_passes_it_on(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    assert rq.sendmail("-odq", "z@example.org", input=MSG).returncode == EX_OK
    r = rq.run("relayq", "mailq", "--json-lines")
    assert r.returncode == EX_OK, r.stderr
    assert json.loads(r.stdout)["recipients"] == [{"address": "z@example.org"}]


def test_json_and_json_lines_together_is_a_usage_error(tmp_path: Path) -> None:
    r = Relayq(tmp_path).run("mailq", "--json", "--json-lines")
    assert r.returncode == 64 and b"Traceback" not in r.stderr
    assert r.stderr.count(b"\n") == 1


def test_usage_names_it(tmp_path: Path) -> None:
    r = Relayq(tmp_path).run("mailq", "--help")
    assert b"--json-lines" in r.stdout


def test_whole_queue_streams_the_same_objects_as_a_selected_listing(tmp_path: Path) -> None:
    """Without selectors the objects are written as the queue is read (postqueue -j's
    point: a large queue need not be held in memory); the same as when a selector
    that matches everything makes mailq collect first."""
    rq = Relayq(tmp_path)
    for i in range(70):  # past the 64 messages between two reads of /proc/locks
        assert rq.sendmail("-odq", f"r{i}@example.org", input=MSG).returncode == EX_OK
    assert rq.run("relayq", "hold", rq.spool.ids()[3]).returncode == EX_OK
    streamed = rq.run("mailq", "--json-lines")
    collected = rq.run("mailq", "--json-lines", "-q!Ino-such-id")
    assert streamed.returncode == collected.returncode == EX_OK
    assert streamed.stdout == collected.stdout and streamed.stdout.count(b"\n") == 70
    assert b'"queue_name":"hold"' in streamed.stdout
