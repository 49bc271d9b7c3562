"""A failing disk (issue 6 §1): EIO on fsync, ENOSPC on write, a really full file system.

The caller gets one line naming the cause and exit 74 (I/O error) or 75 (try
again: no space); nothing half-written stays in the queue; mail flows again
once the disk does.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error
from tests.system.test_crash_injection import _strace_works, counts

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

MESSAGE = b"Subject: disk faults\n\nbody\n"
ARGV = ["-odq", "bob@example.org"]


def leftovers(rq: Relayq) -> list[str]:
    return sorted(p.name for p in (rq.queue_dir / "queue").iterdir())


def faulty(rq: Relayq, syscall: str, error: str, n: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                           "-e", f"inject={syscall}:error={error}:when={n}",
                           str(BIN / "sendmail"), *ARGV], input=MESSAGE, env=rq.env,
                          capture_output=True, check=False, timeout=60)


@pytest.mark.skipif(not _strace_works(), reason="strace cannot trace here")
@pytest.mark.parametrize(("syscall", "error", "code", "words"), [
    ("fsync", "EIO", 74, "Input/output error"),
    ("write", "ENOSPC", 75, "no space left on the queue file system"),
])
def test_each_failing_call_is_one_line_and_leaves_nothing(
    tmp_path: Path, smarthost_factory: SmarthostFactory, syscall: str, error: str, code: int,
    words: str,
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    rq.sendmail("-q")  # the queue directories exist, as on a used host
    total = counts([str(BIN / "sendmail"), *ARGV], rq.env, MESSAGE, tmp_path)
    assert rq.sendmail("-q").returncode == 0 and len(sh.transactions) == 1
    queue_calls = 0
    for n in range(1, total[syscall] + 1):
        r = faulty(rq, syscall, error, n)
        if r.returncode == 0:  # a call outside the queue (the log file): no harm done
            assert len(rq.spool.ids()) == 1
            assert rq.sendmail("-q").returncode == 0
            continue
        queue_calls += 1
        assert r.returncode == code, (n, r.returncode, r.stderr)
        assert words in assert_one_line_error(r), (n, r.stderr)
        assert leftovers(rq) == [], n  # nothing half-written, nothing for the runner
    assert queue_calls >= (3 if syscall == "fsync" else 2)  # data, envelope (and directory)
    assert rq.sendmail(*ARGV, input=MESSAGE).returncode == 0  # the disk is fine again
    assert rq.sendmail("-q").returncode == 0
    assert len(sh.transactions) == 2 + total[syscall] - queue_calls


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(where)], capture_output=True, check=False)
    return r.returncode == 0


def test_a_full_file_system_refuses_whole_and_mail_flows_when_space_returns(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    queue = tmp_path / "queue"
    if not _mount_tmpfs(queue, "512k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        sh = smarthost_factory()
        rq = Relayq(tmp_path, smarthost=sh.smarthost)
        assert rq.sendmail(*ARGV, input=MESSAGE).returncode == 0  # room for a small one
        big = b"Subject: too big\n\n" + (b"x" * 999 + b"\n") * 1024  # 1 MiB
        r = rq.sendmail(*ARGV, input=big)
        assert r.returncode == 75, r.stderr
        assert "no space left on the queue file system" in assert_one_line_error(r)
        assert len(rq.spool.ids()) == 1 and len(leftovers(rq)) == 2  # only the first
        subprocess.run(["mount", "-o", "remount,size=4m", str(queue)], check=True)
        assert rq.sendmail(*ARGV, input=big).returncode == 0
        assert rq.sendmail("-q").returncode == 0
        assert len(sh.transactions) == 2 and leftovers(rq) == []
    finally:
        subprocess.run(["umount", "-l", str(queue)], check=False)
