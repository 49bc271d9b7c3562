"""relayq status as a monitoring plugin: check_mailq's -w/-c on a real queue, the
oldest message's age, one line with perfdata, exit 0/1/2/3."""

from __future__ import annotations

import re
import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq

from relayq.cli.nagios import Thresholds, check

if TYPE_CHECKING:
    from pathlib import Path


def status(rq: Relayq, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "relayq"), "status", *args], env=rq.env,
                          capture_output=True, text=True, timeout=60)


def queue(rq: Relayq, n: int) -> None:
    for i in range(n):
        r = rq.sendmail("-odq", f"u{i}@example.org", input=b"Subject: x\n\nx\n")
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("queued", "code", "word"), [(0, 0, "OK"), (1, 0, "OK"),
                                                       (2, 1, "WARNING"), (4, 2, "CRITICAL")])
def test_count_thresholds(tmp_path: Path, queued: int, code: int, word: str) -> None:
    rq = Relayq(tmp_path)
    queue(rq, queued)
    r = status(rq, "-w", "2", "-c", "4")
    assert r.returncode == code, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"RELAYQ {word} - {queued} message")
    assert re.search(rf"\| messages={queued};2;4;0 oldest=\d+s;;;0 ", lines[0])


def test_age_thresholds_and_usage_errors(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    queue(rq, 1)
    r = status(rq, "--age-warning", "0s", "--age-critical", "1d")
    assert r.returncode == 1 and r.stdout.startswith("RELAYQ WARNING - 1 message waiting, oldest")
    for bad in (["-w", "5", "-c", "5"], ["--age-warning", "2h", "--age-critical", "1h"],
                ["--age-warning", "soon"]):
        r = status(rq, *bad)
        assert r.returncode == 64 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
    plain = status(rq)
    assert plain.returncode == 0 and plain.stdout.startswith("queue:")


def test_a_failure_is_unknown_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    rq = Relayq(tmp_path, queue_dir=str(tmp_path / "not-a-dir"))
    r = status(rq, "-w", "1", "-c", "2")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.startswith("RELAYQ UNKNOWN - ") and len(r.stdout.splitlines()) == 1


def _info(**kw: object) -> dict[str, object]:
    info: dict[str, object] = {"messages": 0, "maildrop_waiting": 0, "oldest_age_seconds": None,
                               "warning": None, "dead_letters": 0, "daemon_pid": None,
                               "daemon_running": False, "quarantined": 0}
    info.update(kw)
    return info


def test_a_loop_is_critical_and_waiting_drops_count() -> None:
    t = Thresholds(10, 20)
    assert check(_info(warning="mail loops back to me (x)"), t)[0] == 2
    code, line = check(_info(messages=5, maildrop_waiting=6, oldest_age_seconds=90), t)
    assert code == 1 and "11 messages waiting" in line and "6 not yet queued" in line
    assert check(_info(dead_letters=1), t)[0] == 1
