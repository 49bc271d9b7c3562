"""`sendmail -bs`: the SMTP session of relayq.server.handler over stdin/stdout.

The caller is already trusted (it could run `sendmail` directly), so bare LF
is normalised to CRLF on input and a stray CR becomes a space as on the
command line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import TYPE_CHECKING

from relayq.core.errors import EX_OK
from relayq.server.aio import Server
from relayq.server.handler import CHUNK, State

if TYPE_CHECKING:
    from relayq.core.config import Config
    from relayq.queue.submit import Context
    from relayq.system.log import Log


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
            quiet = eof.is_set() and not state.busy and not proto.unread_input()
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
    """Deliver what a -bs session queued, as its mode asks (relayq.delivery.after)."""
    from relayq.delivery.after import deliver_committed
    from relayq.queue.spool import Spool

    deliver_committed(cfg, log, ctx, Spool(cfg.queue_dir), qids, mode)
