"""What each SMTP command does, the commit, and the reply: relayq's side of a session.

Every message goes through submit.enqueue(), the same funnel as the command
line, and DATA is answered 250 only after enqueue() returned, i.e. after the
commit point; the reply names the queue id. Nothing here touches aiosmtpd's
internals (relayq.server.aio holds those): the hooks see aiosmtpd's public
session and envelope objects and the few methods our Server offers.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from relayq.core import address
from relayq.core.errors import DataError, RelayqError, TempFailure

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from relayq.core.config import Config
    from relayq.queue.submit import Context
    from relayq.system.log import Log

DEFAULT_SIZE = 32 << 20  # advertised in SIZE when max_message_size is 0
CHUNK = 1 << 16
_ENHANCED = {"221": "2.0.0", "250": "2.0.0", "251": "2.1.5", "252": "2.5.0",
             "421": "4.7.0", "451": "4.3.0", "452": "4.5.3",
             "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
             "530": "5.7.0", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3",
             "554": "5.0.0", "555": "5.5.4"}


class Server(Protocol):
    """What the hooks use of the session's server (relayq.server.aio.Server): the DSN
    parameters it took off MAIL and RCPT, its timer and the peer's identity."""

    mail_dsn: dict[str, str]
    rcpt_dsn: dict[str, str]

    def restart_timer(self, duration: float | None = None) -> None: ...

    def peer_user(self) -> tuple[str, int] | None: ...


class State:
    """What every connection shares: the configuration (swapped on reload) and counters."""

    def __init__(self, cfg: Config, log: Log, ctx: Context, *, user: str, uid: int,
                 strict: bool, on_commit: Callable[[str], None] | None) -> None:
        self.cfg = cfg
        self.log = log
        self.ctx = ctx
        self.user = user  # the submitting user recorded in the envelope
        self.uid = uid
        self.strict = strict  # TCP: refuse bare LF / CR; -bs: normalise
        self.on_commit = on_commit
        self.handover = False  # -bs by a user who may not write the queue: via maildrop/
        # connections per listener process, one slot each in memory the
        # processes share (relayq.server.prefork), so the limit holds for them all
        self.counts = memoryview(bytearray(8)).cast("q")
        self.slot = 0
        self.busy = 0  # commits in progress
        self.committed: list[str] = []

    @property
    def active(self) -> int:
        return sum(self.counts)

    def connected(self, delta: int) -> None:
        self.counts[self.slot] += delta

    @property
    def size_limit(self) -> int:
        return self.cfg.max_message_size or DEFAULT_SIZE


def enhance(line: str) -> str:
    """Give a reply without an enhanced status code one (RFC 2034)."""
    code, sep, rest = line.partition(" ")
    if sep and len(code) == 3 and code[0] in "245" and code.isdigit() and code != "220":
        first = rest.split(" ", 1)[0]
        if not (first[:1].isdigit() and first.count(".") == 2):
            enhanced = _ENHANCED.get(code, f"{code[0]}.0.0")
            return f"{code} {enhanced} {rest}"
    return line


def take_params(arg: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """Split `FROM:<a@b> RET=HDRS X=1` into the argument without `names` and their values.

    aiosmtpd knows no DSN parameter and upper-cases the rest (ENVID and ORCPT
    are case-sensitive xtext), so they are taken out first.
    """
    end, quoted, depth = 0, False, 0
    for i, ch in enumerate(arg):
        if ch == '"' and (i == 0 or arg[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">" and depth:
            depth -= 1
            if not depth:
                end = i + 1
                break
    if not end:
        end = len(arg.split(" ", 1)[0])
    head, rest = arg[:end], arg[end:]
    keep, taken = [], {}
    for word in rest.split():
        key, _, value = word.partition("=")
        if key.upper() in names:
            taken[key.upper()] = value
        else:
            keep.append(word)
    return " ".join([head, *keep]), taken


class Handler:
    """aiosmtpd hooks: check each command, and commit at the end of DATA."""

    def __init__(self, state: State) -> None:
        self.state = state

    async def handle_EHLO(self, server: Server, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        lines = [r[4:] for r in responses if r[4:] != "HELP"]
        lines += ["PIPELINING", "DSN", "ENHANCEDSTATUSCODES", "HELP"]
        return [f"250-{ln}" for ln in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(self, server: Server, session: Any, envelope: Any, addr: str,
                          options: list[str]) -> str:
        if addr != "<>":
            try:
                address.parse_mailbox(addr, "sender")
            except DataError as exc:
                return f"553 5.1.7 {one_line(exc.message)}"
        envelope.mail_from = addr
        envelope.mail_options.extend(options)
        envelope.dsn = dict(server.mail_dsn)
        envelope.rcpt_dsn = {}
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Server, session: Any, envelope: Any, addr: str,
                          options: list[str]) -> str:
        limit = self.state.cfg.smtp_max_recipients
        if limit and len(envelope.rcpt_tos) >= limit:
            return f"452 4.5.3 Too many recipients (at most {limit} per message)"
        try:
            found = address.parse_recipient_args(addr)
        except DataError as exc:
            return f"553 5.1.3 {one_line(exc.message)}"
        if len(found) != 1:
            return "553 5.1.3 One address per RCPT command"
        envelope.rcpt_tos.append(found[0])
        envelope.rcpt_options.extend(options)
        envelope.rcpt_dsn[found[0]] = (server.rcpt_dsn.get("NOTIFY", ""),
                                       server.rcpt_dsn.get("ORCPT", ""))
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Server, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or b""
        if self.state.strict:
            rest = content.replace(b"\r\n", b"")
            for bad, name in ((b"\n", "LF"), (b"\r", "CR")):
                if bad in rest:
                    self.state.log.notice(f"refused a message with a bare {name} from "
                                          f"{_peer(session)}")
                    return (f"550 5.6.0 Bare {name} in message data is not allowed "
                            "(lines end in CRLF)")
        loop = asyncio.get_running_loop()
        server.restart_timer()
        self.state.busy += 1
        try:
            qid = await loop.run_in_executor(None, self._commit, envelope, content,
                                             session, server)
        except (TempFailure, OSError) as exc:
            text = exc.message if isinstance(exc, RelayqError) else str(exc)
            return f"451 4.3.0 {one_line(text)}: try again later"
        except DataError as exc:
            if exc.message.startswith("Message is too large"):
                return f"552 5.3.4 {one_line(exc.message)}"
            return f"554 5.6.0 {one_line(exc.message)}"
        except RelayqError as exc:
            self.state.log.error(f"SMTP submission failed: {exc.message}")
            code = "554 5.5.0" if exc.code in (64, 65) else "451 4.3.0"
            return f"{code} {one_line(exc.message)}"
        except Exception as exc:  # a bug: never 250, never a traceback to the client
            self.state.log.error(f"SMTP submission failed: {type(exc).__name__}: {exc}")
            return "451 4.3.0 Internal error; try again later"
        finally:
            self.state.busy -= 1
        self.state.committed.append(qid)
        if self.state.on_commit is not None:
            self.state.on_commit(qid)
        return f"250 2.0.0 {qid} Message accepted for delivery"

    def _commit(self, envelope: Any, content: bytes, session: Any = None,
                server: Server | None = None) -> str:
        """enqueue() in a worker thread; the message is durable when this returns."""
        from relayq.queue.spool import Spool
        from relayq.queue.submit import Request, enqueue

        st = self.state
        who = server.peer_user() if server is not None and st.strict else None
        params = {}
        for rcpt, pair in envelope.rcpt_dsn.items():
            params[rcpt] = params[address.qualify(rcpt, st.ctx.domain)] = pair
        body = [o.split("=", 1)[1] for o in envelope.mail_options if o.startswith("BODY=")]
        req = Request(user=who[0] if who else st.user, uid=who[1] if who else st.uid,
                      identified=who is not None,  # the sender is then that user's -f
                      sender="" if envelope.mail_from == "<>" else envelope.mail_from,
                      recipients=list(envelope.rcpt_tos), rcpt_params=params,
                      ignore_dots=True,  # aiosmtpd has already removed the transparency dots
                      received_from=_trace(session, st.user, who[0] if who else ""),
                      ret=envelope.dsn.get("RET", ""), envid=envelope.dsn.get("ENVID", ""),
                      body=body[0] if body else "",  # enqueue() checks it (aiosmtpd did)
                      bs=not st.strict)
        spool = Spool(st.cfg.queue_dir)  # create() makes the directories if they went away
        if st.handover:
            from relayq.queue import maildrop

            qid = maildrop.hand_over_request(st.cfg, spool, req, _chunks(content))
            return qid or "(handed to the relayq daemon)"
        msg, _ = enqueue(st.cfg, spool, req, _chunks(content), st.log, st.ctx)
        msg.release()
        return msg.qid


def _chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), CHUNK):
        yield bytes(view[i : i + CHUNK])


def one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def _trace(session: Any, user: str, peer_user: str = "") -> str:
    """The `from` clause of our Received field: the client's HELO name and address,
    and the local user owning the client's socket when the kernel told us (sendmail's
    form with an ident answer: "helo (user@localhost [127.0.0.1])").

    The HELO name is the client's word, so only harmless characters are kept.
    """
    helo = "".join(c for c in str(getattr(session, "host_name", "") or "")
                   if c.isascii() and (c.isalnum() or c in "-._:[]"))[:64] or "unknown"
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        who = f"{peer_user}@" if peer_user else ""
        return f"{helo} ({who}localhost [{peer[0]}])"
    return f"{helo} ({user}@localhost)"  # -bs: the invoking user, as sendmail writes it


def _peer(session: Any) -> str:
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        return f"[{peer[0]}]"
    return "a local client"

