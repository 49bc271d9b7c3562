"""The submission path stays lean: no delivery machinery before the commit point."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import Relayq

if TYPE_CHECKING:
    from pathlib import Path

HEAVY = ("asyncio", "ssl", "smtplib", "email", "aiosmtpd", "socket", "dns", "json",
         "argparse", "logging", "dataclasses", "subprocess")

PROBE = f"""
import sys
from relayq.cli import sendmail
code = sendmail.main(sys.argv[1:])
print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_queue_only_submission_imports_nothing_heavy(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    r = subprocess.run([sys.executable, "-I", "-c", PROBE, "-odq", "-t", "-i"],
                       input=b"To: a@example.org\nSubject: x\n\nbody\n", env=rq.env,
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split(" ", 1) == ["0", "[]\n"]
    assert len(rq.queued()) == 1


def test_mailq_listing_imports_nothing_heavy(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    rq.sendmail("a@example.org", input=b"\nx\n")
    probe = PROBE.replace("sendmail.main(sys.argv[1:])", "sendmail.main(['-bp'])")
    r = subprocess.run([sys.executable, "-I", "-c", probe], env=rq.env, capture_output=True,
                       timeout=30, check=False)
    assert r.stdout.decode().splitlines()[-1] == "0 []"
