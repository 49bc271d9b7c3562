"""Every benchmark runs once at a tiny size, so none can rot (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(300)  # above each script's own 120 s, so that one reports first
@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("submit.py", ["--runs", "2", "--max-mib", "1"], "peak RSS"),
        ("drain.py", ["--count", "5"], "5 delivered"),
        ("wakeup.py", ["--count", "2"], "SMTP listener"),
        ("scale.py", ["--count", "20", "--runs", "1"], "relayq status"),
        pytest.param("handover.py", ["--count", "2"], "user+daemon",
                     marks=pytest.mark.skipif(os.geteuid() != 0, reason="creates users")),
    ],
)
def test_benchmark_runs(script: str, args: list[str], expect: str) -> None:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout


def test_peer_adapter_follows_the_harness_contract(tmp_path: Path) -> None:
    env = {"RELAYQ_BENCH_DIR": str(tmp_path / "bench"), "PATH": "/usr/bin:/bin"}

    def act(*action: str, stdin: bytes = b"") -> str:
        r = subprocess.run(["bash", str(BENCH / "peer-adapter.sh"), *action], input=stdin,
                           capture_output=True, env=env, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout.decode().strip()

    act("install")
    queue_cmd = act("queue-cmd").split()
    r = subprocess.run([*queue_cmd, "-t", "-i"], input=b"To: a@example.org\n\nx\n", env=env,
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert act("queue-count") == "1"
    act("clear-queue")
    assert act("queue-count") == "0"
    act("purge")
