"""Everything that knows aiosmtpd's insides, in one place: the Server subclass.

aiosmtpd (pinned below its next minor version in pyproject.toml) gives us the
SMTP state machine; relayq adds its access rule, limits, DSN parameters,
enhanced status codes and a cheap per-connection clone. Doing so needs these
members that aiosmtpd does not document (tests/unit/test_aiosmtpd_contract.py
fails, naming the member, when one goes away or changes):

- `_handle_client()`: wrapped, to refuse a connection before the greeting;
- `_timeout_cb()`: wrapped, to say 421 before the idle/DATA timer closes;
- `_reset_timeout(duration)`: the DATA phase gets its own time (restart_timer);
- `_getaddr(arg)`: replaced, aiosmtpd's builds a class on every call;
- `_reader`: the stream DATA reads from, wrapped in _LineCap for DATA, and its
  asyncio `_buffer` (is input still unanswered? unread_input, for -bs);
- `_smtp_methods`, `_auth_methods` (of `_AuthMechAttr(method, is_builtin)`) and
  the method the reader calls with the streams (CONNECTED_CB): what clone()
  copies and rebinds;
- `line_length_limit`, `local_part_limit`, `hostname`, `loop`: attributes read or
  set before SMTP.__init__ builds its reader.

Two aiosmtpd releases are supported: the newest 1.4 from PyPI (1.4.6, the venv)
and Debian 12's python3-aiosmtpd 1.4.3-1.1+deb12u1, which the .deb depends on.
Of what relayq uses they differ only in CONNECTED_CB's name (and 1.4.3 asks
asyncio for a loop when given none: relayq always passes one). Debian backported the fix for SMTP
smuggling (CVE-2024-27305, upstream 1.4.5) and for STARTTLS command injection
(CVE-2024-34083, 1.4.6): both read DATA line by line with readuntil(b"\r\n"),
so a bare LF or CR never ends a line there, and "\n.\n", "\n.\r\n",
"\r\n.\n" are data; the handler refuses any message that holds one (550 5.6.0,
relayq.server.handler). tests/system/test_debian_python.py runs the same probes
against both and compares every reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from email import _header_value_parser as _vp  # what aiosmtpd parses addresses with
from email.errors import HeaderParseError
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import SMTP

from relayq.core import dsnparams
from relayq.server.handler import Handler, enhance, one_line, take_params
from relayq.server.sockets import LOCAL_CLIENTS, peer_uid, user_name
from relayq.system import hostname

if TYPE_CHECKING:
    from relayq.server.handler import State

RUNAWAY_LINE = 1 << 16  # a refused data line: no more of it is held (_LineCap)
HTTP_VERBS = ("GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "DELETE")
JUNK_LIMITS = {"NOOP": 100, "RSET": 100, "HELP": 20, "VRFY": 20, "EXPN": 20, "EHLO": 20,
               "HELO": 20, "*": 1_000_000}

_aiolog = logging.getLogger("mail.log")  # aiosmtpd's chatter: our own log says what matters
_aiolog.addHandler(logging.NullHandler())
_aiolog.propagate = False

_UNKNOWN = object()

# the SMTP method asyncio's StreamReaderProtocol calls with (reader, writer): Debian 12's
# aiosmtpd 1.4.3 names it _client_connected_cb, later releases _cb_client_connected
CONNECTED_CB = "_client_connected_cb" if hasattr(SMTP, "_client_connected_cb") \
    else "_cb_client_connected"


class Server(SMTP):
    """aiosmtpd's SMTP with relayq's limits, access rule and DSN parameters."""

    def __init__(self, state: State, **kwargs: Any) -> None:
        self.state = state
        # the stream limit is the longest line; it must be set before SMTP builds its reader
        self.line_length_limit = state.cfg.smtp_max_line + 1  # + a transparent dot
        self.data_timeout = state.cfg.smtp_data_timeout
        self._plain_replies = False
        self.mail_dsn: dict[str, str] = {}
        self.rcpt_dsn: dict[str, str] = {}
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
        proto.mail_dsn, proto.rcpt_dsn = {}, {}
        proto._peer_user = _UNKNOWN
        # from the class: in 1.4.3 asyncio's attribute for the callback has the method's
        # name, so the instance copied above holds the template's bound method under it
        connected = getattr(Server, CONNECTED_CB).__get__(proto)
        asyncio.StreamReaderProtocol.__init__(
            proto, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=connected, loop=self.loop)
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
                    self._peer_user = (user_name(uid), uid)
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
            status = enhance(status)
        await super().push(status)

    async def _http(self, arg: str | None) -> None:
        await self.push("554 5.7.0 This is an SMTP server, not a web server")
        # this runs in the session's task (aiosmtpd awaits each command's method in it):
        # no command pipelined after the request is read
        task = asyncio.current_task()
        if task is not None:
            task.cancel()
        if self.transport is not None:
            self.transport.close()

    # an HTTP request line as a command: aiosmtpd finds these smtp_* methods itself
    smtp_GET = smtp_POST = smtp_PUT = smtp_HEAD = smtp_CONNECT = _http
    smtp_OPTIONS = smtp_DELETE = _http

    def restart_timer(self, duration: float | None = None) -> None:
        """Start the idle timer again (with `duration`, or smtp_timeout)."""
        self._reset_timeout(duration)

    def unread_input(self) -> bool:
        """Bytes received and not yet read by the session (a command not answered)."""
        return bool(getattr(self._reader, "_buffer", b""))

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
        self.mail_dsn = {}
        if arg and self.session is not None and self.session.extended_smtp:
            arg, taken = take_params(arg, ("RET", "ENVID"))
            try:  # the rule every way in and the SMTP client apply (relayq.core.dsnparams)
                self.mail_dsn = dsnparams.given(taken, ("RET", "ENVID"))
            except dsnparams.BadParam as exc:
                await self.push(f"501 5.5.4 {one_line(str(exc))}")
                return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.rcpt_dsn = {}
        if arg and self.session is not None and self.session.extended_smtp:
            arg, taken = take_params(arg, ("NOTIFY", "ORCPT"))
            try:  # ORCPT in UTF-8 (an SMTPUTF8 client) is kept as xtext
                self.rcpt_dsn = dsnparams.given(taken, ("NOTIFY", "ORCPT"), utf8=True)
            except dsnparams.BadParam as exc:
                await self.push(f"501 5.5.4 {one_line(str(exc))}")
                return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.restart_timer(self.data_timeout)  # the whole message in this time
        reader = self._reader
        # duck-typed: aiosmtpd's DATA loop calls only readuntil() and read()
        self._reader = cast("asyncio.StreamReader", _LineCap(reader))
        try:
            await super().smtp_DATA(arg)
        finally:
            self._reader = reader
        self.restart_timer()


class _LineCap:
    """The stream aiosmtpd reads message data from, with a bound on a too-long line.

    aiosmtpd (1.4.6 and Debian's 1.4.3+deb12u1 alike) refuses a data line longer
    than the limit, but keeps every piece of it until its CRLF arrives: one
    endless line grew the listener by as much as the client cared to send
    (200 MB sent, 200 MB held). Past
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


def _rebind(value: Any, old: object, new: object) -> Any:
    func = getattr(value, "__func__", None)
    if func is not None and getattr(value, "__self__", None) is old:
        return func.__get__(new)
    return value

