"""Queue scale: N queued messages; how long do `relayq status` and `mailq` take?

Writes N small valid queue entries straight into a scratch queue (no fsync:
their durability is not what is measured), then times the listing commands.
Prints figures; asserts nothing. Run: .venv/bin/python bench/scale.py [--count N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from relayq.core.envelope import Envelope, Recipient
from relayq.queue.names import make_qid

BIN = os.path.dirname(sys.executable)


def fill(queue: str, count: int) -> None:
    os.makedirs(queue, exist_ok=True)
    now = float(int(time.time()) - 60 - count // 1_000_000)
    for n in range(count):  # a million ids a second: one per "process id" (6 digits)
        qid = make_qid(now + n // 1_000_000, n % 1_000_000)
        env = Envelope(qid, "bench@example.org", [Recipient(f"r{n}@example.org")], now)
        env.size = 40
        env.error = "Deferred: Connection refused by [127.0.0.1]"
        with open(os.path.join(queue, qid + ".d"), "wb") as f:
            f.write(b"Subject: scale\n\nqueued for the benchmark\n")
        with open(os.path.join(queue, qid + ".e"), "wb") as f:
            f.write(env.dumps())


def timed(cmd: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    """(median wall ms for the whole command, median ms until its first output byte)."""
    walls, firsts = [], []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        proc.stdout.read(1)
        firsts.append((time.perf_counter() - start) * 1000)
        proc.stdout.read()
        proc.wait()
        walls.append((time.perf_counter() - start) * 1000)
    return statistics.median(walls), statistics.median(firsts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="relayq-scale-")
    try:
        conf = os.path.join(work, "relayq.toml")
        with open(conf, "w") as f:
            f.write(f'queue_dir = "{work}/spool"\nsyslog = false\n'
                    'smarthost = "[127.0.0.1]:9"\ndomain = "bench.example.org"\n')
        env = dict(os.environ, RELAYQ_CONFIG=conf, RELAYQ_CACHE_DIR=f"{work}/cache")
        start = time.perf_counter()
        fill(os.path.join(work, "spool", "queue"), args.count)
        print(f"{args.count} queued messages written in {time.perf_counter() - start:.1f} s")
        for label, cmd in (("relayq status", [f"{BIN}/relayq", "status"]),
                           ("mailq", [f"{BIN}/mailq"]),
                           ("mailq --json", [f"{BIN}/mailq", "--json"])):
            wall, first = timed(cmd, env, args.runs)
            print(f"{label:<14} {args.count} messages: median {wall:8.1f} ms, "
                  f"first byte after {first:8.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
