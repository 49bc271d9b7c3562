"""A raw scripted SMTP server on loopback: exactly the bytes a test scripts, every byte recorded.

aiosmtpd (relayq.testing.smarthost) would hide malformed behaviour: this one
writes what the script says, one thread per connection, so tests can send
split replies, bare LFs, stalls and resets. HostileRelay (relayq.testing.hostile)
is built on it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

DEFAULT_RAW_REPLIES: dict[str, bytes] = {
    "greeting": b"220 raw.example.org ESMTP\r\n",
    "EHLO": b"250-raw.example.org\r\n250-8BITMIME\r\n250 PIPELINING\r\n",
    "DATA": b"354 go ahead\r\n",
    ".": b"250 2.0.0 Ok: queued\r\n",
    "QUIT": b"221 2.0.0 Bye\r\n",
    "*": b"250 2.0.0 Ok\r\n",
}


class RawSession:
    """One accepted connection of a ScriptedServer, as seen by the script."""

    def __init__(self, server: ScriptedServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self._buf = b""

    def send(self, data: bytes) -> None:
        """Write `data`, one byte per segment if the server was told `segment=1`."""
        step = self.server.segment
        if step <= 0:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), step):
            self.sock.sendall(data[i : i + step])
            time.sleep(0.0005)

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.server._received(data)
        self._buf += data
        return True

    def readline(self) -> bytes:
        """One line including CRLF, or b'' at EOF."""
        while b"\r\n" not in self._buf:
            if not self._more():
                return b""
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line + b"\r\n"

    def read_data(self) -> bytes:
        """Message data up to and including the final CRLF . CRLF (raw, still stuffed)."""
        while True:
            end = self._buf.find(b"\r\n.\r\n")
            if self._buf.startswith(b".\r\n"):
                end, skip = 0, 3
            else:
                skip = 5
            if end >= 0:
                data, self._buf = self._buf[: end + skip], self._buf[end + skip :]
                self.server._message(data)
                return data
            if not self._more():
                return b""

    def starttls(self, context: ssl.SSLContext) -> None:
        self._buf = b""
        self.sock = context.wrap_socket(self.sock, server_side=True)


class ScriptedServer:
    """A raw loopback server that answers from a script and records every byte.

    Without `script`, each command gets `replies[VERB]` (bytes, or a list
    used in turn, the last one repeating), falling back to
    DEFAULT_RAW_REPLIES; "greeting" is the banner and "." the end-of-data
    reply. With `tls_context`, a 220 answer to STARTTLS starts a handshake.
    `rcvbuf` shrinks the receive buffer (a script that stops reading then
    stalls the client's writes after a few KiB).
    """

    def __init__(
        self,
        *,
        script: Any = None,
        replies: dict[str, bytes | list[bytes]] | None = None,
        host: str = "127.0.0.1",
        tls_context: ssl.SSLContext | None = None,
        segment: int = 0,
        rcvbuf: int = 0,
    ) -> None:
        self.script = script or self._respond
        self.replies: dict[str, list[bytes]] = {}
        for k, v in {**DEFAULT_RAW_REPLIES, **(replies or {})}.items():
            self.replies[k] = list(v) if isinstance(v, list) else [v]
        self.host = host
        self.tls_context = tls_context
        self.segment = segment
        self._lock = threading.Lock()
        self._raw = bytearray()
        self._messages: list[bytes] = []
        self.sessions = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf:  # before listen(): accepted sockets inherit it, and the window scale
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._sock.bind((host, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[RawSession] = []

    @property
    def smarthost(self) -> str:
        return f"[{self.host}]:{self.port}"

    @property
    def received(self) -> bytes:
        with self._lock:
            return bytes(self._raw)

    @property
    def messages(self) -> list[bytes]:
        """Raw DATA bytes of each message (dot-stuffed, with the final dot line)."""
        with self._lock:
            return list(self._messages)

    def _received(self, data: bytes) -> None:
        with self._lock:
            self._raw += data

    def _message(self, data: bytes) -> None:
        with self._lock:
            self._messages.append(data)

    def start(self) -> ScriptedServer:
        t = threading.Thread(target=self._accept, name=f"scripted-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.sock.close()
        for t in self._threads:
            t.join(5)
        self._sock.close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            sock.settimeout(30)
            session = RawSession(self, sock)
            self._conns.append(session)
            with self._lock:
                self.sessions += 1
            t = threading.Thread(target=self._session, args=(session,), daemon=True)
            t.start()
            self._threads.append(t)

    def _session(self, session: RawSession) -> None:
        try:
            self.script(session)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(OSError):
                session.sock.close()

    def reply(self, key: str) -> bytes:
        options = self.replies.get(key) or self.replies["*"]
        return options.pop(0) if len(options) > 1 else options[0]

    def _respond(self, s: RawSession) -> None:
        s.send(self.reply("greeting"))
        while not self._stop.is_set():
            line = s.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
            if verb == "DATA":
                answer = self.reply("DATA")
                s.send(answer)
                if answer.startswith(b"354"):
                    if not s.read_data():
                        return
                    s.send(self.reply("."))
            elif verb == "QUIT":
                s.send(self.reply("QUIT"))
                return
            elif verb == "STARTTLS":
                answer = self.reply("STARTTLS") if "STARTTLS" in self.replies else b"220 go\r\n"
                s.send(answer)
                if answer.startswith(b"220") and self.tls_context is not None:
                    s.starttls(self.tls_context)
            else:
                s.send(self.reply(verb))
