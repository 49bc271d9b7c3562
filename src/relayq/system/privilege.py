"""Dropping root for good: the one way relayq becomes another user.

Three places need it: root entering a queue that belongs to the service user
(relayq.queue.spool), the daemon and its agents becoming `daemon_user` after
binding port 25 (relayq.daemon), and a local delivery run as the recipient
(relayq.delivery.local_transport). They used to do it three ways, one of
which never checked the result. Here it is done once, the strongest way:

1. the supplementary groups become the target's (its group list, plus any
   `extra_groups` the caller names), never root's;
2. real, effective and saved gid, then uid (setresgid/setresuid: a saved id
   of 0 would let the process climb back);
3. checked: the ids read back as asked, and setuid(0) and setresuid(0, 0, 0)
   fail with PermissionError. A process that could regain root raises.

A failure is an OSError (with strerror), which every caller already turns
into its own error: 71 for the queue and the daemon, a deferral for a local
delivery (become_owner, for the queue, raises the queue's RelayqError itself,
and checks the new user can still load relayq). This module stays cheap to
import (root's sendmail enters the service user's queue on the submission
path): no typing, no dataclasses.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Iterable


SERVICE_USER = "relayq"  # the package's system user (debian/relayq.sysusers)


def queue_owner(queue_dir: str, daemon_user: str) -> tuple[int, int] | None:
    """(uid, gid) a queue root is about to create must belong to, or None (root's own).

    daemon_user's when it is set (the daemon gives it the queue anyway); else, for
    the system queue, the relayq system user's when the host has one: the packaged
    service runs as it, and a queue root made for itself would lock it out of users'
    mail (their files unreadable, then removed). A pip install without that user
    keeps a queue of root's, and so does a host whose `relayq` is a human login (not a
    system account). ConfigError (78) for a daemon_user that does not exist.
    """
    import pwd

    from relayq.core.config import SYSTEM_QUEUE

    name = daemon_user or (SERVICE_USER if os.path.realpath(queue_dir) == SYSTEM_QUEUE
                           else "")
    if not name:
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if not daemon_user:
            return None
        from relayq.core.errors import ConfigError

        raise ConfigError(f"daemon_user: no such user {daemon_user!r}") from None
    if pw.pw_uid == 0 or not (daemon_user or system_account(pw.pw_uid)):
        return None  # a human login that happens to be called relayq gets nothing
    return (pw.pw_uid, pw.pw_gid)


def sys_uid_max(path: str = "/etc/login.defs") -> int:
    """The highest uid of a system account: login.defs' SYS_UID_MAX, else UID_MIN - 1,
    else 999 (what useradd --system and systemd-sysusers use on Debian)."""
    found: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] in ("SYS_UID_MAX", "UID_MIN"):
                    try:
                        found[words[0]] = int(words[1], 0)
                    except ValueError:
                        pass
    except OSError:
        pass
    if "SYS_UID_MAX" in found:
        return found["SYS_UID_MAX"]
    return found["UID_MIN"] - 1 if "UID_MIN" in found else 999


def system_account(uid: int) -> bool:
    """Is uid a system account's (1..SYS_UID_MAX), as the package's relayq user is?"""
    return 1 <= uid <= sys_uid_max()


class PrivilegeError(OSError):
    """The ids did not change as asked, or root could be regained."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)


def groups_of(uid: int, gid: int, name: str | None = None) -> list[int]:
    """The target's groups: its group list from the group database, or just its gid
    when it has no passwd entry (a queue owned by a bare uid)."""
    if name is None:
        import pwd

        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            return [gid]
    try:
        return os.getgrouplist(name, gid)
    except OSError:
        return [gid]


def drop_to(uid: int, gid: int, *, name: str | None = None,
            extra_groups: Iterable[int] = ()) -> None:
    """Become uid/gid for the rest of the process (root's only way out); checked.

    `name` is the target's login name when the caller knows it (else it is
    looked up); `extra_groups` are added to its group list.
    """
    groups = sorted({*groups_of(uid, gid, name), *extra_groups})
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    check_dropped(uid, gid, groups)


def become_owner(uid: int, gid: int) -> None:
    """Root becomes the owner of the queue it works in (relayq.queue.spool), then
    checks that this user can still load the rest of relayq: an installation only root
    can read (a venv or a pyenv under /root) would fail later, at some import, as an
    internal error. RelayqError: 71 if the drop fails, 78 (EX_CONFIG) for the latter."""
    import pwd

    from relayq.core.errors import RelayqError

    try:
        name: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None  # a queue owned by a bare uid
    try:
        drop_to(uid, gid, name=name)
    except OSError as exc:
        raise RelayqError(f"cannot become uid {uid}, the queue's owner: {exc.strerror}",
                          71) from None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the relayq package
    for path in (here, os.path.dirname(os.__file__)):
        if not os.access(path, os.R_OK | os.X_OK):
            raise RelayqError(f"relayq's installation ({path}) cannot be read by uid {uid} "
                              f"({name or 'no name'}), the queue's owner: install relayq "
                              "where that user can read it (e.g. under /opt)", 78)


def check_dropped(uid: int, gid: int, groups: Iterable[int]) -> None:
    """Raise PrivilegeError unless we are uid/gid with exactly `groups`, for good."""
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError(f"could not drop privileges to uid {uid}, gid {gid}")
    if set(os.getgroups()) != set(groups):
        raise PrivilegeError(f"could not set the groups of uid {uid}")
    if uid == 0:
        return  # becoming root is not dropping anything
    for climb in (lambda: os.setuid(0), lambda: os.setresuid(0, 0, 0)):
        try:
            climb()
        except PermissionError:
            continue
        raise PrivilegeError(f"root could be regained after dropping to uid {uid}")
