"""Which relayq.toml a process uses and reading it: the one loader of every process.

Every entry point (sendmail in every mode, mailq, newaliases, relayq, the
daemon at start and on SIGHUP) asks select() before it opens or starts
anything, and Source.load() reads the file with the secret-permission check.
The parsing itself is pure (relayq.core.config); this module is its I/O:
the environment, the file, its mode and the cache of checked settings.
"""

from __future__ import annotations

import os

from relayq.core.config import SCHEMA, SYSTEM_CONFIG, SYSTEM_QUEUE, Config, parse
from relayq.core.errors import ConfigError, PermissionRefused

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from typing import Any


def default_path(env: dict[str, str] | os._Environ[str], uid: int, home: str) -> str:
    """RELAYQ_CONFIG; for root the system file; for others their own file if they
    have one (a private queue of their own), else the system's (a handover)."""
    if env.get("RELAYQ_CONFIG"):
        return env["RELAYQ_CONFIG"]
    if uid == 0:
        return SYSTEM_CONFIG
    base = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    personal = os.path.join(base, "relayq", "relayq.toml")
    if not os.path.exists(personal) and (
        os.path.exists(SYSTEM_CONFIG) or os.path.isdir(SYSTEM_QUEUE)
    ):
        return SYSTEM_CONFIG
    return personal


def default_queue(env: dict[str, str] | os._Environ[str], uid: int, home: str,
                  path: str = "") -> str:
    if uid == 0 or path == SYSTEM_CONFIG:
        return SYSTEM_QUEUE
    base = env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "relayq")


class Source:
    """Which configuration file a process uses, decided once by select().

    The path and the default queue are fixed when the process starts: root
    dropping to daemon_user must re-read (SIGHUP) the file it started with,
    not the one its new uid would pick.
    """

    __slots__ = ("daemon", "explicit", "home", "path", "queue", "uid", "unread")

    def __init__(self, path: str, explicit: bool, uid: int, home: str) -> None:
        self.path = path
        self.explicit = explicit  # a missing or unreadable file is an error, not the defaults
        self.daemon = False  # set by the daemon: it needs the settings, never the defaults
        self.uid = uid
        self.home = home
        self.queue = default_queue(os.environ, uid, home, path)
        self.unread = ""  # why load() used the defaults for a system file it may not read

    def load(self) -> Config:
        """Read and check the file: the one loader of every process (sendmail, mailq,
        relayq, the daemon at start and on SIGHUP), secret-permission check included.

        The checked settings are cached (see _Cache): parsing TOML costs the
        submission path about 10 ms of imports (tomllib pulls in re and typing),
        more than the rest of a queue-only submission.
        """
        path, uid, home = self.path, self.uid, self.home
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if self.explicit:
                raise ConfigError(f"{path}: no such configuration file") from None
            cfg = parse("", path)
        except PermissionError as exc:
            if uid == 0 or path != SYSTEM_CONFIG or self.explicit or self.daemon:
                raise ConfigError(_unreadable(path, exc, self.daemon)) from None
            cfg = parse("", path)  # private to relayq: users only hand mail over to it
            self.unread = exc.strerror or "Permission denied"
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        else:
            with open(fd, "rb") as f:
                st = os.fstat(fd)
                key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                cache = _Cache(path, uid, home)
                values = cache.get(key)
                if values is not None:
                    cfg = Config(values, path)
                else:
                    try:
                        text = f.read().decode("utf-8")
                    except (OSError, UnicodeDecodeError) as exc:
                        raise ConfigError(f"{path}: cannot read: {exc}") from None
                    cfg = parse(text, path)
                    if not cfg.inline_secrets():
                        cache.put(key, cfg.values)  # a secret is never copied out of its file
                if cfg.inline_secrets():
                    _check_private(path, st, "holds a password")
        for acc in cfg.accounts().values():
            for what in (acc.password_file, acc.oauth2_client_secret_file):
                if what:
                    try:
                        _check_private(what, os.stat(what), "is a password file")
                    except OSError:
                        pass  # reported when it is needed, as a deferral with the reason
        cfg.forget_accounts()  # built again with the queue_dir set below
        if not cfg.queue_dir:
            cfg.queue_dir = self.queue
        return cfg


def select(named: str | None = None) -> Source:
    """The one rule for which configuration a process may use, asked by every entry
    point (sendmail in every mode, mailq, newaliases, relayq, the daemon) before it
    opens or starts anything.

    A file named on the command line (`-C`) is root's alone: a web application's
    caller may choose its argv (CVE-2016-10033), and a configuration names the
    queue, log and pid files, the password_command and pipe aliases a daemon
    would run. Anyone else gets RELAYQ_CONFIG (their environment, not their
    argv: a queue of their own) or the default file; PermissionRefused (77).
    """
    uid = os.getuid()
    home = os.environ.get("HOME") or "/"
    if named is not None:
        if uid != 0 or os.geteuid() != 0:
            raise PermissionRefused("-C: only root may name a configuration file "
                                    "(set RELAYQ_CONFIG for a queue of your own)")
        return Source(named, True, uid, home)
    return Source(default_path(os.environ, uid, home), bool(os.environ.get("RELAYQ_CONFIG")),
                  uid, home)


def load(path: str | None = None, *, explicit: bool = True) -> Config:
    """select(path).load(): the configuration this process may use (77 for a path
    named by anyone but root)."""
    del explicit  # a named file is always explicit (kept for the callers' keyword)
    return select(path).load()


PRIVATE_GROUPS = ("root", "relayq")


def _unreadable(path: str, exc: OSError, daemon: bool) -> str:
    """The one line for a configuration this process may not read, with the fix: the
    daemon's user reads it through the file's group (SECURITY.md: 0640 root:relayq)."""
    if not daemon:
        return f"{path}: cannot read: {exc.strerror}"
    import grp

    try:
        group = grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        group = str(os.getegid())
    return (f"{path}: cannot read: {exc.strerror} (the daemon runs as uid {os.geteuid()}): "
            f"chgrp {group} {path}; chmod 640 {path}")


def _check_private(path: str, st: os.stat_result, what: str) -> None:
    """A file holding a secret is readable by its owner, root and the relayq group only."""
    import stat

    mode = stat.S_IMODE(st.st_mode)
    loose = bool(mode & 0o004)
    if mode & 0o040 and not loose:
        import grp

        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        loose = group not in PRIVATE_GROUPS
    if loose:
        raise ConfigError(f"{path} {what} but its mode is {mode:04o}: make it readable "
                          f"by its owner (and the relayq group) only, e.g. chmod 600 {path}")


class _Cache:
    """The checked settings of one config file, keyed by the file's identity.

    One file per config path in RELAYQ_CACHE_DIR, /var/cache/relayq (root) or
    $XDG_CACHE_HOME/relayq. marshal holds only plain values and cannot run
    code; a cache is trusted only when it and its directory belong to us and
    nobody else can write them. Any doubt means a normal parse. A config that
    holds a password is never cached: a secret stays in its one file.
    """

    def __init__(self, path: str, uid: int, home: str) -> None:
        base = os.environ.get("RELAYQ_CACHE_DIR") or (
            "/var/cache/relayq" if uid == 0
            else os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"),
                              "relayq"))
        self.dir = base
        name = os.path.abspath(path).replace("%", "%25").replace("/", "%2F")[-200:]
        self.file = os.path.join(base, f"config{name}.cache")
        from relayq import __version__

        self.stamp = (_CACHE_FORMAT, __version__, tuple(SCHEMA))

    def _trusted(self, st: os.stat_result) -> bool:
        return st.st_uid == os.geteuid() and not st.st_mode & 0o022

    def get(self, key: tuple[object, ...]) -> dict[str, Any] | None:
        import marshal

        try:
            if not self._trusted(os.stat(self.dir)):
                return None
            fd = os.open(self.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with open(fd, "rb") as f:
            try:
                if not self._trusted(os.fstat(fd)):
                    return None
                stamp, cached_key, values = marshal.loads(f.read())
            except (OSError, ValueError, EOFError, TypeError):
                return None
        if stamp != self.stamp or cached_key != key or not isinstance(values, dict):
            return None
        return values

    def put(self, key: tuple[object, ...], values: dict[str, Any]) -> None:
        import marshal

        tmp = f"{self.file}.{os.getpid()}"
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            if not self._trusted(os.stat(self.dir)):
                return
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.write(marshal.dumps((self.stamp, key, values)))  # type: ignore[arg-type]
            os.replace(tmp, self.file)
        except (OSError, ValueError):
            try:
                os.unlink(tmp)
            except OSError:
                pass


_CACHE_FORMAT = 1
