"""The sendmail submission mode: Args -> Request -> enqueue(), up to the commit point.

What the front door (relayq.cli.sendmail) runs for a message on stdin. It
builds the one Request of a command line, commits the message to the queue
(or hands it to the daemon through maildrop/ when the queue is not ours to
write), and says which delivery mode applies after the commit; starting that
delivery is the front door's. It imports nothing of relayq.delivery,
relayq.server or relayq.daemon (the import contract checks it): before the
commit only what committing needs is loaded.
"""

from __future__ import annotations

import os
import sys

from relayq.core import policy
from relayq.core.errors import RelayqError, UsageError

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.cli.flags import Args
    from relayq.core.config import Config
    from relayq.queue.spool import NewMessage, Spool
    from relayq.queue.submit import Context, Request
    from relayq.system.log import Log


class Committed:
    """A message this command committed: still locked (`msg`), and the delivery mode
    that applies now (q, d, b or i)."""

    __slots__ = ("ctx", "mode", "msg", "request", "spool")

    def __init__(self, msg: NewMessage, request: Request, mode: str, spool: Spool,
                 ctx: Context) -> None:
        self.msg = msg
        self.request = request
        self.mode = mode
        self.spool = spool
        self.ctx = ctx


def request_for(args: Args, user: str, uid: int, default_name: str) -> Request:
    """The Request of a command line: the one place argv becomes a Request.
    `default_name` is the full name without -F ($NAME, else the GECOS name)."""
    from relayq.queue.submit import Request

    return Request(user=user, uid=uid, sender=args.sender,
                   full_name=args.full_name if args.full_name is not None else default_name,
                   extract=args.extract, ignore_dots=args.ignore_dots,
                   recipients=args.recipients, notify=args.notify, ret=args.ret,
                   envid=args.envid, body=args.body, hops=args.hops)


def delivery_mode(args: Args, cfg: Config) -> str:
    """The delivery mode after the commit: -odX, else the configured one; -v makes
    background interactive (sendmail: the dialogue is shown in the foreground)."""
    mode = chosen_mode(args, cfg)
    if args.verbose and mode == policy.Mode.BACKGROUND:
        return policy.Mode.INTERACTIVE
    return mode


def chosen_mode(args: Args, cfg: Config) -> str:
    """-odX, else relayq.toml's delivery_mode (what `-bs` uses as it is)."""
    return args.delivery or cfg.delivery_mode


def submit(cfg: Config, log: Log, args: Args) -> Committed | None:
    """Commit the message on stdin; None when it was handed over through maildrop/
    (committed by the daemon or waiting for the next queue run: exit 0 either way)."""
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context, enqueue

    user, uid, gecos = user_names()
    req = request_for(args, user, uid, os.environ.get("NAME") or gecos)
    if not args.recipients and not args.extract:
        raise UsageError("Recipient names must be specified")
    spool = Spool(cfg.queue_dir)  # create() makes the directories the first time
    spool.enter(cfg)
    if not spool.writable():
        hand_over(cfg, spool, req, args)
        return None
    ctx = Context(cfg)
    msg, _ = enqueue(cfg, spool, req, stdin_chunks(), log, ctx)
    return Committed(msg, req, delivery_mode(args, cfg), spool, ctx)


def hand_over(cfg: Config, spool: Spool, req: Request, args: Args) -> None:
    """A queue we may not write (a user's mail, a root-owned queue): via maildrop/."""
    from relayq.core import address
    from relayq.queue import maildrop

    for arg in req.recipients:  # refuse a bad address now, not after exit 0
        address.parse_recipient_args(arg)
    if req.sender:
        address.parse_mailbox(req.sender, "sender")
    name = maildrop.hand_over_request(cfg, spool, req, stdin_chunks(), args.delivery or "")
    if args.verbose:
        if maildrop.valid_name(name):
            print(f"relayq: no daemon took the message; it waits in {spool.maildrop} "
                  "for the next queue run", flush=True)
        else:
            print(f"relayq: handed to the relayq daemon{' as ' + name if name else ''}",
                  flush=True)


def stdin_chunks() -> Iterator[bytes]:
    fd = sys.stdin.fileno() if sys.stdin is not None else 0
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        except OSError as exc:
            raise RelayqError(f"cannot read the message: {exc.strerror}", 74) from None
        if not chunk:
            return
        yield chunk


def user_names() -> tuple[str, int, str]:
    """(login name, uid, full name from GECOS), sendmail's username() rules."""
    import pwd

    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
        name, gecos = pw.pw_name, pw.pw_gecos
    except KeyError:
        return str(uid), uid, ""
    if uid == 0:
        try:
            login = os.getlogin()
            name, gecos = login, pwd.getpwnam(login).pw_gecos
        except (OSError, KeyError):
            pass
    full = gecos.split(",", 1)[0].replace("&", name.capitalize()).strip()
    return name, uid, full
