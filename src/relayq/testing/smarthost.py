"""Test smarthosts: a recording aiosmtpd server and a raw scripted socket server.

`Smarthost` is a well-behaved ESMTP server on loopback (aiosmtpd in its own
event-loop thread) that records every accepted transaction and can be told
to misbehave at any stage: a chosen reply, a stall, or a dropped connection.
`ScriptedServer` (relayq.testing.scripted, also importable from here) writes
exactly the bytes a test scripts (aiosmtpd would hide malformed behaviour) and
records every byte it receives. Both are context managers; `SmarthostFactory`
starts any number and stops them all.

`python -m relayq.testing.smarthost --maildir DIR` runs a plain smarthost
until SIGTERM/SIGINT (used by `make demo`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, AuthResult

from relayq.testing.scripted import DEFAULT_RAW_REPLIES, RawSession, ScriptedServer

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from types import TracebackType

HOSTNAME = "smarthost.example.org"
STAGES = ("greeting", "ehlo", "starttls", "mail", "rcpt", "data", "eod", "rset")
_counter = itertools.count(1)
# the raw server lives in relayq.testing.scripted; tests import it from here too
__all__ = ["DEFAULT_RAW_REPLIES", "STAGES", "Command", "RawSession", "ScriptedServer",
           "Smarthost", "SmarthostFactory", "Transaction", "main"]


@dataclass
class Transaction:
    """One accepted message as the smarthost saw it."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[list[str]]
    content: bytes  # after dot-unstuffing, CRLF line ends, exactly as received
    tls: bool = False
    auth_user: str = ""
    connection: int = 0


@dataclass
class Command:
    verb: str
    arg: str  # AUTH arguments are masked
    tls: bool
    connection: int


class Smarthost:
    """A recording ESMTP server on loopback with failure injection.

    replies: stage -> reply line (e.g. {"mail": "451 4.3.0 try later"}); stages
    are greeting, ehlo, starttls, mail, rcpt, data (reply to DATA), eod (end of
    data), rset. rcpt_replies: address -> reply. stall: a stage at which the
    server never answers. drop_in_data: close the connection after reading
    the first line of message data.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = HOSTNAME,
        maildir: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        auth: dict[str, str] | None = None,
        auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "XOAUTH2"),
        token_check: Callable[[str, str], bool] | None = None,
        auth_required: bool = False,
        auth_require_tls: bool = True,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        pipelining: bool = True,
        size_limit: int | None = 2**25,
        dsn: bool = False,
        enhancedstatuscodes: bool = True,
        replies: dict[str, str] | None = None,
        rcpt_replies: dict[str, str] | None = None,
        stall: str = "",
        drop_in_data: bool = False,
        rcpt_limit: tuple[int, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        for stage in [*(replies or {}), *([stall] if stall else [])]:
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}")
        self.host = host
        self.port = port
        self.hostname = hostname
        self.maildir = maildir
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.require_starttls = require_starttls
        self.auth = dict(auth or {})
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        # XOAUTH2 and OAUTHBEARER: token_check(user, token) decides (a fake token
        # endpoint's `accepts`); without it, the token must be auth[user]
        self.token_check = token_check
        self.auth_required = auth_required
        self.auth_require_tls = auth_require_tls
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.pipelining = pipelining
        self.size_limit = size_limit
        self.dsn = dsn
        self.enhancedstatuscodes = enhancedstatuscodes
        self.replies = dict(replies or {})
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.stall = stall
        self.drop_in_data = drop_in_data
        self.rcpt_limit = rcpt_limit  # (n, reply): recipients past n in a transaction refused
        self.timeout = timeout
        self._lock = threading.Lock()
        self._transactions: list[Transaction] = []
        self._commands: list[Command] = []
        self._connections = 0
        self._logins: list[tuple[str, str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._protocols: list[_Server] = []
        self._error: BaseException | None = None

    # --- recorded state (thread-safe copies) --------------------------------

    @property
    def transactions(self) -> list[Transaction]:
        with self._lock:
            return list(self._transactions)

    @property
    def commands(self) -> list[Command]:
        with self._lock:
            return list(self._commands)

    @property
    def logins(self) -> list[tuple[str, str, str]]:
        """Every AUTH as (mechanism, user, secret or token), accepted or not: a test
        sees what went as what (never a token as PLAIN)."""
        with self._lock:
            return list(self._logins)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    def verbs(self) -> list[str]:
        return [c.verb for c in self.commands]

    @property
    def smarthost(self) -> str:
        """The `smarthost` config value that reaches this server without MX lookup."""
        return f"[{self.host}]:{self.port}"

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> Smarthost:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        if self.maildir:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(self.maildir, sub), exist_ok=True)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sock, ready), name=f"smarthost-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(10) or self._error is not None:
            raise RuntimeError(f"test smarthost did not start: {self._error}")
        return self

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                loop.create_server(
                    self._factory,
                    sock=sock,
                    ssl=self.tls_context if self.implicit_tls else None,
                )
            )
        except BaseException as exc:
            self._error = exc
            ready.set()
            sock.close()
            return
        ready.set()
        loop.run_forever()
        server.close()
        for proto in self._protocols:
            if proto.transport is not None:
                proto.transport.close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(server.wait_closed())
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Smarthost:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- server side (runs in the loop thread) ------------------------------------

    def _factory(self) -> _Server:
        excluded = [m for m in ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER")
                    if m not in self.auth_mechanisms]
        proto = _Server(
            self,
            _Handler(self),
            hostname=self.hostname,
            tls_context=None if self.implicit_tls else self.tls_context,
            require_starttls=self.require_starttls,
            enable_SMTPUTF8=self.smtputf8,
            data_size_limit=self.size_limit,
            authenticator=self._authenticate,
            auth_require_tls=self.auth_require_tls,
            auth_exclude_mechanism=excluded,
            timeout=self.timeout,
            loop=self._loop,
        )
        self._protocols.append(proto)
        return proto

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        user = auth_data.login.decode("utf-8", "replace")
        secret = auth_data.password.decode("utf-8", "replace")
        self._record_token(mechanism.upper(), user, secret)
        ok = bool(self.auth) and self.auth.get(user) == secret
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    def _record(self, item: Command | Transaction) -> None:
        with self._lock:
            if isinstance(item, Command):
                self._commands.append(item)
            else:
                self._transactions.append(item)

    def _record_token(self, mech: str, user: str, secret: str) -> None:
        with self._lock:
            self._logins.append((mech, user, secret.removeprefix("Bearer ")))

    def _connected(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    def _deliver_to_maildir(self, t: Transaction) -> None:
        if not self.maildir:
            return
        name = f"{time.time():.6f}.P{os.getpid()}Q{next(_counter)}.{self.hostname}"
        head = (
            f"X-Envelope-From: <{t.mail_from}>\nX-Envelope-To: "
            + ", ".join(f"<{r}>" for r in t.rcpt_tos)
            + "\n"
        ).encode("utf-8", "surrogateescape")
        tmp = os.path.join(self.maildir, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(head + t.content.replace(b"\r\n", b"\n"))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.maildir, "new", name))


async def _forever() -> None:
    await asyncio.sleep(3600)


class _Server(SMTP):
    """aiosmtpd's SMTP with recording, DSN parameters and failure injection."""

    def __init__(self, owner: Smarthost, handler: Any, **kwargs: Any) -> None:
        self.owner = owner
        self.conn_no = 0
        super().__init__(handler, **kwargs)
        self._smtp_methods = {k: self._recorded(k, m) for k, m in self._smtp_methods.items()}

    def _recorded(self, verb: str, method: Any) -> Any:
        async def run(arg: str | None) -> None:
            shown = arg or ""
            if verb == "AUTH":
                shown = shown.split(" ", 1)[0]
            tls = self._tls_protocol is not None or self.owner.implicit_tls
            self.owner._record(Command(verb, shown, tls, self.conn_no))
            await method(arg)

        return run

    def connection_made(self, transport: Any) -> None:
        first = self.transport is None and self._original_transport is None
        super().connection_made(transport)
        if first:
            self.conn_no = self.owner._connected()

    def _is_tls(self) -> bool:
        return self._tls_protocol is not None or self.owner.implicit_tls

    async def _handle_client(self) -> None:
        if self.owner.stall == "greeting":
            await _forever()
            return
        reply = self.owner.replies.get("greeting")
        if reply:
            await self.push(reply)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def _stage(self, stage: str) -> bool:
        """Stall or answer as injected; True if the stage was handled here."""
        if self.owner.stall == stage:
            await _forever()
            return True
        reply = self.owner.replies.get(stage)
        if reply:
            await self.push(reply)
            return True
        return False

    async def smtp_STARTTLS(self, arg: str) -> None:
        if await self._stage("starttls"):
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_RSET(self, arg: str) -> None:
        if await self._stage("rset"):
            return
        await super().smtp_RSET(arg)

    def _split_params(
        self, arg: str | None, names: tuple[str, ...]
    ) -> tuple[str | None, list[str]]:
        """Take DSN parameters out before aiosmtpd (which knows none) sees them."""
        if not arg:
            return arg, []
        words = arg.split(" ")
        head, params = words[0], [w for w in words[1:] if w]
        keep = [w for w in params if not w.upper().startswith(names) or not self.owner.dsn]
        taken = [w for w in params if w not in keep]
        self._all_params = params
        return " ".join([head, *keep]), taken

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.owner.stall == "mail":
            await _forever()
            return
        arg, _ = self._split_params(arg, ("RET=", "ENVID="))
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if self.owner.stall == "rcpt":
            await _forever()
            return
        arg, _ = self._split_params(arg, ("NOTIFY=", "ORCPT="))
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        assert self.envelope is not None
        if self.envelope.rcpt_tos:
            if await self._stage("data"):
                return
            if self.owner.drop_in_data:
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                await self._reader.readuntil(b"\r\n")
                transport: Any = self.transport
                if transport is not None:
                    transport.abort()
                return
        await super().smtp_DATA(arg)


class _Handler:
    def __init__(self, owner: Smarthost) -> None:
        self.owner = owner

    async def handle_EHLO(
        self, server: _Server, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if server.owner.stall == "ehlo":
            await _forever()
        reply = self.owner.replies.get("ehlo")
        if reply:
            return [reply]
        session.host_name = hostname
        o = self.owner
        lines = [r[4:] for r in responses]
        drop = set()
        if not o.eightbitmime:
            drop.add("8BITMIME")
        if not o.smtputf8:
            drop.add("SMTPUTF8")
        lines = [ln for ln in lines if ln.split(" ")[0] not in drop and ln != "HELP"]
        if o.pipelining:
            lines.append("PIPELINING")
        if o.dsn:
            lines.append("DSN")
        if o.enhancedstatuscodes:
            lines.append("ENHANCEDSTATUSCODES")
        lines.append("HELP")
        return [f"250-{ln}" for ln in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self, server: _Server, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.owner.replies.get("mail")
        if reply:
            return reply
        if self.owner.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options = list(getattr(server, "_all_params", []))
        envelope.rcpt_params = []
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: _Server, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.owner.rcpt_replies.get(address.lower()) or self.owner.replies.get("rcpt")
        if reply:
            return reply
        limit = self.owner.rcpt_limit
        if limit is not None and len(envelope.rcpt_tos) >= limit[0]:
            return limit[1]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_params.append(list(getattr(server, "_all_params", [])))
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: _Server, session: Any, envelope: Any) -> str:
        if self.owner.stall == "eod":
            await _forever()
        reply = self.owner.replies.get("eod")
        if reply:
            return reply
        t = Transaction(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_params),
            content=bytes(envelope.original_content),
            tls=server._is_tls(),
            auth_user=str(session.auth_data or ""),
            connection=server.conn_no,
        )
        self.owner._deliver_to_maildir(t)
        self.owner._record(t)
        return f"250 2.0.0 Ok: queued as T{next(_counter)}"

    async def auth_XOAUTH2(self, server: _Server, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, "XOAUTH2")

    async def auth_OAUTHBEARER(self, server: _Server, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, "OAUTHBEARER")

    async def _bearer(self, server: _Server, args: list[str], mech: str) -> AuthResult:
        """XOAUTH2 (user=U ^A auth=Bearer T ^A^A) and RFC 7628's OAUTHBEARER
        (n,a=U, ^A host=.. ^A port=.. ^A auth=Bearer T ^A^A); a refused token gets
        the JSON error challenge, and the client's answer to it (an empty line or
        ^A) the final 535, as the providers do."""
        if len(args) == 2:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except ValueError:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            got = await server.challenge_auth("", encode_to_b64=False)
            if not isinstance(got, bytes):
                return AuthResult(success=False, handled=False)
            blob = got
        parts = blob.split(b"\x01")
        user = ""
        if mech == "OAUTHBEARER":
            gs2 = parts[0].split(b",")
            if len(gs2) < 3 or gs2[0] != b"n" or not gs2[1].startswith(b"a="):
                await server.push("501 5.5.2 Bad GS2 header")
                return AuthResult(success=False, handled=True)
            user = gs2[1][2:].decode("utf-8", "replace").replace("=2C", ",").replace("=3D", "=")
            parts = parts[1:]
        fields = dict(part.split(b"=", 1) for part in parts if b"=" in part)
        if mech == "XOAUTH2":
            user = fields.get(b"user", b"").decode("utf-8", "replace")
        token = fields.get(b"auth", b"").decode("utf-8", "replace")
        self.owner._record_token(mech, user, token)
        if token.startswith("Bearer "):
            check = self.owner.token_check
            if (check(user, token[7:]) if check is not None
                    else self.owner.auth.get(user) == token[7:]):
                return AuthResult(success=True, auth_data=user)
        await server.challenge_auth(b'{"status":"401","schemes":"bearer"}')
        return AuthResult(success=False, handled=False)


class SmarthostFactory:
    """Start smarthosts on demand and stop them all at the end (a fixture's body)."""

    def __init__(self) -> None:
        self.started: list[Smarthost | ScriptedServer] = []

    def __call__(self, **kwargs: Any) -> Smarthost:
        host = Smarthost(**kwargs).start()
        self.started.append(host)
        return host

    def scripted(self, **kwargs: Any) -> ScriptedServer:
        server = ScriptedServer(**kwargs).start()
        self.started.append(server)
        return server

    def close(self) -> None:
        for s in reversed(self.started):
            s.stop()
        self.started.clear()


# --- command line -------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run a plain smarthost delivering into a Maildir until SIGTERM or SIGINT."""
    ap = argparse.ArgumentParser(prog="python -m relayq.testing.smarthost")
    ap.add_argument("--maildir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", default="")
    args = ap.parse_args(argv)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with Smarthost(host=args.host, port=args.port, maildir=args.maildir) as sh:
        if args.port_file:
            tmp = args.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{sh.port}\n")
            os.replace(tmp, args.port_file)
        print(f"test smarthost listening on {sh.host}:{sh.port}, maildir {args.maildir}",
              flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
