"""The daemon's parts without the daemon: the watcher's threads (real inotify, a real
spool in a temporary directory), the scheduler's Wake, and the local socket's answers.
A small stand-in host records what the parts tell the daemon."""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import pytest

from relayq.core import config
from relayq.daemon.control import FLUSH_GAP, Requests
from relayq.daemon.dispatcher import Dispatcher
from relayq.daemon.life import Wake
from relayq.daemon.watcher import Watcher
from relayq.queue.spool import Spool
from relayq.queue.submit import Context
from relayq.system.log import Log

PATIENCE = 60.0  # generous: the machine may be loaded


class Host:
    """What Watcher and Requests see of the daemon; dispatches are recorded."""

    def __init__(self, root: Path, delivery_mode: str = "background") -> None:
        self.cfg = config.parse(f'queue_dir = "{root}"\ndelivery_mode = "{delivery_mode}"\n',
                                str(root / "relayq.toml"))
        self.ctx = Context(self.cfg)
        self.log = Log("test", use_syslog=False, path=str(root / "log"))
        self.spool = Spool(str(root))
        self.spool.ensure()
        self.generation = 0
        self.dispatcher = Dispatcher()
        self.wake = Wake()
        self.seen: queue.Queue[tuple[str, bool]] = queue.Queue()

    @property
    def wakeups(self) -> bool:
        return self.cfg.delivery_mode != "d"

    def dispatch(self, qid: str, force: bool) -> None:
        self.seen.put((qid, force))

    def committed(self, qid: str) -> None:
        self.dispatch(qid, False)


def commit(spool: Spool, qid: str) -> None:
    """The last step of a commit as the watcher sees it: QID.t renamed to QID.e."""
    tmp = os.path.join(spool.queue, f"{qid}.t")
    Path(tmp).write_text("")
    os.rename(tmp, os.path.join(spool.queue, f"{qid}.e"))


def test_inotify_dispatches_a_new_message_once_and_its_thread_is_joined(
    tmp_path: Path
) -> None:
    host = Host(tmp_path)
    w = Watcher(host)
    w.listed({"KNOWN"})
    w.watch_queue()
    commit(host.spool, "KNOWN")  # a rewrite of a known message's envelope: not news
    commit(host.spool, "NEW1")
    assert host.seen.get(timeout=PATIENCE) == ("NEW1", False)
    commit(host.spool, "NEW1")  # known now
    commit(host.spool, "NEW2")
    assert host.seen.get(timeout=PATIENCE) == ("NEW2", False)
    assert host.seen.empty()
    w.stop()
    assert w.join(time.monotonic() + PATIENCE) == []
    assert not [t for t in threading.enumerate() if t.name == "relayq-inotify"]


def test_deferred_mode_starts_no_inotify_thread(tmp_path: Path) -> None:
    host = Host(tmp_path, delivery_mode="deferred")
    w = Watcher(host)
    w.watch_queue()
    w.stop()
    assert w.join(time.monotonic()) == []
    assert not [t for t in threading.enumerate() if t.name == "relayq-inotify"]


def test_the_scan_backstop_finds_what_appeared_since_the_last_listing(tmp_path: Path) -> None:
    host = Host(tmp_path)
    w = Watcher(host)
    w.listed(set())
    commit(host.spool, "A")
    w.scan()
    assert host.seen.get_nowait() == ("A", False)
    w.scan()  # nothing changed (and not RESCAN seconds later): no listing at all
    assert host.seen.empty()


def test_the_maildrop_thread_is_joined_on_stop(tmp_path: Path) -> None:
    host = Host(tmp_path)
    os.makedirs(host.spool.maildrop, 0o700, exist_ok=True)
    w = Watcher(host)
    w.take_drops(run=True)  # an empty maildrop/: nothing to dispatch
    w.stop()
    assert w.join(time.monotonic() + PATIENCE) == []
    assert host.seen.empty()
    w.take_drops(run=True)  # after stop: no new thread
    assert not [t for t in threading.enumerate() if t.name == "relayq-maildrop"]


def test_wake_collects_flags_until_the_loop_takes_them() -> None:
    wake = Wake()
    wake.raise_flag("hup")
    wake.raise_flag("usr1")
    assert wake.wait(PATIENCE) == {"hup", "usr1"}
    wake.raise_flag("")  # only wakes the loop
    assert wake.wait(PATIENCE) == set()


def test_requests_flush_starts_one_run_per_gap_and_refuses_unknown_verbs(
    tmp_path: Path
) -> None:
    host = Host(tmp_path)
    r = Requests(host)
    assert (r.answer(1000, 1000, "flush").code, host.wake.flags) == (0, {"usr1"})
    host.wake.flags.clear()
    assert r.answer(1001, 1001, "flush").code == 0
    assert host.wake.flags == set()  # within FLUSH_GAP: answered, no second run
    r._last_flush -= FLUSH_GAP
    r.answer(1000, 1000, "flush")
    assert host.wake.flags == {"usr1"}
    assert r.answer(1000, 1000, "frobnicate x").code == 64


@pytest.mark.parametrize("request_", ["mailq not-json", 'mailq ["-C", "/etc/x"]'])
def test_requests_refuse_a_bad_listing_request(tmp_path: Path, request_: str) -> None:
    r = Requests(Host(tmp_path))
    reply = r.answer(1000, 1000, request_)
    assert reply.code in (64, 77)
    assert r._listing == set()  # the per-user guard is released
