"""The queue listing: what `mailq` shows, read from the spool and rendered.

The plain listing is byte for byte sendmail 8.17's (see relayq.cli.mailq for
the differences); --json is everything about every message, for scripts. The
request is mailq's own flags: `mailq` run by anyone who may read the queue
lists it itself, and for a user who may not, the daemon (relayq.daemon.control)
answers with listing_for(): their own messages only. Both use this module,
which is why it sits below both.
"""

from __future__ import annotations

import os
import time

from relayq.core.errors import PermissionRefused, QueueError, UsageError

TYPE_CHECKING = False  # the typing module costs ~3 ms on every listing

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from relayq.core.config import Config
    from relayq.core.envelope import Envelope
    from relayq.core.selector import Selector
    from relayq.queue.spool import Spool


MAX_SELECTORS = 100  # over the daemon's socket: each is tried on every message
HEADER = b"-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------\n"
HEADER_V = b"-----Q-ID----- --Size-- -Priority- ---Q-Time--- --------Sender/Recipient--------\n"


class Options:
    __slots__ = ("config", "help", "json", "json_lines", "selectors", "verbose")

    def __init__(self) -> None:
        self.config: str | None = None
        self.help = False
        self.json = False
        self.json_lines = False
        self.selectors: list[Selector] = []
        self.verbose = False


class Item:
    """One queue entry as listed: a message, or a damaged entry (env is None)."""

    __slots__ = ("env", "locked", "problem", "qid", "size")

    def __init__(
        self, qid: str, env: Envelope | None, problem: str, size: int, locked: bool
    ) -> None:
        self.qid = qid
        self.env = env
        self.problem = problem
        self.size = size
        self.locked = locked


def parse_args(args: list[str]) -> Options:
    """sendmail-style flags: clustered (-vAc) or with separate values (-C file)."""
    opts = Options()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("--json", "--json-lines"):
            if opts.json or opts.json_lines:
                raise UsageError("--json and --json-lines: one listing format at a time")
            opts.json = arg == "--json"
            opts.json_lines = not opts.json
            continue
        if arg == "--help":
            opts.help = True
            continue
        if arg == "--":
            if i < len(args):
                raise UsageError(f"unexpected argument {args[i]!r}")
            break
        if arg.startswith("--") or not arg.startswith("-") or arg == "-":
            raise UsageError(f"unknown argument {arg!r} (see mailq --help)")
        j = 1
        while j < len(arg):
            flag = arg[j]
            j += 1
            if flag == "v":
                opts.verbose = True
                continue
            if flag == "h":
                opts.help = True
                continue
            if flag not in "ACLOoqb":
                raise UsageError(f"unknown option -{flag} (see mailq --help)")
            value = arg[j:]
            if not value:
                if i >= len(args):
                    raise UsageError(f"option -{flag} needs a value")
                value = args[i]
                i += 1
            _option(opts, flag, value)
            break
    return opts


def _option(opts: Options, flag: str, value: str) -> None:
    if flag == "A":
        if value not in ("c", "m"):
            raise UsageError(f"-A{value}: expected -Ac or -Am")
    elif flag == "b":
        if value != "p":
            raise UsageError(f"-b{value}: mailq only lists the queue (-bp)")
    elif flag == "C":
        opts.config = value
    elif flag == "q":
        from relayq.core.selector import parse

        opts.selectors.append(parse(value))
    # -L tag, -O option=value, -oXvalue: sendmail settings with no meaning here


def listing_for(cfg: Config, spool: Spool, uid: int, gid: int, request: str) -> Iterator[bytes]:
    """For the daemon: the listing a user asked for; their own messages only,
    unless they are root or in the admin group. Errors are raised before the
    first byte, so they become the reply's status."""
    import json

    try:
        args = json.loads(request or "[]")
    except ValueError:
        args = None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise UsageError("malformed listing request")
    opts = parse_args(args)
    if opts.config is not None:
        raise PermissionRefused("-C: only root may name a configuration file")
    if len(opts.selectors) > MAX_SELECTORS:
        raise UsageError(f"more than {MAX_SELECTORS} -q selectors")
    items = collect(spool, opts.selectors, None if sees_all(cfg, uid, gid) else uid)
    return iter([render(spool.queue, items, opts)])


def render(path: str, items: list[Item], opts: Options) -> bytes:
    """The listing in the format the flags asked for."""
    if opts.json:
        return render_json(path, items)
    if opts.json_lines:
        return render_json_lines(items)
    return render_text(path, items, opts.verbose)


def sees_all(cfg: Config, uid: int, gid: int) -> bool:
    import grp
    import pwd

    if uid == 0:
        return True
    if not cfg.admin_group:
        return False
    try:
        admin = grp.getgrnam(cfg.admin_group).gr_gid
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return admin == gid or admin in os.getgrouplist(name, gid)


def collect(spool: Spool, selectors: list[Selector], uid: int | None = None) -> list[Item]:
    """Read the queue once; raises PermissionRefused (77) if it may not be read.

    With `uid`, only that user's messages (the daemon listing for a user).
    """
    from relayq.core.selector import matches

    has_rs = any(s.kind in "RS" for s in selectors)
    items: list[Item] = []
    for qid, env, problem, size, locked in spool.listing(_ids(spool)):
        if uid is not None and (env is None or env.uid != uid):
            continue  # before any selector work: not theirs to see
        if env is None:
            if problem == "job completed" or has_rs or not matches(selectors, qid, "", []):
                continue
            items.append(Item(qid, None, _why(qid, problem), 0, False))
            continue
        if not matches(selectors, qid, env.sender, [r.address for r in env.pending()]):
            continue
        items.append(Item(qid, env, "", size, locked))
    return items


def _ids(spool: Spool) -> list[str]:
    return spool.ids(_names(spool))


def _names(spool: Spool) -> list[str]:
    try:
        return spool.names()
    except QueueError:
        if not os.access(spool.queue, os.R_OK | os.X_OK):
            raise PermissionRefused(f"{spool.queue}: permission denied") from None
        raise


def _why(qid: str, problem: str) -> str:
    prefix = f"{qid}: "
    return problem[len(prefix) :] if problem.startswith(prefix) else problem


def stream_text(spool: Spool, verbose: bool) -> Iterator[bytes]:
    """The whole-queue listing, printed as it is read: the first line comes at
    once however large the queue. The count is the directory's; a message
    delivered meanwhile shows as "(job completed)", as in sendmail."""
    names = _names(spool)
    path = spool.queue
    n = sum(1 for name in names if name.endswith(".e"))
    if not n:
        yield _b(f"{path} is empty\n\t\tTotal requests: 0\n")
        yield render_dead(spool, verbose)
        return
    yield _b(f"\t\t{path} ({n} request{'' if n == 1 else 's'})\n")
    yield HEADER_V if verbose else HEADER  # out before the sort (40 ms at 100,000)
    ids = spool.ids(names)
    del names
    for qid, env, problem, size, locked in spool.listing(ids):
        if env is None and problem == "job completed":
            yield _b(f"{qid:>13} (job completed)\n")
        else:
            yield render_item(Item(qid, env, _why(qid, problem), size, locked), verbose)
    yield _b(f"\t\tTotal requests: {n}\n")
    yield render_dead(spool, verbose)


def render_dead(spool: Spool, verbose: bool) -> bytes:
    """Dead letters (nobody could be told of their failure) after the queue: kept
    until an operator removes them, so they are listed until then."""
    dead = [render_item(Item(qid, env, "", size, False), verbose)
            for qid, env, size in spool.dead_letters()]
    if not dead:
        return b""
    n = len(dead)
    return b"".join([_b(f"\t\t{spool.quarantine_dir} ({n} dead letter{'' if n == 1 else 's'})\n"),
                     *dead, _b(f"\t\tTotal dead letters: {n}\n")])


def prtstr(text: str, limit: int) -> bytes:
    """sendmail's prtstr(): at most `limit` columns, `\\` doubled, the rest as \\ooo."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text[:limit].encode()  # the usual address: nothing to escape
    out = bytearray()
    ml = limit
    for c in text.encode("utf-8", "surrogateescape"):
        if ml <= 0:
            break
        ml -= 1
        if c == 0x5C:
            if ml > 0:
                ml -= 1
                out += b"\\\\"
        elif 0x20 <= c < 0x7F:
            out.append(c)
        else:
            ml -= 3
            if ml > 0:
                out += b"\\%03o" % c
    return bytes(out)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def render_text(path: str, items: list[Item], verbose: bool = False) -> bytes:
    """The listing of sendmail 8.17's print_single_queue() and printqueue()."""
    if not items:
        return _b(f"{path} is empty\n\t\tTotal requests: 0\n")
    n = len(items)
    out = [_b(f"\t\t{path} ({n} request{'' if n == 1 else 's'})\n")]
    out.append(HEADER_V if verbose else HEADER)
    out.extend(render_item(item, verbose) for item in items)
    out.append(_b(f"\t\tTotal requests: {n}\n"))
    return b"".join(out)


def render_item(item: Item, verbose: bool) -> bytes:
    env = item.env
    if env is None:
        return _b(f"{item.qid:>13} (damaged: {item.problem})\n")
    pending = env.pending()
    stamp = time.ctime(env.created)
    line = [_b(f"{item.qid:>13}{'*' if item.locked else ' '}")]
    sender = env.sender or "<>"
    if verbose:
        priority = 30000 * len(pending) + item.size
        line.append(_b(f"{item.size:8d} {priority:10d} {stamp[4:16]} "))
        line.append(prtstr(sender, 78))
    else:
        line.append(_b(f"{item.size:8d} {stamp[:16]} "))
        line.append(prtstr(sender, 39))
    if verbose and env.account:  # as sendmail's -v shows (---controlling user---)
        line.append(b"\n\t\t\t\t\t\t(account " + prtstr(env.account, 64) + b")")
    body = "8BITMIME" if env.body.upper() == "8BITMIME" else ""
    error = ("Held by the administrator (relayq release)" if env.held
             else f"Dead letter: {env.dead}" if env.dead else env.error)
    if error or body:
        line.append(_b(f"\n    {body[:10]:>10}"))
        if error:
            line.append(b"   (" + _b(error)[: 100 if verbose else 60] + b")")
    for r in pending or (env.recipients if env.dead else []):
        if verbose:
            line.append(b"\n\t\t\t\t\t\t" + prtstr(r.address, 71))
        else:
            line.append(b"\n\t\t\t\t\t " + prtstr(r.address, 38))
    line.append(b"\n")
    return b"".join(line)


def _iso(t: float) -> str | None:
    if not t:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def render_json(path: str, items: list[Item]) -> bytes:
    """Everything about every listed message, for scripts."""
    import json

    messages: list[dict[str, Any]] = []
    damaged: list[dict[str, str]] = []
    for item in items:
        env = item.env
        if env is None:
            damaged.append({"id": item.qid, "problem": item.problem})
            continue
        messages.append(
            {
                "id": item.qid,
                "size": item.size,
                "created": _iso(env.created),
                "sender": env.sender,
                "user": env.user,
                "body": env.body,
                "smtputf8": env.smtputf8,
                "envid": env.envid,
                "ret": env.ret,
                "msgid": env.msgid,
                "is_dsn": env.is_dsn,
                "locked": item.locked,
                "attempts": env.attempts,
                "last_try": _iso(env.last_try),
                "next_try": _iso(env.next_try),
                "error": env.error,
                "held": env.held,
                "account": env.account or "default",
                "recipients": [
                    {
                        "address": r.address,
                        "state": r.state,
                        "reply": r.reply,
                        "notify": r.notify,
                        "orcpt": r.orcpt,
                    }
                    for r in env.recipients
                ],
            }
        )
    doc = {"queue": path, "messages": messages, "damaged": damaged, "total": len(items)}
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def queue_name(item: Item) -> str:
    """Postfix's queue a relayq message would be in, for `postqueue -j` scripts:
    hold (relayq hold), active (a run has it locked), deferred (tried, not
    delivered yet), incoming (queued, never tried)."""
    env = item.env
    assert env is not None
    if env.held:
        return "hold"
    if item.locked:
        return "active"
    return "deferred" if env.attempts or env.error else "incoming"


def postqueue_objects(items: list[Item]) -> list[dict[str, Any]]:
    """`postqueue -j`'s objects for the listed messages. Damaged entries are left
    out, as showq leaves out a corrupt file (mailq and --json list them)."""
    return [postqueue_object(item) for item in items if item.env is not None]


def postqueue_object(item: Item) -> dict[str, Any]:
    """One message as `postqueue -j` shows it, with Postfix's member names: the
    recipients still to be delivered, each deferred one with its reason."""
    env = item.env
    assert env is not None
    name = queue_name(item)
    recipients = []
    for r in env.pending():
        rcpt = {"address": r.address}
        reason = (r.reply or env.error) if name == "deferred" else ""
        if reason:
            rcpt["delay_reason"] = reason
        recipients.append(rcpt)
    obj: dict[str, Any] = {"queue_name": name, "queue_id": item.qid,
                           "arrival_time": int(env.created), "message_size": item.size,
                           "sender": env.sender, "recipients": recipients}
    if env.account:  # relayq's own member, for a non-default account only: the
        obj["account"] = env.account  # default's objects stay exactly postqueue's
    return obj


def render_json_lines(items: list[Item]) -> bytes:
    """`postqueue -j`: one object per message and line (JSON Lines)."""
    import json

    return "".join(json.dumps(obj, separators=(",", ":")) + "\n"
                   for obj in postqueue_objects(items)).encode("ascii")


def stream_json_lines(spool: Spool) -> Iterator[bytes]:
    """The whole queue as `postqueue -j` lines, each written as it is read."""
    import json

    for qid, env, _, size, locked in spool.listing(_ids(spool)):
        if env is not None:
            obj = postqueue_object(Item(qid, env, "", size, locked))
            yield (json.dumps(obj, separators=(",", ":")) + "\n").encode("ascii")
