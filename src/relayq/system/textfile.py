"""Publish a small world-readable file the way node_exporter's textfile collector wants.

The collector reads `*.prom` files at each scrape; one it catches half written
is an error for that scrape. So the text goes to a temporary file in the same
directory (`.NAME.RANDOM.tmp`, always created new: no `.prom` ending, the
collector ignores it), is made mode 0644, and is renamed over NAME: a reader
sees the old file or the new one, whole.
"""

from __future__ import annotations

import errno
import os
import secrets


def publish(path: str, text: str) -> None:
    """Write `text` to `path` atomically (OSError on failure; the old file stays).

    The collector's directory may be writable by other accounts, so the temporary
    file is always a new one (O_EXCL, O_NOFOLLOW) under a random name: nothing
    another account prepared there (a file, a hard link, a symlink) is written
    through, and a name taken is simply another draw."""
    directory, name = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", directory)
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
