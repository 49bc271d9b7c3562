"""Submission cost of relayq's `sendmail`: latency and peak memory by message size.

Prints figures; asserts nothing. Run: .venv/bin/python bench/submit.py [--runs N]
Each run is a fresh `sendmail -odq` process (queue-only: the commit path
alone), so the numbers are what a caller such as cron or PHP waits for.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

BIN = os.path.join(os.path.dirname(sys.executable), "sendmail")


def message(size: int) -> str:
    """Write a message of about `size` bytes to a file, without holding it in memory.

    The driver must stay small: ru_maxrss of a child counts what it
    inherited before exec, so a driver holding 100 MB would taint the figure.
    """
    fd, path = tempfile.mkstemp(prefix="relayq-bench-msg-")
    head = b"From: bench@example.org\nTo: sink@example.org\nSubject: bench\n\n"
    block = (b"x" * 75 + b"\n") * 1024
    with os.fdopen(fd, "wb") as f:
        f.write(head)
        written = len(head)
        while written < size:
            part = block[: size - written]
            f.write(part)
            written += len(part)
    return path


# One durable commit, as bench/disk_floor in the shared harness does it: the
# least any queueing submission must do after starting Python.
COMMIT = """
import os, sys
d = sys.argv[1]
data = sys.stdin.buffer.read()
tmp = os.path.join(d, "m.%d" % os.getpid())
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, data)
os.fsync(fd)
os.close(fd)
os.rename(tmp, tmp + ".q")
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
os.fsync(dfd)
os.close(dfd)
"""


def interpreter(script: str) -> str:
    """The Python a launcher starts (its #! line), or this one."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode()
    except OSError:
        return sys.executable
    if first.startswith("#!") and "python" in first:
        return first[2:].split()[0]
    return sys.executable


def run_child(cmd: list[str], path: str, env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB) of one child, measured with wait4."""
    with open(path, "rb") as f:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.dup2(f.fileno(), 0)
            os.execve(cmd[0], cmd, env)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed with {status}")
    return wall, usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--sendmail", default=BIN,
                    help="the sendmail to time "
                         "(e.g. a launcher from `relayq install --root DIR --venv`)")
    ap.add_argument("--max-mib", type=int, default=100, help="largest message size")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="relayq-bench-")
    try:
        conf = os.path.join(work, "relayq.toml")
        with open(conf, "w") as f:
            f.write(f'queue_dir = "{work}/queue"\ndomain = "bench.example.org"\nsyslog = false\n')
        env = dict(os.environ, RELAYQ_CONFIG=conf, RELAYQ_CACHE_DIR=f"{work}/cache")
        cmd = [args.sendmail, "-odq", "-t", "-i"]
        floor = [interpreter(args.sendmail), "-I", "-S", "-c", COMMIT, f"{work}/floor"]
        os.makedirs(f"{work}/floor")
        small = message(2048)
        run_child(cmd, small, env)  # warm the page cache
        walls, floors = [], []
        for _ in range(args.runs):  # interleaved: the same noise for both
            walls.append(run_child(cmd, small, env)[0] * 1000)
            floors.append(run_child(floor, small, env)[0] * 1000)
        os.unlink(small)
        print(f"sendmail -odq -t -i, 2 KiB, {args.runs} runs: "
              f"median {statistics.median(walls):.1f} ms, "
              f"p90 {sorted(walls)[int(len(walls) * 0.9) - 1]:.1f} ms")
        print(f"floor (the same Python, -I -S, one durable commit of the message): median "
              f"{statistics.median(floors):.1f} ms; sendmail / floor = "
              f"{statistics.median(walls) / statistics.median(floors):.2f}x")
        true_walls = [run_child(["/bin/true"], os.devnull, env) for _ in range(10)]
        print(f"process spawn floor (/bin/true): median "
              f"{statistics.median(w for w, _ in true_walls) * 1000:.1f} ms, "
              f"peak RSS floor {max(r for _, r in true_walls) / 1024:.1f} MiB")
        for size in sorted({2048, min(1 << 20, args.max_mib << 20), 25 << 20, 100 << 20}):
            if size > max(2048, args.max_mib << 20):
                continue
            path = message(size)
            wall, rss = run_child(cmd, path, env)
            os.unlink(path)
            print(f"{size / 1048576:8.2f} MiB message: {wall * 1000:8.1f} ms, "
                  f"peak RSS {rss / 1024:.1f} MiB")
        print(f"(self check: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB "
              "in the bench driver)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
