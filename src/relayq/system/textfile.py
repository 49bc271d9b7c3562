"""Publish a small world-readable file the way node_exporter's textfile collector wants.

The collector reads `*.prom` files at each scrape; one it catches half written
is an error for that scrape. So the text goes to a temporary file in the same
directory (`.NAME.PID.tmp`: no `.prom` ending, the collector ignores it), is
made mode 0644, and is renamed over NAME: a reader sees the old file or the
new one, whole.
"""

from __future__ import annotations

import os


def publish(path: str, text: str) -> None:
    """Write `text` to `path` atomically (OSError on failure; the old file stays)."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: the collector runs as another user
            view = memoryview(text.encode("utf-8"))
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
