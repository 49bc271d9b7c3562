"""Small files replaced whole: a reader sees the old file or the new one, never half.

node_exporter's textfile collector reads `*.prom` files at each scrape; one it
catches half written is an error for that scrape. The OAuth2 token file and the
sending-limit counts must survive a crash. So the data goes to a temporary file
in the same directory (`.NAME.RANDOM.tmp`, always created new: no `.prom`
ending, the collector ignores it), gets its mode (and owner), and is renamed
over NAME.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat


class NotRegular(OSError):
    """A FIFO, device or directory where relayq keeps a file of its own."""


def open_regular(path: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open a file someone else may have planted something at: never through a symlink
    (O_NOFOLLOW), never waiting on a FIFO (O_NONBLOCK, then refused), only a regular
    file (NotRegular otherwise). The one rule for the token file, its lock, an imported
    grant and the limit counts."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_leftovers(path: str) -> None:
    """Remove what a killed replace() of `path` left (its `.NAME.RANDOM.tmp` files);
    call it under the file's own lock, so no live writer's file is taken."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}."
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        rest = entry.name[len(prefix):-4] if entry.name.startswith(prefix) else ""
        if entry.name.endswith(".tmp") and len(rest) == 16 and \
                all(c in "0123456789abcdef" for c in rest) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def publish(path: str, text: str) -> None:
    """Write `text` to `path` atomically, mode 0644 (OSError on failure; the old file
    stays): node_exporter's collector runs as another user."""
    replace(path, text.encode("utf-8"), 0o644)


def replace(path: str, data: bytes, mode: int, *, owner: tuple[int, int] | None = None,
            durable: bool = False) -> None:
    """Replace `path` by `data` atomically: the one way relayq rewrites a small file
    (metrics, the OAuth2 token file, the sending-limit counts). OSError on failure; the
    old file stays.

    The directory may be writable by other accounts, so the temporary file is always a
    new one (O_EXCL, O_NOFOLLOW) under a random name: nothing another account prepared
    there (a file, a hard link, a symlink) is written through, and a name taken is
    simply another draw. `durable`: the data and the rename reach the disk (fsync of the
    file and of the directory) before this returns."""
    directory, name = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", directory)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_directory(directory)


def fsync_directory(path: str) -> None:
    """Make a rename or a new name in `path` durable (best effort: some file systems
    refuse a directory fsync, and the rename itself has happened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
