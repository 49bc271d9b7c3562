"""Sendmail-style log lines to syslog (facility mail) and, optionally, a file.

One line per event, `QID: from=<...>, size=N, ...`, so that existing log
parsers keep working. The syslog tag comes from `-L` (default `relayq`).
Secrets never reach this module: callers pass finished lines.
"""

from __future__ import annotations

import os
import sys
import time

INFO, NOTICE, WARNING, ERR = 6, 5, 4, 3


class Log:
    def __init__(self, tag: str = "relayq", *, use_syslog: bool = True, path: str = "",
                 echo: bool = False) -> None:
        self.tag = tag
        self.use_syslog = use_syslog
        self.path = path
        self.echo = echo  # also print to stderr (daemons in the foreground, -v)
        self._opened = False

    def _syslog(self, level: int, line: str) -> None:
        import syslog

        if not self._opened:
            syslog.openlog(self.tag, syslog.LOG_PID, syslog.LOG_MAIL)
            self._opened = True
        syslog.syslog(level, line)

    def emit(self, level: int, line: str) -> None:
        line = "".join(c if c >= " " or c == "\t" else "?" for c in line)
        if self.use_syslog:
            try:
                self._syslog(level, line)
            except OSError:
                pass
        if self.path:
            stamp = time.strftime("%b %d %H:%M:%S")
            host = "".join(c if " " <= c != "\x7f" else "?" for c in os.uname().nodename)
            text = f"{stamp} {host} {self.tag}[{os.getpid()}]: {line}\n"
            try:
                # never through a symbolic link: the file may sit where others can write
                # and never blocking on a FIFO planted in its place
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_NONBLOCK | os.O_CLOEXEC, 0o640)
                try:
                    if os.fstat(fd).st_mode & 0o170000 == 0o100000:  # a regular file
                        os.write(fd, text.encode("utf-8", "replace"))
                finally:
                    os.close(fd)
            except OSError:
                pass
        if self.echo:
            print(f"{self.tag}: {line}", file=sys.stderr, flush=True)

    def info(self, line: str) -> None:
        self.emit(INFO, line)

    def notice(self, line: str) -> None:
        self.emit(NOTICE, line)

    def warning(self, line: str) -> None:
        self.emit(WARNING, line)

    def error(self, line: str) -> None:
        self.emit(ERR, line)


def delay(seconds: float) -> str:
    """sendmail's delay= format: [D+]HH:MM:SS."""
    seconds = max(0, int(seconds))
    days, seconds = divmod(seconds, 86400)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    text = f"{h:02d}:{m:02d}:{s:02d}"
    return f"{days}+{text}" if days else text
