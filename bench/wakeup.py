"""Daemon wake-up latency: `sendmail -odq` exits -> the smarthost has the message.

Starts `relayq daemon --foreground` (queue interval 1h, so only the wake-up
can deliver in time) against the in-process test smarthost on loopback,
submits N messages one at a time with `sendmail -odq`, and prints the
latency from each submission's exit to its arrival at the smarthost, and the
same for the SMTP listener (250 to DATA -> arrival). Asserts nothing.
With --peer-sendmail (e.g. Postfix's /usr/sbin/sendmail relaying to
127.0.0.1:2525) a second sink listens on --peer-port and the peer's
submissions are interleaved with relayq's, so the two figures share the noise.
Run: .venv/bin/python bench/wakeup.py [--count N] [--peer-sendmail CMD]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from relayq.testing.smarthost import Smarthost

BIN = os.path.dirname(sys.executable)
MSG = b"From: bench@example.org\nTo: sink@example.org\nSubject: wakeup\n\nhello\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _arrival(sh: Smarthost, count: int, timeout: float = 10.0) -> float:
    deadline = time.perf_counter() + timeout
    while len(sh.transactions) < count:
        if time.perf_counter() > deadline:
            raise SystemExit(f"message {count} did not arrive within {timeout}s")
        time.sleep(0.001)
    return time.perf_counter()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _show(label: str, values: list[float]) -> None:
    ms = sorted(v * 1000 for v in values)
    print(f"{label:<30} n={len(ms):<4} median {statistics.median(ms):7.1f} ms   "
          f"p90 {ms[int(len(ms) * 0.9) - 1 if len(ms) > 1 else 0]:7.1f} ms   "
          f"max {ms[-1]:7.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--peer-sendmail", help="another MTA's sendmail, timed beside relayq")
    ap.add_argument("--peer-port", type=int, default=2525, help="where the peer relays to")
    args = ap.parse_args()
    stack = contextlib.ExitStack()
    peer_sh = stack.enter_context(Smarthost(port=args.peer_port)) if args.peer_sendmail else None
    work = tempfile.mkdtemp(prefix="relayq-wakeup-")
    port = _free_port()
    try:
        with Smarthost() as sh:
            conf = os.path.join(work, "relayq.toml")
            with open(conf, "w") as f:
                f.write(f'smarthost = "{sh.smarthost}"\ntls = "none"\n'
                        f'queue_dir = "{work}/queue"\ndomain = "bench.example.org"\n'
                        f'syslog = false\ndelivery_mode = "queue"\nqueue_interval = "1h"\n'
                        f'pid_file = "{work}/relayq.pid"\nlisten = ["127.0.0.1:{port}"]\n'
                        f'log_file = "{work}/maillog"\n')
            env = dict(os.environ, RELAYQ_CONFIG=conf, RELAYQ_CACHE_DIR=f"{work}/cache")
            daemon = subprocess.Popen([os.path.join(BIN, "relayq"), "daemon", "--foreground",
                                       "--listen"], env=env, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while "starting daemon" not in _read(f"{work}/maillog"):
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise SystemExit("the daemon did not start")
                    time.sleep(0.02)
                cli: list[float] = []
                peer: list[float] = []
                for n in range(1, args.count + 1):
                    subprocess.run([os.path.join(BIN, "sendmail"), "-odq", "sink@example.org"],
                                   input=MSG, env=env, check=True)
                    committed = time.perf_counter()
                    cli.append(_arrival(sh, n) - committed)
                    if peer_sh is not None:
                        subprocess.run([*args.peer_sendmail.split(), "sink@example.org"],
                                       input=MSG, check=True)
                        committed = time.perf_counter()
                        peer.append(_arrival(peer_sh, n) - committed)
                smtp: list[float] = []
                with smtplib.SMTP("127.0.0.1", port) as client:
                    for n in range(args.count + 1, 2 * args.count + 1):
                        client.sendmail("bench@example.org", ["sink@example.org"],
                                        MSG.replace(b"\n", b"\r\n"))
                        committed = time.perf_counter()
                        smtp.append(_arrival(sh, n) - committed)
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(20)
        print("daemon wake-up latency (commit -> smarthost has it), queue_interval = 1h:")
        _show("sendmail -odq (inotify)", cli)
        _show("SMTP listener (direct hand-off)", smtp)
        if peer_sh is not None:
            _show(f"peer: {args.peer_sendmail}"[:30], peer)
            print(f"relayq / peer (medians): "
                  f"{statistics.median(cli) / statistics.median(peer):.2f}x")
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
