"""What handing mail over costs an ordinary user (SECURITY.md), beside root's direct commit.

Creates the test users if missing (root only), installs launchers for
/usr/bin/python3 as on a real host, and times N queue-only submissions of a
2 KiB message each way, interleaved so they share the noise:

  root        commits to the queue itself
  user+daemon writes maildrop/, the daemon takes it over the socket
  user alone  no daemon: maildrop/ file renamed and the file system synced

Every command starts through the same user-switching subprocess call, so the
differences are relayq's. Prints medians; asserts nothing.
Run (as root): .venv/bin/python bench/handover.py [--count N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.users import System, ensure_users, install_launchers
from tests.integration.test_daemon import DaemonProcess, wait_for

from relayq.testing.smarthost import Smarthost

USER = "rqtest-alice"
MESSAGE = b"Subject: bench\n\n" + b"x" * 2000 + b"\n"


def timed(system: System, user: str) -> float:
    start = time.perf_counter()
    r = system.sendmail_as(user, "-odq", "carol@example.org", input=MESSAGE)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{user}: sendmail failed: {r.stderr.decode().strip()}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=40)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark creates users and switches to them")
    ensure_users()
    launchers = install_launchers()
    times: dict[str, list[float]] = {"root": [], "user+daemon": [], "user alone": []}
    with Smarthost() as sh:
        system = System(launchers, smarthost=sh.smarthost, delivery_mode="queue",
                        queue_interval="1h")
        try:
            for _ in range(args.count):
                times["root"].append(timed(system, "root"))
                times["user alone"].append(timed(system, USER))
            d = DaemonProcess(system.rq).wait_started()
            try:
                wait_for(lambda: (system.spool_root / "relayq.sock").exists(),
                         what="the socket")
                for _ in range(args.count):
                    times["root"].append(timed(system, "root"))
                    times["user+daemon"].append(timed(system, USER))
            finally:
                d.stop()
        finally:
            system.cleanup()
            shutil.rmtree(launchers, ignore_errors=True)
    base = statistics.median(times["root"])
    for label, values in times.items():
        med = statistics.median(values)
        print(f"{label:12s} median {med * 1000:6.1f} ms  ({med / base:.2f}x root, "
              f"{len(values)} submissions)")


if __name__ == "__main__":
    main()
