"""The SMTP way in: a loopback listener (daemon) and `sendmail -bs`, on aiosmtpd.

Every message goes through submit.enqueue(), the same funnel as the command
line (the same header fixes and masquerading), and DATA is answered 250 only
after enqueue() returned, i.e. after the commit point. The reply names the
queue id.

Never an open relay:
- only local clients may talk to it: a TCP peer must be 127.0.0.1 or ::1
  (LOCAL_CLIENTS); anyone else, elsewhere in 127/8 included, gets
  554 5.7.1 and the connection is closed. AUTH is not offered (not
  implemented in this version), so no remote client can ever qualify;
- binding an address outside the loopback range needs `listen_nonloopback =
  true`, and even then only the local clients above may submit.

Limits, each with its own reply: message size (SIZE advertised; 552 5.3.4),
recipients per message (452 4.5.3), line length (500 5.5.2), concurrent
connections (421 4.7.0 and close), idle time between commands
(`smtp_timeout`) and the whole DATA phase (`smtp_data_timeout`): a
slow-drip client is dropped with 421 4.4.2 when its time is up. An HTTP
request (GET, POST, CONNECT, ...) as a command closes the connection.

SMTP smuggling: the listener accepts only CRLF as a line end inside DATA
(the end of data is CRLF . CRLF and nothing else). A message holding a bare
LF or a bare CR is refused whole with 550 5.6.0, as sendmail 8.18 and
Postfix with smtpd_forbid_bare_newline do, so "\\n.\\n" inside the data can
neither end the message here nor reach the relay. Commands may end in a bare
LF (harmless: they cannot carry a message).

`sendmail -bs` runs the same protocol and handler over stdin/stdout for a
local program (PHP and mail libraries); there the caller is already trusted
(it could run `sendmail` directly), so bare LF is normalised to CRLF on
input and a stray CR becomes a space as on the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import threading
from email import _header_value_parser as _vp  # what aiosmtpd parses addresses with
from email.errors import HeaderParseError
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import SMTP

from relayq.core import address, dsnparams
from relayq.core.config import parse_listen
from relayq.core.errors import (
    EX_OK,
    ConfigError,
    DataError,
    RelayqError,
    TempFailure,
)
from relayq.system import hostname

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from relayq.core.config import Config
    from relayq.queue.submit import Context
    from relayq.system.log import Log

LOCAL_CLIENTS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
DEFAULT_SIZE = 32 << 20  # advertised in SIZE when max_message_size is 0
CHUNK = 1 << 16
RUNAWAY_LINE = 1 << 16  # a refused data line: no more of it is held (_LineCap)
HTTP_VERBS = ("GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "DELETE")
JUNK_LIMITS = {"NOOP": 100, "RSET": 100, "HELP": 20, "VRFY": 20, "EXPN": 20, "EHLO": 20,
               "HELO": 20, "*": 1_000_000}
_ENHANCED = {"221": "2.0.0", "250": "2.0.0", "251": "2.1.5", "252": "2.5.0",
             "421": "4.7.0", "451": "4.3.0", "452": "4.5.3",
             "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
             "530": "5.7.0", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3",
             "554": "5.0.0", "555": "5.5.4"}

_aiolog = logging.getLogger("mail.log")  # aiosmtpd's chatter: our own log says what matters
_aiolog.addHandler(logging.NullHandler())
_aiolog.propagate = False


# --- addresses to listen on ---------------------------------------------------------


def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_config(cfg: Config) -> list[tuple[str, int]]:
    """The listen addresses; ConfigError (78) for a non-loopback one not allowed, and
    for a smarthost that is one of them (a relay loop: issue 12 §3)."""
    out = []
    if not cfg.listen:
        raise ConfigError("listen: no address to listen on")
    for spec in cfg.listen:
        host, port = parse_listen(spec)
        if not _is_loopback(host) and not cfg.listen_nonloopback:
            raise ConfigError(f"listen: {spec} is not a loopback address; set "
                              "listen_nonloopback = true to bind it (only local clients "
                              "may relay even then)")
        out.append((host, port))
    cfg.check_no_loop()
    return out


def check_sockets(cfg: Config, socks: list[socket.socket]) -> None:
    """The same rule for sockets passed by systemd."""
    for s in socks:
        if s.family not in (socket.AF_INET, socket.AF_INET6):
            raise ConfigError("listen: systemd passed a socket that is not TCP/IP")
        host = s.getsockname()[0]
        if not _is_loopback(host) and not cfg.listen_nonloopback:
            raise ConfigError(f"listen: the socket from systemd is bound to {host}, not a "
                              "loopback address; set listen_nonloopback = true to allow it")
    cfg.check_no_loop([f"[{s.getsockname()[0]}]:{s.getsockname()[1]}" for s in socks])


def bind(cfg: Config) -> list[socket.socket]:
    """Bind and listen on every configured address (before dropping privileges)."""
    out: list[socket.socket] = []
    for host, port in check_config(cfg):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(128)
        except OSError as exc:
            s.close()
            for other in out:
                other.close()
            shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            code = 77 if exc.errno == 13 else 75
            raise RelayqError(f"cannot listen on {shown}: {exc.strerror}", code) from None
        out.append(s)
    return out


# --- the protocol ----------------------------------------------------------------------


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


_UNKNOWN = object()


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _enhance(line: str) -> str:
    """Give a reply without an enhanced status code one (RFC 2034)."""
    code, sep, rest = line.partition(" ")
    if sep and len(code) == 3 and code[0] in "245" and code.isdigit() and code != "220":
        first = rest.split(" ", 1)[0]
        if not (first[:1].isdigit() and first.count(".") == 2):
            enhanced = _ENHANCED.get(code, f"{code[0]}.0.0")
            return f"{code} {enhanced} {rest}"
    return line


def _take_params(arg: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
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


class Server(SMTP):
    """aiosmtpd's SMTP with relayq's limits, access rule and DSN parameters."""

    def __init__(self, state: State, **kwargs: Any) -> None:
        self.state = state
        # the stream limit is the longest line; it must be set before SMTP builds its reader
        self.line_length_limit = state.cfg.smtp_max_line + 1  # + a transparent dot
        self.data_timeout = state.cfg.smtp_data_timeout
        self._plain_replies = False
        self._mail_dsn: dict[str, str] = {}
        self._rcpt_dsn: dict[str, str] = {}
        self._counted = False
        self._peer_user: object = _UNKNOWN  # peer_user(): not looked up yet
        super().__init__(
            Handler(state),
            hostname=hostname.smtp_name(state.cfg.ehlo_name, state.cfg.domain),  # loops: #12
            ident="ESMTP relayq",
            data_size_limit=state.size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=state.cfg.smtp_timeout,
            command_call_limit=JUNK_LIMITS,
            **kwargs,
        )
        for verb in HTTP_VERBS:
            self._smtp_methods[verb] = self._http

    def clone(self) -> Server:
        """A Server for a new connection, without aiosmtpd's constructor.

        SMTP.__init__ introspects the class on every connection (inspect.
        getmembers, signature): a sixth of the listener's time with one
        message per session. The settings it computes are the same for every
        connection, so a clone copies them, rebinds the bound methods to itself
        and builds only the per-connection stream state (tests compare a clone
        with a constructed Server).
        """
        proto = Server.__new__(Server)
        vars(proto).update(vars(self))
        proto._smtp_methods = {k: _rebind(v, self, proto)
                               for k, v in self._smtp_methods.items()}
        proto._auth_methods = {k: type(v)(_rebind(v.method, self, proto), v.is_builtin)
                               for k, v in self._auth_methods.items()}
        proto._mail_dsn, proto._rcpt_dsn = {}, {}
        proto._peer_user = _UNKNOWN
        asyncio.StreamReaderProtocol.__init__(
            proto, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=proto._cb_client_connected, loop=self.loop)
        return proto

    # connection bookkeeping
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:
            self._counted = True
            self.state.connected(1)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.state.connected(-1)
        super().connection_lost(error)

    def peer_user(self) -> tuple[str, int] | None:
        """(name, uid) of the local user whose process connected, looked up once per
        connection (peer_uid); None for a client the kernel cannot name."""
        if self._peer_user is _UNKNOWN:
            self._peer_user = None
            peer = self.session.peer if self.session is not None else None
            ours = (self.transport.get_extra_info("sockname")
                    if self.transport is not None else None)
            if (isinstance(peer, tuple) and isinstance(ours, tuple) and len(peer) >= 2
                    and len(ours) >= 2 and peer[0].split("%", 1)[0] in LOCAL_CLIENTS):
                uid = peer_uid((peer[0], peer[1]), (ours[0], ours[1]))
                if uid is not None:
                    self._peer_user = (_user_name(uid), uid)
        return self._peer_user  # type: ignore[return-value]

    def _refusal(self) -> str:
        peer = self.session.peer if self.session is not None else None
        host = self.hostname
        if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
            ip = peer[0].split("%", 1)[0]
            if ip not in LOCAL_CLIENTS:
                self.state.log.notice(f"refused SMTP connection from [{ip}]: not a local client")
                return f"554 5.7.1 {host} relayq accepts mail from local clients only"
        if self.state.active > self.state.cfg.smtp_max_connections:
            self.state.log.notice("refused SMTP connection: too many connections")
            return f"421 4.7.0 {host} Too many connections, try again later"
        return ""

    async def _handle_client(self) -> None:
        refusal = self._refusal()
        if refusal:
            await self.push(refusal)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    def _timeout_cb(self) -> None:
        transport: Any = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n"
                                .encode())
        super()._timeout_cb()

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and not self._plain_replies:
            status = _enhance(status)
        await super().push(status)

    async def _http(self, arg: str | None) -> None:
        await self.push("554 5.7.0 This is an SMTP server, not a web server")
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.transport.close()

    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True  # no enhanced codes in HELO/EHLO replies (RFC 2034)
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address of a MAIL/RCPT argument and the rest, as aiosmtpd's parses it.

        aiosmtpd 1.4 defines a typing.Protocol class inside this method, on
        every MAIL and RCPT: a tenth of the listener's time per message.
        """
        if not arg:
            return "", ""
        found: Any
        try:
            if arg.lstrip().startswith("<"):
                found, rest = _vp.get_angle_addr(arg)
            else:
                found, rest = _vp.get_addr_spec(arg)
        except HeaderParseError:
            return None, None
        addr: str = found.addr_spec
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._mail_dsn = {}
        if arg and self.session is not None and self.session.extended_smtp:
            arg, taken = _take_params(arg, ("RET", "ENVID"))
            try:  # the rule every way in and the SMTP client apply (relayq.core.dsnparams)
                self._mail_dsn = {key: check(taken[key]) if key in taken else ""
                                  for key, check in (("RET", dsnparams.ret),
                                                     ("ENVID", dsnparams.envid))}
            except dsnparams.BadParam as exc:
                await self.push(f"501 5.5.4 {_one_line(str(exc))}")
                return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._rcpt_dsn = {}
        if arg and self.session is not None and self.session.extended_smtp:
            arg, taken = _take_params(arg, ("NOTIFY", "ORCPT"))
            try:  # ORCPT in UTF-8 (an SMTPUTF8 client) is kept as xtext
                self._rcpt_dsn = {
                    "NOTIFY": dsnparams.notify(taken["NOTIFY"]) if "NOTIFY" in taken else "",
                    "ORCPT": dsnparams.orcpt(taken["ORCPT"], utf8=True)
                    if "ORCPT" in taken else ""}
            except dsnparams.BadParam as exc:
                await self.push(f"501 5.5.4 {_one_line(str(exc))}")
                return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self._reset_timeout(self.data_timeout)  # the whole message in this time
        reader = self._reader
        # duck-typed: aiosmtpd's DATA loop calls only readuntil() and read()
        self._reader = cast("asyncio.StreamReader", _LineCap(reader))
        try:
            await super().smtp_DATA(arg)
        finally:
            self._reader = reader
        self._reset_timeout()


class _LineCap:
    """The stream aiosmtpd reads message data from, with a bound on a too-long line.

    aiosmtpd 1.4.6 refuses a data line longer than the limit, but keeps every
    piece of it until its CRLF arrives: one endless line grew the listener by
    as much as the client cared to send (200 MB sent, 200 MB held). Past
    RUNAWAY_LINE bytes, the rest of such a line is read and dropped here; the
    caller still sees the line end where it really ends (its CRLF is handed
    over on the next readuntil), so "\\r\\n.\\r\\n" is found exactly where it was.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._run = 0  # bytes of the current, still unterminated line handed out
        self._owed = False  # the CRLF of a dropped line tail, still to be handed out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        if self._owed:
            line = b"\r\n"
            self._owed = False
        else:
            line = await self._reader.readuntil(separator)
        self._run = 0
        return line

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        self._run += len(data)
        while self._run > RUNAWAY_LINE and not self._owed:
            try:
                await self._reader.readuntil(b"\r\n")  # the rest of the line: dropped
                self._owed = True
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)  # dropped
        return data


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
                return f"553 5.1.7 {_one_line(exc.message)}"
        envelope.mail_from = addr
        envelope.mail_options.extend(options)
        envelope.dsn = dict(server._mail_dsn)
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
            return f"553 5.1.3 {_one_line(exc.message)}"
        if len(found) != 1:
            return "553 5.1.3 One address per RCPT command"
        envelope.rcpt_tos.append(found[0])
        envelope.rcpt_options.extend(options)
        envelope.rcpt_dsn[found[0]] = (server._rcpt_dsn.get("NOTIFY", ""),
                                       server._rcpt_dsn.get("ORCPT", ""))
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
        server._reset_timeout()
        self.state.busy += 1
        try:
            qid = await loop.run_in_executor(None, self._commit, envelope, content,
                                             session, server)
        except (TempFailure, OSError) as exc:
            text = exc.message if isinstance(exc, RelayqError) else str(exc)
            return f"451 4.3.0 {_one_line(text)}: try again later"
        except DataError as exc:
            if exc.message.startswith("Message is too large"):
                return f"552 5.3.4 {_one_line(exc.message)}"
            return f"554 5.6.0 {_one_line(exc.message)}"
        except RelayqError as exc:
            self.state.log.error(f"SMTP submission failed: {exc.message}")
            code = "554 5.5.0" if exc.code in (64, 65) else "451 4.3.0"
            return f"{code} {_one_line(exc.message)}"
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
        req = Request(user=who[0] if who else st.user, uid=who[1] if who else st.uid)
        req.identified = who is not None  # the sender is then that user's -f
        req.sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        req.recipients = list(envelope.rcpt_tos)
        req.ignore_dots = True  # aiosmtpd has already removed the transparency dots
        req.received_from = _trace(session, st.user, who[0] if who else "")
        domain = st.ctx.domain
        for rcpt, params in envelope.rcpt_dsn.items():
            req.rcpt_params[rcpt] = params
            req.rcpt_params[address.qualify(rcpt, domain)] = params
        req.ret = envelope.dsn.get("RET", "")
        req.envid = envelope.dsn.get("ENVID", "")
        body = [o.split("=", 1)[1] for o in envelope.mail_options if o.startswith("BODY=")]
        try:  # aiosmtpd has refused any other BODY already
            req.body = dsnparams.body(body[0]) if body else ""
        except dsnparams.BadParam:
            req.body = ""
        req.bs = not st.strict
        spool = Spool(st.cfg.queue_dir)  # create() makes the directories if they went away
        if st.handover:
            from relayq.queue import maildrop

            qid = maildrop.hand_over_request(st.cfg, spool, req, _chunks(content))
            return qid or "(handed to the relayq daemon)"
        msg, _ = enqueue(st.cfg, spool, req, _chunks(content), st.log, st.ctx)
        msg.release()
        return msg.qid


def _rebind(value: Any, old: object, new: object) -> Any:
    func = getattr(value, "__func__", None)
    if func is not None and getattr(value, "__self__", None) is old:
        return func.__get__(new)
    return value


def _chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), CHUNK):
        yield bytes(view[i : i + CHUNK])


def _one_line(text: str) -> str:
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


# --- who is on the other end of a loopback connection ------------------------------


def _proc_hex(ip: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word of the address in
    the host's byte order, in hex, then the port."""
    import struct

    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def find_socket_uid(table: bytes, local: str, remote: str) -> int | None:
    """The uid owning the socket whose row in a /proc/net/tcp{,6} `table` has this
    local and remote address (as _proc_hex writes them), or None.

    A row without an inode (TIME_WAIT, or an orphan its process closed) belongs to
    no process: its uid column says 0, which must never be taken for root.
    """
    needle = f" {local} {remote} ".encode()
    start = 0
    while (at := table.find(needle, start)) >= 0:
        end = table.find(b"\n", at)
        fields = table[at:end if end >= 0 else len(table)].split()
        start = at + len(needle)
        # local remote st tx:rx tr:when retrnsmt uid timeout inode
        if len(fields) >= 9 and fields[6].isdigit() and fields[8].isdigit() and fields[8] != b"0":
            return int(fields[6])
    return None


def peer_uid(peer: tuple[str, int], ours: tuple[str, int], proc: str = "/proc/net",
             netlink: bool = True) -> int | None:
    """The uid of the local process at the other end of a loopback TCP connection,
    from the kernel's socket table (what identd answers): the client's socket is the
    one whose local address is our peer's and whose remote address is ours.

    Asked first with one exact sock_diag lookup over netlink (about 20 us, what `ss`
    uses); where that is not available, from /proc/net/tcp or tcp6 (by the peer's
    address), which costs about 12 ms on a quiet host: the kernel walks its whole
    table to print it. An IPv4 client of a dual-stack socket appears as
    ::ffff:a.b.c.d, its socket in either table. None when it cannot be told (not
    found: the client already gone; no owner: TIME_WAIT).
    """
    ip, port = peer[0].split("%", 1)[0], peer[1]
    our_ip, our_port = ours[0].split("%", 1)[0], ours[1]
    candidates: list[tuple[int, str, str]] = []
    if ":" not in ip:
        candidates.append((socket.AF_INET, ip, our_ip))
    else:
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
        our_mapped = ipaddress.IPv6Address(our_ip).ipv4_mapped if ":" in our_ip else None
        if mapped is not None and our_mapped is not None:
            candidates.append((socket.AF_INET, str(mapped), str(our_mapped)))
        candidates.append((socket.AF_INET6, ip, our_ip))
    for family, local, remote in candidates:
        if netlink:
            try:
                uid = _diag_uid(family, (local, port), (remote, our_port))
            except OSError:  # no sock_diag here (a kernel without it, a seccomp filter)
                pass
            else:
                if uid is not None:
                    return uid
                continue
        name = "tcp" if family == socket.AF_INET else "tcp6"
        try:
            with open(os.path.join(proc, name), "rb") as f:
                table = f.read()
        except OSError:
            continue
        uid = find_socket_uid(table, _proc_hex(local, port), _proc_hex(remote, our_port))
        if uid is not None:
            return uid
    return None


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2


def _diag_uid(family: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """One exact lookup of a TCP socket by its addresses (inet_diag_req_v2, no dump):
    its owner's uid, or None if there is no such socket or it has no owner (inode 0).
    OSError when the kernel cannot be asked."""
    import struct

    src = socket.inet_pton(family, local[0]).ljust(16, b"\0")
    dst = socket.inet_pton(family, remote[0]).ljust(16, b"\0")
    # inet_diag_sockid: ports (network order), addresses, interface, cookie (none)
    sockid = (struct.pack("!HH", local[1], remote[1]) + src + dst
              + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    msg = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req  # REQUEST
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(msg)
        data = nl.recv(8192)
    if len(data) < 16:
        raise OSError("short sock_diag answer")
    mtype = struct.unpack_from("=H", data, 4)[0]
    if mtype == NLMSG_ERROR:
        errno_ = -struct.unpack_from("=i", data, 16)[0] if len(data) >= 20 else 0
        if errno_ == 2:  # ENOENT: no such socket
            return None
        raise OSError(errno_, "sock_diag lookup failed")
    if mtype != SOCK_DIAG_BY_FAMILY or len(data) < 16 + 72:
        raise OSError("unexpected sock_diag answer")
    # inet_diag_msg: family state timer retrans, sockid (48), expires rqueue wqueue uid inode
    uid, inode = struct.unpack_from("=II", data, 16 + 64)
    return int(uid) if inode else None


def _peer(session: Any) -> str:
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        return f"[{peer[0]}]"
    return "a local client"


# --- the TCP listener ------------------------------------------------------------------


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed: the listener's time per session
    is mostly the event loop's own Python, which uvloop does in C."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop



class Listener:
    """An asyncio loop in its own thread serving the bound sockets."""

    def __init__(self, cfg: Config, log: Log, ctx: Context, sockets: list[socket.socket], *,
                 on_commit: Callable[[str], None] | None = None) -> None:
        self.state = State(cfg, log, ctx, user="smtp", uid=os.getuid(), strict=True,
                           on_commit=on_commit)
        self.sockets = sockets
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []
        self._protocols: list[Server] = []
        self._template: Server | None = None  # what each connection's Server is cloned from
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def addresses(self) -> list[str]:
        out = []
        for s in self.sockets:
            host, port = s.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    def reload(self, cfg: Config, ctx: Context, log: Log) -> None:
        """New limits apply to new connections; addresses need a restart."""
        self.state.cfg, self.state.ctx, self.state.log = cfg, ctx, log
        self._template = None  # the next connection builds one with the new limits

    def _factory(self) -> Server:
        if self._template is None or self._template.state is not self.state:
            self._template = Server(self.state, loop=self.loop)
        proto = self._template.clone()
        self._protocols = [p for p in self._protocols if p.transport is not None]
        self._protocols.append(proto)
        return proto

    def start(self) -> None:
        self.loop = new_loop()
        self.thread = threading.Thread(target=self._run, name="relayq-smtp", daemon=True)
        self.thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = self.loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            for s in self.sockets:
                self._servers.append(loop.run_until_complete(
                    loop.create_server(self._factory, sock=s)))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        for server in self._servers:
            server.close()
        for proto in self._protocols:
            if proto.transport is not None:
                proto.transport.close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    def stop(self) -> None:
        """Stop accepting, close the sessions (a commit in progress still finishes)."""
        if self.loop is not None and self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(15)
            self.thread = None


# --- sendmail -bs -------------------------------------------------------------------------


class _LFtoCRLF:
    """A bare LF on input becomes CRLF (-bs callers often write Unix line ends)."""

    def __init__(self) -> None:
        self.last_cr = False

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self.last_cr and data.startswith(b"\n"):
            out = out[1:]  # the CR of this CRLF came at the end of the last chunk
        self.last_cr = data.endswith(b"\r")
        return out


def _pump_in(fd: int, sock: socket.socket, eof: threading.Event) -> None:
    """stdin -> the protocol. At EOF the socket stays open: aiosmtpd would drop the
    commands still buffered (a whole dialogue piped in at once); the session
    closes it once they are answered."""
    conv = _LFtoCRLF()
    try:
        while True:
            try:
                data = os.read(fd, CHUNK)
            except InterruptedError:
                continue
            if not data:
                break
            sock.sendall(conv.feed(data))
    except OSError:
        pass
    eof.set()


def _pump_out(sock: socket.socket, fd: int) -> None:
    try:
        while data := sock.recv(CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    except OSError:
        pass


def serve_stdio(cfg: Config, log: Log, *, user: str, uid: int, mode: str) -> int:
    """`sendmail -bs`: one SMTP session on stdin/stdout, then deliver as `mode` says.

    The protocol runs on one end of a socketpair; two threads copy stdin to
    it and it to stdout, so any stdin works (pipe, file, terminal).
    """
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context

    ctx = Context(cfg)
    state = State(cfg, log, ctx, user=user, uid=uid, strict=False, on_commit=None)
    state.handover = not Spool(cfg.queue_dir).writable()
    ours, theirs = socket.socketpair()
    eof = threading.Event()
    t_in = threading.Thread(target=_pump_in, args=(0, theirs, eof), daemon=True)
    t_out = threading.Thread(target=_pump_out, args=(theirs, 1), daemon=True)
    t_in.start()
    t_out.start()

    async def session() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        class StdioServer(Server):
            def connection_lost(self, error: Exception | None) -> None:
                super().connection_lost(error)
                if not done.done():
                    done.set_result(None)

        transport, proto = await loop.connect_accepted_socket(
            lambda: StdioServer(state, loop=loop), sock=ours)
        idle = 0
        while not done.done():
            await asyncio.wait([done], timeout=0.05)
            # stdin ended without QUIT: close once every buffered command is answered
            buffered: Any = getattr(proto._reader, "_buffer", b"")
            quiet = eof.is_set() and not state.busy and not buffered
            idle = idle + 1 if quiet else 0
            if idle >= 3:
                transport.close()
                await done

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(session())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
    t_out.join(5)
    theirs.close()
    if state.committed and not state.handover:  # else the daemon delivers
        deliver_after(cfg, log, ctx, state.committed, mode)
    return EX_OK


def deliver_after(cfg: Config, log: Log, ctx: Context, qids: list[str], mode: str) -> None:
    """Deliver what a -bs session queued: background child, in process, or not at all."""
    from relayq.delivery.background import deliver_detached
    from relayq.delivery.runner import Runner
    from relayq.queue.spool import Spool

    spool = Spool(cfg.queue_dir)
    if mode in "qd":
        return
    if mode == "b":
        deliver_detached(cfg, spool, log, ctx, qids)
        return
    with Runner(cfg, spool, log, ctx) as runner:
        for qid in qids:
            runner.process(qid)
