"""The SMTP way in: a loopback listener (daemon) and `sendmail -bs`, on aiosmtpd.

The TCP listener (an asyncio loop in its own thread) is here; the parts are
relayq.server.handler (what each command does, the commit, the reply),
relayq.server.aio (the aiosmtpd Server subclass: every reliance on aiosmtpd's
internals), relayq.server.sockets (binding, systemd's sockets, the peer's
identity) and relayq.server.stdio (`-bs` over stdin/stdout).

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
import os
import threading
from typing import TYPE_CHECKING

from relayq.server.aio import Server
from relayq.server.handler import State
from relayq.server.sockets import bind, check_config, check_sockets

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from relayq.core.config import Config
    from relayq.queue.submit import Context
    from relayq.system.log import Log

__all__ = ["Listener", "bind", "check_config", "check_sockets", "new_loop"]


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

