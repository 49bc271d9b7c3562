"""relayq.system.privilege for real: a forked child of root drops to a real user.

Each case forks; the child drops, looks at itself (ids, groups, whether root
comes back) and reports on a pipe; the parent asserts. Needs root and useradd
(the test users of tests/helpers/users.py), else skipped.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
from typing import TYPE_CHECKING, Any

import pytest
from tests.helpers.users import ADMIN_GROUP, DAEMON_USER, ensure_users

from relayq.system import privilege

if TYPE_CHECKING:
    from collections.abc import Callable


@pytest.fixture(scope="module")
def users() -> None:
    ensure_users()


def in_child(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `work` in a forked child; its answer (or the exception it raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            answer = work()
        except BaseException as exc:
            answer = {"raised": type(exc).__name__, "message": str(exc)}
        try:
            os.write(w, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(b"".join(chunks))


def look() -> dict[str, Any]:
    """Who we are now, and whether root can be had back."""
    climbs = {}
    for name, climb in (("setuid", lambda: os.setuid(0)),
                        ("setresuid", lambda: os.setresuid(0, 0, 0)),
                        ("setgid", lambda: os.setgid(0))):
        try:
            climb()
            climbs[name] = "regained"
        except PermissionError:
            climbs[name] = "refused"
    return {"resuid": list(os.getresuid()), "resgid": list(os.getresgid()),
            "groups": sorted(os.getgroups()), "climbs": climbs}


def test_dropping_to_a_real_user_is_for_good(users: None) -> None:
    pw = pwd.getpwnam("rqtest-admin")  # in ADMIN_GROUP besides its own group

    def work() -> dict[str, Any]:
        privilege.drop_to(pw.pw_uid, pw.pw_gid)
        return look()

    seen = in_child(work)
    assert seen["resuid"] == [pw.pw_uid] * 3 and seen["resgid"] == [pw.pw_gid] * 3
    expected = sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))
    assert seen["groups"] == expected
    assert grp.getgrnam(ADMIN_GROUP).gr_gid in seen["groups"]  # its own groups, not root's
    assert 0 not in seen["groups"]
    assert seen["climbs"] == {"setuid": "refused", "setresuid": "refused", "setgid": "refused"}


def test_extra_groups_are_added_and_the_name_may_be_given(users: None) -> None:
    pw = pwd.getpwnam(DAEMON_USER)
    extra = grp.getgrnam(ADMIN_GROUP).gr_gid

    def work() -> dict[str, Any]:
        privilege.drop_to(pw.pw_uid, pw.pw_gid, name=pw.pw_name, extra_groups=[extra])
        return look()

    seen = in_child(work)
    assert seen["groups"] == sorted({*os.getgrouplist(pw.pw_name, pw.pw_gid), extra})
    assert seen["climbs"]["setuid"] == "refused"


def test_a_uid_without_a_passwd_entry_gets_only_its_gid(users: None) -> None:
    uid = gid = 64999  # a queue owned by a bare number
    try:
        pwd.getpwuid(uid)
        pytest.skip("uid 64999 exists here")
    except KeyError:
        pass

    def work() -> dict[str, Any]:
        privilege.drop_to(uid, gid)
        return look()

    seen = in_child(work)
    assert seen["resuid"] == [uid] * 3 and seen["groups"] == [gid]
    assert seen["climbs"]["setresuid"] == "refused"


def test_a_drop_that_leaves_root_within_reach_raises(users: None) -> None:
    """setuid() alone would have kept root in the saved uid: the check catches it."""
    pw = pwd.getpwnam(DAEMON_USER)

    def work() -> dict[str, Any]:
        os.setgroups([pw.pw_gid])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, 0)  # saved uid still root
        privilege.check_dropped(pw.pw_uid, pw.pw_gid, [pw.pw_gid])
        return {"raised": None}

    seen = in_child(work)
    assert seen["raised"] == "PrivilegeError"


def test_a_partial_drop_is_refused(users: None) -> None:
    """Ids that do not read back as asked (here: only the effective uid changed)."""
    pw = pwd.getpwnam(DAEMON_USER)

    def work() -> dict[str, Any]:
        os.setgroups([pw.pw_gid])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.seteuid(pw.pw_uid)
        try:
            privilege.check_dropped(pw.pw_uid, pw.pw_gid, [pw.pw_gid])
        except privilege.PrivilegeError as exc:
            return {"raised": "PrivilegeError", "errno": exc.errno, "message": exc.strerror}
        return {"raised": None}

    seen = in_child(work)
    assert seen["raised"] == "PrivilegeError" and seen["errno"] == 1
    assert "could not drop privileges" in seen["message"]


def test_groups_other_than_asked_are_refused(users: None) -> None:
    pw = pwd.getpwnam(DAEMON_USER)

    def work() -> dict[str, Any]:
        os.setgroups([pw.pw_gid, 0])  # root's group kept
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
        privilege.check_dropped(pw.pw_uid, pw.pw_gid, [pw.pw_gid])
        return {"raised": None}

    assert in_child(work)["raised"] == "PrivilegeError"


def test_not_root_cannot_drop(users: None) -> None:
    """A process that is not root gets the OSError every caller turns into its error."""
    pw = pwd.getpwnam(DAEMON_USER)
    other = pwd.getpwnam("rqtest-bob")

    def work() -> dict[str, Any]:
        privilege.drop_to(pw.pw_uid, pw.pw_gid)
        try:
            privilege.drop_to(other.pw_uid, other.pw_gid)
        except OSError as exc:
            return {"raised": type(exc).__name__, "errno": exc.errno}
        return {"raised": None}

    seen = in_child(work)
    assert seen["raised"] == "PermissionError" and seen["errno"] == 1


def _raise_cap_setuid() -> None:
    """Keep CAP_SETUID across setresuid (PR_SET_KEEPCAPS) and make it effective again:
    ids that read back as dropped while root is one setuid(0) away."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective |= 1 << 7  # CAP_SETUID, still permitted thanks to KEEPCAPS
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def test_ids_that_look_dropped_but_keep_cap_setuid_raise(users: None) -> None:
    """The check does not trust the ids: setuid(0) itself must fail."""
    import ctypes

    pw = pwd.getpwnam(DAEMON_USER)

    def work() -> dict[str, Any]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(8, 1, 0, 0, 0) != 0:  # PR_SET_KEEPCAPS
            return {"raised": "skip"}
        os.setgroups([pw.pw_gid])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
        try:
            _raise_cap_setuid()
        except OSError:
            return {"raised": "skip"}
        try:
            privilege.check_dropped(pw.pw_uid, pw.pw_gid, [pw.pw_gid])
        except privilege.PrivilegeError as exc:
            return {"raised": "PrivilegeError", "message": exc.strerror}
        return {"raised": None}

    seen = in_child(work)
    if seen["raised"] == "skip":
        pytest.skip("cannot keep CAP_SETUID here")
    assert seen == {"raised": "PrivilegeError",
                    "message": f"root could be regained after dropping to uid {pw.pw_uid}"}


def test_the_owner_of_a_queue_root_makes(users: None, tmp_path) -> None:
    """daemon_user's queue is daemon_user's; another queue without it is root's."""
    from relayq.core.errors import ConfigError

    svc = pwd.getpwnam(DAEMON_USER)
    assert privilege.queue_owner(str(tmp_path), DAEMON_USER) == (svc.pw_uid, svc.pw_gid)
    assert privilege.queue_owner(str(tmp_path), "") is None
    assert privilege.queue_owner(str(tmp_path), "root") is None
    with pytest.raises(ConfigError, match="no such user"):
        privilege.queue_owner(str(tmp_path), "rqtest-nobody-here")


def test_only_a_system_account_is_the_service_user(tmp_path) -> None:
    """A human login that happens to be called relayq (uid from UID_MIN up) is not the
    packaged service's user; SYS_UID_MAX (or UID_MIN - 1, or 999) is the bound."""
    defs = tmp_path / "login.defs"
    defs.write_text("# comment\nUID_MIN\t\t\t 1000\n#SYS_UID_MAX 999\n")
    assert privilege.sys_uid_max(str(defs)) == 999
    defs.write_text("SYS_UID_MAX   499\nUID_MIN 1000\n")
    assert privilege.sys_uid_max(str(defs)) == 499
    defs.write_text("UID_MIN 500\n")
    assert privilege.sys_uid_max(str(defs)) == 499
    assert privilege.sys_uid_max(str(tmp_path / "none")) == 999
    defs.write_text("SYS_UID_MAX many\n")
    assert privilege.sys_uid_max(str(defs)) == 999
    top = privilege.sys_uid_max()
    assert privilege.system_account(1) and privilege.system_account(top)
    assert not privilege.system_account(0) and not privilege.system_account(top + 1)
