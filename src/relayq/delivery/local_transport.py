"""The local transport: aliases, then mailboxes, files and pipes on this host.

The runner asks two questions. `expand(address)` turns a recipient in a local
domain into what it stands for: its own user's mailbox (no alias), or remote
addresses and local targets (an alias), or a failure (unknown user, alias
loop) or a deferral (an unreadable or broken aliases or :include: file). `deliver()`
writes the message for one local target and returns an Outcome, as the SMTP
transport does. It knows nothing of the spool.

Local targets appended to a message's envelope are written as sendmail's
mailq shows them:

    \\alice        the mailbox of user alice (no further aliasing)
    /path         append to a file
    |command      pipe to a command

Such a recipient is delivered only while the current aliases still expand
some other recipient of the same message to it (`trusted_targets`): an
address that merely looks like "|command" (typed by a user, or sent over
SMTP) is never run. Otherwise it is an unknown user.

Privileges: running as root, every write happens in a forked child that has
dropped to the target's uid, gid and supplementary groups (plus the mail
spool's group when the spool is group-writable only, for the dotlock). A
mailbox is written as its user; files and pipes as the user whose alias
named them when that is a real user other than root, else as `nobody`
(sendmail's DefaultUser). Not root, everything runs as the caller.
Files and pipes are refused unless allow_file_targets / allow_pipe_targets.
Pipes get a clean environment, /bin/sh -c, and PIPE_TIMEOUT.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relayq.core import address, aliases, dsnparams
from relayq.core.outcome import DEFERRED, FAILED, OUTCOMES, SENT, Outcome
from relayq.delivery import mailbox

if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from typing import BinaryIO

    from relayq.core.config import Config

DEFAULT_USER = "nobody"
NOBODY_ID = 65534
PIPE_TIMEOUT = 300.0
MAX_OUTPUT = 4096  # bytes of a command's output kept for the bounce
TEMP_EXITS = (71, 74, 75)  # EX_OSERR, EX_IOERR, EX_TEMPFAIL: try again later
DELIVER = "deliver"  # an Expansion's status besides FAILED and DEFERRED: its own mailbox
EXPANDED = "expanded"  # an alias: addresses and local targets


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str


def lookup_user(name: str) -> User | None:
    """The passwd entry of `name`, or None."""
    try:
        pw = pwd.getpwnam(name)
    except (KeyError, ValueError):
        if name == DEFAULT_USER:
            return User(DEFAULT_USER, NOBODY_ID, NOBODY_ID, "/")
        return None
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


@dataclass(frozen=True)
class LocalTarget:
    kind: str  # aliases.USER | aliases.FILE | aliases.PIPE
    value: str  # user name, path or command
    user: str  # whose privileges the write runs with

    @property
    def record(self) -> str:
        """How the target is written as an envelope recipient."""
        if self.kind == aliases.USER:
            return "\\" + self.value
        if self.kind == aliases.PIPE:
            return "|" + self.value
        return self.value


@dataclass
class Expansion:
    """What one local recipient stands for."""

    status: str  # DELIVER | EXPANDED | FAILED | DEFERRED
    reply: str = ""
    direct: LocalTarget | None = None  # status "deliver": the recipient's own mailbox
    records: list[str] = field(default_factory=list)  # remote addresses + target records
    targets: dict[str, LocalTarget] = field(default_factory=dict)  # record -> target
    unknown: list[str] = field(default_factory=list)  # alias members that are no user


def is_record(addr: str) -> bool:
    """True for the recorded form of a local target (\\user, /path, |command)."""
    return addr[:1] in ("\\", "/", "|")


class LocalTransport:
    def __init__(
        self,
        cfg: Config,
        domain: str,
        local_domains: Collection[str],
        *,
        users: Callable[[str], User | None] = lookup_user,
        lock_timeout: float = mailbox.LOCK_TIMEOUT,
        pipe_timeout: float = PIPE_TIMEOUT,
    ) -> None:
        self.cfg = cfg
        self.domain = domain
        self.local_domains = frozenset(d.lower().rstrip(".") for d in local_domains)
        self.users = users
        self.lock_timeout = lock_timeout
        self.pipe_timeout = pipe_timeout
        self._table: aliases.Aliases | None = None
        self._table_key: tuple[int, int, int, int] | None = None

    # -- routing ---------------------------------------------------------------

    def local_part(self, addr: str) -> str | None:
        """The local part of an address in a local domain; None for a remote one."""
        local, domain = address.split(addr)
        if not domain:
            return local or None
        return local if domain.lower().rstrip(".") in self.local_domains else None

    def is_local(self, addr: str) -> bool:
        return is_record(addr) or self.local_part(addr) is not None

    # -- aliases -----------------------------------------------------------------

    def table(self) -> aliases.Aliases:
        """The aliases file, parsed again only when it changes; none at all is empty."""
        path = self.cfg.aliases_file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return aliases.Aliases(path)
        except OSError as exc:
            raise aliases.AliasError(f"{path}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if self._table is None or key != self._table_key:
                with os.fdopen(os.dup(fd), "rb") as f:
                    text = f.read().decode("utf-8", "surrogateescape")
                table = aliases.parse(text, path)
                self._table, self._table_key = table, key
            return self._table
        except OSError as exc:
            raise aliases.AliasError(f"{path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    @staticmethod
    def read_include(path: str) -> str:
        """An :include: file; refused when others may write it (they could add targets)."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise PermissionError(1, "group or world writable: refused")
            return f.read().decode("utf-8", "surrogateescape")

    def user(self, name: str) -> User | None:
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            return None
        return self.users(name) or (self.users(name.lower()) if name != name.lower() else None)

    def _owner(self, alias_name: str) -> str:
        user = self.user(alias_name)
        return user.name if user is not None and user.uid != 0 else DEFAULT_USER

    def expand(self, addr: str) -> Expansion:
        """Resolve a local recipient (see the module docstring)."""
        local = self.local_part(addr) or addr
        try:
            leaves, aliased = aliases.expand(
                local, self.table(), local_part=self.local_part, read_include=self.read_include
            )
        except aliases.AliasError as exc:
            code = "451" if exc.temporary else "554"
            status = DEFERRED if exc.temporary else FAILED
            return Expansion(status, f"{code} {exc.status} {exc.message}")
        if not aliased:
            user = self.user(local)
            if user is None:
                return Expansion(FAILED, f"550 5.1.1 <{addr}>... User unknown")
            return Expansion(DELIVER, direct=LocalTarget(aliases.USER, user.name, user.name))
        exp = Expansion(EXPANDED)
        for leaf in leaves:
            if leaf.kind == aliases.ADDRESS:
                exp.records.append(leaf.value)
                continue
            if leaf.kind == aliases.USER:
                user = self.user(leaf.value)
                if user is None:
                    exp.unknown.append(leaf.value)
                    continue
                target = LocalTarget(aliases.USER, user.name, user.name)
            else:
                target = LocalTarget(leaf.kind, leaf.value, self._owner(leaf.owner))
            if target.record not in exp.targets:
                exp.targets[target.record] = target
                exp.records.append(target.record)
        if not exp.records:
            names = ", ".join(exp.unknown)
            return Expansion(FAILED, f"550 5.1.1 <{addr}>... User unknown ({names})")
        return exp

    def trusted_targets(self, originals: list[str]) -> dict[str, LocalTarget]:
        """Every local target the given recipients expand to now (record -> target)."""
        out: dict[str, LocalTarget] = {}
        for addr in originals:
            exp = self.expand(addr)
            for record, target in exp.targets.items():
                out.setdefault(record, target)
        return out

    # -- delivery ----------------------------------------------------------------

    def deliver(self, target: LocalTarget, data: BinaryIO, *, sender: str, recipient: str,
                now: float) -> Outcome:
        """Write the message for one target; the Outcome's address is the target's record."""
        rec = target.record
        refused = self.refusal(target)
        if refused:
            return Outcome(rec, FAILED, refused, "5.7.1")
        user = self.user(target.user)
        if user is None:
            return Outcome(rec, FAILED, f"550 5.1.1 <{target.user}>... User unknown", "5.1.1")
        extra_groups: list[int] = []
        if target.kind == aliases.USER and self.cfg.mailbox_format == "mbox":
            extra_groups = self._spool_group()
            if os.geteuid() == 0 and user.uid != 0:
                try:
                    mailbox.create_mailbox(self.mbox_path(user), user.uid,
                                           (extra_groups or [user.gid])[0])
                except mailbox.MailboxError as exc:
                    return Outcome(rec, DEFERRED, f"450 {exc.status} {exc.message}", exc.status)

        def work() -> tuple[str, str]:
            return self._write(target, user, data, sender, recipient, now)

        status, reply = run_as(user, extra_groups, work)
        return Outcome(rec, status, reply, _status_code(reply))

    def refusal(self, target: LocalTarget) -> str:
        """The reply refusing a file or pipe target the configuration does not allow, or ""."""
        rec = target.record
        if target.kind == aliases.FILE and not self.cfg.allow_file_targets:
            return f"550 5.7.1 <{rec}>... Cannot mail directly to files (allow_file_targets is off)"
        if target.kind == aliases.PIPE and not self.cfg.allow_pipe_targets:
            return (f"550 5.7.1 <{rec}>... Cannot mail directly to programs "
                    "(allow_pipe_targets is off)")
        return ""

    def mailbox_path(self, user: User) -> str:
        """Where a user's mail goes: ~/Maildir or the mbox in mail_spool (mailbox_format)."""
        if self.cfg.mailbox_format == "maildir":
            return os.path.join(user.home, "Maildir")
        return self.mbox_path(user)

    def mbox_path(self, user: User) -> str:
        return os.path.join(self.cfg.mail_spool, user.name)

    def _spool_group(self) -> list[int]:
        """The mail spool's group, when only its group may create the dotlock there."""
        try:
            st = os.stat(self.cfg.mail_spool)
        except OSError:
            return []
        if st.st_mode & stat.S_IWGRP and not st.st_mode & stat.S_IWOTH:
            return [st.st_gid]
        return []

    def _write(self, target: LocalTarget, user: User, data: BinaryIO, sender: str,
               recipient: str, now: float) -> tuple[str, str]:
        """The delivery itself; runs with the target user's privileges."""
        try:
            if target.kind == aliases.USER:
                path = self.mailbox_path(user)
                if self.cfg.mailbox_format == "maildir":
                    mailbox.deliver_maildir(path, data, sender=sender, recipient=recipient,
                                            now=now)
                else:
                    mailbox.append_mbox(path, data, sender=sender, recipient=recipient, now=now,
                                        expect_uid=user.uid, timeout=self.lock_timeout)
                return SENT, f"250 2.0.0 delivered to mailbox {path}"
            if target.kind == aliases.FILE:
                mailbox.append_file(target.value, data, sender=sender, recipient=recipient,
                                    now=now, timeout=self.lock_timeout)
                return SENT, f"250 2.0.0 delivered to file {target.value}"
            return self._pipe(target.value, user, data, sender, recipient)
        except mailbox.MailboxError as exc:
            if exc.temporary:
                return DEFERRED, f"450 {exc.status} {exc.message}"
            return FAILED, f"550 {exc.status} {exc.message}"
        except OSError as exc:
            return DEFERRED, f"451 4.3.0 local delivery failed: {exc.strerror or exc}"

    def _pipe(self, command: str, user: User, data: BinaryIO, sender: str,
              recipient: str) -> tuple[str, str]:
        home = user.home if os.path.isdir(user.home) else "/"
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "USER": user.name,
            "LOGNAME": user.name,
            "SHELL": "/bin/sh",
            "LANG": "C",
            "SENDER": sender,
            "RECIPIENT": recipient,
        }
        data.seek(0)
        message = mailbox.trace_headers(sender, recipient) + data.read()
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env, cwd=home, start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            return DEFERRED, f"451 4.3.0 |{command}: cannot run: {exc.strerror or exc}"
        try:
            out, _ = proc.communicate(message, timeout=self.pipe_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.communicate()
            return DEFERRED, f"451 4.3.0 |{command}: timed out after {self.pipe_timeout:g}s"
        said = " ".join(out[:MAX_OUTPUT].decode("utf-8", "replace").split())[:200]
        said = f": {said}" if said else ""
        rc = proc.returncode
        if rc == 0:
            return SENT, f"250 2.0.0 delivered to command |{command}"
        if rc < 0:
            return DEFERRED, f"451 4.3.0 |{command}: killed by signal {-rc}{said}"
        if rc in TEMP_EXITS:
            return DEFERRED, f"451 4.3.0 |{command}: exit status {rc}{said}"
        return FAILED, f"554 5.3.0 |{command}: exit status {rc}{said}"


def _status_code(reply: str) -> str:
    parts = reply.split(" ", 2)
    return parts[1] if len(parts) > 1 and parts[1][:1] in "245" and "." in parts[1] else "5.0.0"


# -- privileges ------------------------------------------------------------------


def drop_privileges(user: User, extra_groups: list[int]) -> None:
    """Become `user` for good (real, effective and saved ids); checked afterwards."""
    from relayq.system import privilege

    privilege.drop_to(user.uid, user.gid, name=user.name, extra_groups=extra_groups)


def run_as(user: User, extra_groups: list[int], work: Callable[[], tuple[str, str]]
           ) -> tuple[str, str]:
    """Run `work` with `user`'s privileges: in a forked child when we are root.

    The child reports "STATUS<TAB>reply" on a pipe and leaves with os._exit,
    so no parent state (buffers, atexit handlers, locks) is flushed twice.
    A child that dies without a word is a temporary failure.
    """
    if os.geteuid() != 0:
        return work()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        try:
            drop_privileges(user, extra_groups)
            status, reply = work()
        except BaseException as exc:
            status, reply = DEFERRED, f"451 4.3.0 local delivery failed: {exc}"
        try:
            os.write(w, f"{status}\t{reply}".encode("utf-8", "replace")[:8192])
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read(8192):
            chunks.append(chunk)
    _, wstatus = os.waitpid(pid, 0)
    status, sep, reply = b"".join(chunks).decode("utf-8", "replace").partition("\t")
    if not sep or status not in OUTCOMES:
        how = (f"signal {os.WTERMSIG(wstatus)}" if os.WIFSIGNALED(wstatus)
               else f"status {os.waitstatus_to_exitcode(wstatus)}")
        return DEFERRED, f"451 4.3.0 local delivery process died ({how})"
    return status, reply


def orcpt_for(addr: str) -> str:
    """The ORCPT of an expanded recipient: its original address as xtext."""
    return "rfc822;" + dsnparams.xtext_encode(addr)


def delivered_to(record: str, orcpt: str, target: LocalTarget, domain: str) -> str:
    """The Delivered-To value for a recorded target: the user's address, else the original."""
    if target.kind == aliases.USER:
        return f"{target.value}@{domain}"
    parts = dsnparams.orcpt_address(orcpt)
    if parts and parts[0].lower() == "rfc822" and parts[1]:
        return parts[1]
    return record
