"""Queue drain: N messages queued with `sendmail -odq`, then one `sendmail -q`.

Prints enqueue and drain rates against the in-process test smarthost on
loopback; asserts nothing. Run: .venv/bin/python bench/drain.py [--count N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from relayq.testing.smarthost import Smarthost

BIN = os.path.join(os.path.dirname(sys.executable), "sendmail")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="relayq-drain-")
    try:
        with Smarthost() as sh:
            conf = os.path.join(work, "relayq.toml")
            with open(conf, "w") as f:
                f.write(f'smarthost = "{sh.smarthost}"\ntls = "none"\n'
                        f'queue_dir = "{work}/queue"\ndomain = "bench.example.org"\n'
                        'syslog = false\ndelivery_mode = "queue"\n')
            env = dict(os.environ, RELAYQ_CONFIG=conf, RELAYQ_CACHE_DIR=f"{work}/cache")
            msg = b"From: bench@example.org\nTo: sink@example.org\nSubject: drain\n\n" + (
                b"x" * 75 + b"\n") * 25
            start = time.perf_counter()
            for _ in range(args.count):
                subprocess.run([BIN, "-t", "-i"], input=msg, env=env, check=True)
            enq = time.perf_counter() - start
            start = time.perf_counter()
            rc = subprocess.run([BIN, "-q"], env=env, check=False).returncode
            drain = time.perf_counter() - start
            got = len(sh.transactions)
        print(f"enqueue: {args.count} messages in {enq:.1f} s ({args.count / enq:.0f} msg/s, "
              "one sendmail process each)")
        print(f"drain:   {got} delivered in {drain:.1f} s ({got / drain:.0f} msg/s), "
              f"sendmail -q exit {rc}, connections {sh.connections}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
