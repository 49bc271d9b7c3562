"""`relayq metrics`, the delivery statistics behind it and `relayq status`'s states
(issue 15 §3): real queues, real smarthosts, Prometheus' own text parser, and
node_exporter's textfile collector run on the file."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error
from tests.integration.test_daemon import DaemonProcess, wait_for

from relayq.core.envelope import Envelope, Recipient
from relayq.queue import census, stats
from relayq.queue.spool import Spool

if TYPE_CHECKING:
    from relayq.testing.smarthost import SmarthostFactory

ROOT = Path(__file__).resolve().parents[2]
NODE_EXPORTER = ROOT / "build" / "node-exporter" / "usr" / "bin" / "prometheus-node-exporter"
MSG = b"Subject: metrics\n\nhello\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every series in `text`, parsed by prometheus_client; no series twice, HELP and
    TYPE for each family, a newline at the end (node_exporter's textfile rules)."""
    assert text.endswith("\n")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation and family.type != "unknown", family.name
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"series written twice: {key}"
            out[key] = s.value
    return out


def metric(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def metrics(rq: Relayq, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "relayq"), "metrics", *args], env=rq.env,
                          capture_output=True, text=True, timeout=60)


def queue(rq: Relayq, n: int) -> None:
    for i in range(n):
        r = rq.sendmail("-odq", f"u{i}@example.org", input=MSG)
        assert r.returncode == 0, r.stderr


def test_a_backlog_at_a_down_smarthost_then_its_delivery(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    rq = Relayq(tmp_path)  # smarthost [127.0.0.1]:9: nobody listens
    queue(rq, 3)
    found = samples(metrics(rq).stdout)
    assert metric(found, "relayq_queue_messages", state="queued") == 3
    assert metric(found, "relayq_up") == 1 and metric(found, "relayq_daemon_up") == 0
    assert rq.sendmail("-q").returncode == 75
    out = metrics(rq, "-")
    assert out.returncode == 0, out.stderr
    found = samples(out.stdout)
    assert metric(found, "relayq_queue_messages", state="deferred") == 3
    assert metric(found, "relayq_queue_messages", state="queued") == 0
    deferred = {"relay": "127.0.0.1", "status": "deferred"}
    assert metric(found, "relayq_smtp_messages_processed_total", **deferred) == 3
    assert metric(found, "relayq_smtp_recipients_processed_total", **deferred) == 3
    assert metric(found, "relayq_showq_message_age_seconds_count", queue="deferred") == 3
    assert metric(found, "relayq_showq_message_size_bytes_bucket", queue="deferred",
                  le="1000") == 3
    assert metric(found, "relayq_last_error_timestamp_seconds", relay="127.0.0.1")
    status = json.loads(rq.run("relayq", "status", "--json").stdout)
    assert status["states"] == {"queued": 0, "deferred": 3, "held": 0, "quarantined": 0,
                                "maildrop": 0}
    assert "Connection refused" in status["relays"]["127.0.0.1"]["last_error"]
    plain = rq.run("relayq", "status").stdout.decode()
    assert "states:       0 queued, 3 deferred, 0 held, 0 quarantined" in plain, plain
    assert "relay 127.0.0.1: 0 sent, last never; last error " in plain, plain

    sh = smarthost_factory()  # the smarthost comes up: the backlog goes out
    rq.configure(smarthost=sh.smarthost)
    assert rq.sendmail("-q").returncode == 0 and len(sh.transactions) == 3
    target = tmp_path / "textfile" / "relayq.prom"
    target.parent.mkdir()
    os.umask(0o077)  # the file is for node_exporter, another user: 0644 whatever the umask
    try:
        assert metrics(rq, str(target)).returncode == 0
    finally:
        os.umask(0o022)
    assert target.stat().st_mode & 0o777 == 0o644
    assert os.listdir(target.parent) == ["relayq.prom"]  # no temporary file left
    found = samples(target.read_text())  # a second process: the counters survived
    relay = "127.0.0.1"
    assert metric(found, "relayq_smtp_messages_processed_total", relay=relay,
                  status="sent") == 3
    assert metric(found, "relayq_smtp_messages_processed_total", relay=relay,
                  status="deferred") == 3
    assert metric(found, "relayq_queue_messages", state="deferred") == 0
    last = metric(found, "relayq_last_delivery_timestamp_seconds", relay=relay)
    assert last and abs(last - time.time()) < 600
    plain = rq.run("relayq", "status").stdout.decode()
    assert "relay 127.0.0.1: 3 sent, last 20" in plain, plain
    st = (rq.queue_dir / "stats").stat()  # private like every queue file, the queue owner's
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == rq.queue_dir.stat().st_uid


def test_a_submissions_background_delivery_is_counted(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="background")
    assert rq.sendmail("a@example.org", "b@example.org", input=MSG).returncode == 0
    wait_for(lambda: stats.read(str(rq.queue_dir))["relays"], what="the background count")
    entry = stats.read(str(rq.queue_dir))["relays"]["127.0.0.1"]
    assert (entry["sent"], entry["sent_recipients"]) == (1, 2) and len(sh.transactions) == 1


def test_bounced_and_held_are_counted(tmp_path: Path,
                                      smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(rcpt_replies={"no@example.org": "550 5.1.1 no such user"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    r = rq.sendmail("-odq", "no@example.org", input=MSG)
    assert r.returncode == 0
    queue(rq, 1)
    qid = sorted(rq.spool.ids())[-1]
    assert rq.run("relayq", "hold", qid).returncode == 0
    assert rq.sendmail("-q").returncode == 75  # the held one stays
    found = samples(metrics(rq).stdout)
    relay = "127.0.0.1"
    assert metric(found, "relayq_smtp_messages_processed_total", relay=relay,
                  status="bounced") == 1
    assert metric(found, "relayq_queue_messages", state="held") == 1
    info = json.loads(rq.run("relayq", "status", "--json").stdout)
    assert "550 5.1.1" in info["relays"][relay]["last_error"]
    assert info["states"]["held"] == 1


def test_the_statistics_never_stop_a_delivery(tmp_path: Path,
                                             smarthost_factory: SmarthostFactory) -> None:
    """A store that cannot be written (here it is a directory) is logged once and
    ignored: the mail goes out all the same."""
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=1)  # once per process
    queue(rq, 2)
    (rq.queue_dir / "stats").mkdir()
    assert rq.sendmail("-q").returncode == 0 and len(sh.transactions) == 2
    assert rq.log().count("delivery statistics not updated") == 1, rq.log()
    assert metrics(rq).returncode == 0


def _count(root: str, n: int) -> None:
    for _ in range(n):
        assert stats.record(root, None, "relay.example.org", "sent", 2)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_count, args=(str(tmp_path), 150)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entry = stats.read(str(tmp_path))["relays"]["relay.example.org"]
    assert (entry["sent"], entry["sent_recipients"]) == (600, 1200)


def test_metrics_usage_and_failures(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    r = rq.run("relayq", "metrics", str(tmp_path / "no-such-dir" / "x.prom"))
    assert r.returncode == 73 and "x.prom" in assert_one_line_error(r)
    r = rq.run("relayq", "metrics", "a", "b")
    assert r.returncode == 64


def test_status_at_a_few_thousand_messages(tmp_path: Path) -> None:
    """The census reads each envelope once, without parsing it: timed and printed, not
    asserted (a loaded machine must not fail it)."""
    spool = Spool(str(tmp_path / "q"))
    spool.ensure()
    env = Envelope("", "sender@example.org", [Recipient("r@example.org")], time.time())
    n = 5000
    for i in range(n):
        msg = spool.create()
        msg.write(b"Subject: x\n\nbody\n")
        env.qid = msg.qid
        env.attempts = i % 2
        env.held = i % 10 == 0
        msg.commit(env)
        msg.release()
    start = time.perf_counter()
    snap = census.snapshot(spool)
    took = time.perf_counter() - start
    print(f"\ncensus of {n} messages: {took * 1000:.0f} ms")
    assert snap["messages"] == n
    assert snap["states"]["held"] == n // 10
    assert snap["states"]["deferred"] == n // 2  # the held ones are all untried
    rq = Relayq(tmp_path, queue_dir=str(tmp_path / "q"))
    start = time.perf_counter()
    r = rq.run("relayq", "status")
    print(f"relayq status, {n} messages: {(time.perf_counter() - start) * 1000:.0f} ms")
    assert r.returncode == 0 and f"messages:     {n}," in r.stdout.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_the_daemon_writes_the_file_node_exporter_reads(tmp_path: Path) -> None:
    """The daemon's metrics_file on its interval, read by Debian's node_exporter with
    only its textfile collector (unpacked by `make test-deps`, not installed: the
    package would start a service): no scrape error, relayq's series in its answer."""
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    target = textfiles / "relayq.prom"
    rq = Relayq(tmp_path, pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                delivery_mode="deferred", metrics_file=str(target), metrics_interval=1)
    d = DaemonProcess(rq).wait_ready()
    try:
        wait_for(target.exists, what="the metrics file")
        assert metric(samples(target.read_text()), "relayq_daemon_up") == 1
        queue(rq, 2)
        wait_for(lambda: metric(samples(target.read_text()), "relayq_queue_messages",
                                state="queued") == 2, timeout=60, what="the file to count 2")
        if not NODE_EXPORTER.exists():
            pytest.fail("node_exporter is missing: `make test-deps` unpacks it into "
                        "build/node-exporter")
        port = _free_port()
        exporter = subprocess.Popen(
            [str(NODE_EXPORTER), f"--web.listen-address=127.0.0.1:{port}",
             "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={textfiles}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            answer = ""

            def scraped() -> bool:
                nonlocal answer
                try:
                    answer = _scrape(port)
                except OSError:
                    return False
                return True

            wait_for(scraped, timeout=60, what="node_exporter's answer")
        finally:
            exporter.terminate()
            exporter.wait(10)
    finally:
        assert d.stop() == 0
    found = samples(answer)
    assert metric(found, "node_textfile_scrape_error") == 0, answer
    assert metric(found, "relayq_queue_messages", state="queued") == 2
    assert metric(found, "relayq_daemon_up") == 1
    assert ("node_textfile_mtime_seconds", (("file", str(target)),)) in found or \
        ("node_textfile_mtime_seconds", (("file", "relayq.prom"),)) in found


def test_a_daemon_that_cannot_write_says_so_once(tmp_path: Path) -> None:
    rq = Relayq(tmp_path, pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                metrics_file=str(tmp_path / "missing" / "relayq.prom"), metrics_interval=1)
    d = DaemonProcess(rq).wait_ready()
    try:
        wait_for(lambda: "metrics not written" in rq.log(), what="the warning")
        time.sleep(2.5)  # a few more rounds: not said again
    finally:
        assert d.stop() == 0
    assert rq.log().count("metrics not written") == 1


DAMAGED = {  # valid JSON a reader must survive: wrong types, non-finite numbers, negatives
    "wrong types": '{"version":1,"relays":{"127.0.0.1":{"sent":"x","last_success":"y",'
                   '"last_error":5}},"last_success":"z"}',
    "a relay not an object": '{"version":1,"relays":{"127.0.0.1":5},"last_success":null}',
    "non-finite": '{"version":1,"relays":{"127.0.0.1":{"sent":NaN,"last_success":Infinity,'
                  '"last_error_time":-1e308}},"last_success":1e400}',
    "negative and boolean": '{"version":1,"relays":{"127.0.0.1":{"sent":-5,"bounced":true,'
                            '"last_success":-100}},"last_success":-100}',
    "deeply nested": '{"version":1,"relays":' + "[" * 100000 + "]" * 100000 + "}",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_statistics_file_never_crashes_a_reader(
        tmp_path: Path, smarthost_factory: SmarthostFactory, damage: str) -> None:
    """Valid JSON of the wrong shape reads as what is valid in it (a bad entry or value
    is dropped): metrics, status (plain, --json, the plugin's line) keep their exit
    codes, and the next delivery is counted again."""
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    queue(rq, 1)
    (rq.queue_dir / "stats").write_text(DAMAGED[damage])
    for args, code in ((("metrics",), 0), (("status",), 0), (("status", "--json"), 0),
                       (("status", "-w", "1", "-c", "2"), 1)):
        r = rq.run("relayq", *args)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        assert not r.stderr, (args, r.stderr)
    assert rq.sendmail("-q").returncode == 0 and len(sh.transactions) == 1
    assert "delivery statistics not updated" not in rq.log(), rq.log()
    entry = stats.read(str(rq.queue_dir))["relays"]["127.0.0.1"]
    assert (entry["sent"], entry["sent_recipients"]) == (1, 1), entry
    found = samples(metrics(rq).stdout)
    assert metric(found, "relayq_smtp_messages_processed_total", relay="127.0.0.1",
                  status="sent") == 1
    info = json.loads(rq.run("relayq", "status", "--json").stdout)
    json.dumps(info, allow_nan=False)  # strict JSON: no NaN or Infinity leaks out
    assert info["relays"]["127.0.0.1"]["sent"] == 1


def test_mixed_outcomes_count_each_recipient_under_its_own(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    """A message half accepted, half deferred or refused: the message counts once (by
    its worst outcome), each recipient under its own, and the acceptance is the relay's
    last success."""
    sh = smarthost_factory(rcpt_replies={"bad@example.org": "550 5.1.1 no such user",
                                         "later@example.org": "451 4.3.0 later"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    send = ("-odq", "-f", "sender@example.org")
    assert rq.sendmail(*send, "good2@example.org", "later@example.org",
                       input=MSG).returncode == 0
    assert rq.sendmail("-q").returncode == 75
    entry = stats.read(str(rq.queue_dir))["relays"]["127.0.0.1"]
    assert (entry["deferred"], entry["sent"]) == (1, 0), entry
    assert (entry["deferred_recipients"], entry["sent_recipients"]) == (1, 1), entry
    assert entry["last_success"], entry  # good2@ went out: the relay works
    assert stats.read(str(rq.queue_dir))["last_success"] == entry["last_success"]
    assert rq.sendmail(*send, "good@example.org", "bad@example.org",
                       input=MSG).returncode == 0
    assert rq.sendmail("-q").returncode == 75  # later@ defers again
    assert len(sh.transactions) == 3  # good2, good, the bounce (later@'s had no RCPT)
    entry = stats.read(str(rq.queue_dir))["relays"]["127.0.0.1"]
    accepted = sum(len([r for r in t.rcpt_tos if r != "later@example.org"])
                   for t in sh.transactions)
    assert accepted == 3 and entry["sent_recipients"] == 3, entry  # good2, good, bounce
    assert (entry["bounced"], entry["bounced_recipients"]) == (1, 1), entry
    assert (entry["deferred"], entry["deferred_recipients"]) == (2, 2), entry
    assert entry["sent"] == 1, entry  # the bounce; the mixed ones by their worst


def test_every_smarthost_tried_keeps_its_last_error(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    """A dead primary the transport failed over from is in the statistics, status and
    metrics with its last error; when every smarthost fails, each has its own."""
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=["[127.0.0.2]:9", sh.smarthost])
    queue(rq, 1)
    assert rq.sendmail("-q").returncode == 0 and len(sh.transactions) == 1
    relays = stats.read(str(rq.queue_dir))["relays"]
    assert relays["127.0.0.1"]["sent"] == 1
    dead = relays["127.0.0.2"]
    assert "refused" in dead["last_error"] and dead["last_error_time"], dead
    assert dead["sent"] == dead["deferred"] == 0, dead  # the message is counted once
    found = samples(metrics(rq).stdout)
    assert metric(found, "relayq_last_error_timestamp_seconds", relay="127.0.0.2")
    plain = rq.run("relayq", "status").stdout.decode()
    assert "relay 127.0.0.2: 0 sent, last never; last error " in plain, plain

    rq.configure(smarthost=["[127.0.0.2]:9", "[127.0.0.1]:9"])
    queue(rq, 1)
    assert rq.sendmail("-q").returncode == 75
    relays = stats.read(str(rq.queue_dir))["relays"]
    assert relays["127.0.0.1"]["deferred"] == 1 and relays["127.0.0.2"]["deferred"] == 0
    for relay in ("127.0.0.1", "127.0.0.2"):
        assert "refused" in relays[relay]["last_error"], relays
        assert relays[relay]["last_error_time"] > dead["last_error_time"], relays
