"""One connection to a HostileRelay: the ESMTP conversation, and the faults struck in it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import socket
import ssl
import struct
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from relayq.testing.faults import Delivery

if TYPE_CHECKING:
    from relayq.testing.faults import Connection, Fault
    from relayq.testing.hostile import HostileRelay
    from relayq.testing.scripted import RawSession

_ids = itertools.count(1)


class Hangup(Exception):
    """The script ends the connection (close, reset or end of a stall)."""


class Session:
    """One connection's state machine."""

    def __init__(self, relay: HostileRelay, s: RawSession, conn: Connection, faulty: bool
                 ) -> None:
        self.relay = relay
        self.s = s
        self.conn = conn
        self.faults = relay.faults if faulty else ()
        self.seen: dict[str, int] = {}
        self.messages = 0
        self.mail_from: str | None = None
        self.mail_params: list[str] = []
        self.rcpts: list[str] = []
        self.rcpt_no = 0
        self.authed = False
        self.echo = b""  # what the client sent in AUTH, decoded
        rcvbuf = int(relay._setting("rcvbuf") or 0)  # type: ignore[call-overload]
        if rcvbuf:
            with contextlib.suppress(OSError):
                s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)

    # --- output ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        drip = float(self.relay._setting("drip"))  # type: ignore[arg-type]
        segment = int(self.relay._setting("segment"))  # type: ignore[call-overload]
        slow = float(self.relay._setting("slow"))  # type: ignore[arg-type]
        if slow > 0 and data:
            drip = slow / len(data)
        if drip > 0:
            for i in range(len(data)):
                if self.relay._stop.wait(drip):
                    raise Hangup
                self.s.sock.sendall(data[i : i + 1])
            return
        if segment > 0:
            for i in range(0, len(data), segment):
                self.s.sock.sendall(data[i : i + segment])
                time.sleep(0.0002)
            return
        self.s.sock.sendall(data)

    def fault(self, step: str) -> Fault | None:
        """Count this occurrence of `step`; the fault that strikes it, if any."""
        n = self.seen[step] = self.seen.get(step, 0) + 1
        for f in self.faults:
            if f.step == step and (n == f.nth or (f.and_after and n > f.nth)):
                return f
        return None

    def strike(self, f: Fault) -> None:
        """Send the fault's reply (b"{echo}" replaced by the credentials) and do its `then`."""
        f = replace(f, reply=f.reply.replace(b"{echo}", self.echo))
        if f.reply and f.then != "flood":
            self.send(f.reply)
        if f.then == "close":
            raise Hangup
        if f.then == "reset":
            self.reset()
        if f.then == "stall":
            self.stall()
        if f.then == "flood":
            self.flood(f.reply or b"250-flood\r\n")

    def reset(self) -> None:
        with contextlib.suppress(OSError):
            self.s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raise Hangup

    def stall(self) -> None:
        """Neither read nor write until the client closes or the relay stops."""
        sock = self.s.sock
        while not self.relay._stop.wait(0.2):
            try:  # peek without reading: a closed client shows as EOF or an error
                sock.setblocking(False)
                data = sock.recv(1, socket.MSG_PEEK)
                if data == b"":
                    break
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            except (OSError, ValueError):
                break
            finally:
                with contextlib.suppress(OSError):
                    sock.setblocking(True)
        raise Hangup

    def flood(self, piece: bytes, limit: int = 256 * 2**20) -> None:
        block = piece * max(1, 65536 // len(piece))
        sent = 0
        with contextlib.suppress(OSError):
            while sent < limit and not self.relay._stop.is_set():
                self.s.sock.sendall(block)
                sent += len(block)
        raise Hangup

    def reply(self, step: str, normal: bytes) -> bool:
        """Answer `step`: the fault's reply if one strikes (True), else `normal`."""
        f = self.fault(step)
        if f is not None:
            self.strike(f)
            return True
        self.send(normal)
        return False

    # --- the conversation --------------------------------------------------

    def run(self) -> None:
        try:
            self.converse()
        except Hangup:
            pass

    def converse(self) -> None:
        r = self.relay
        self.reply("greeting", f"220 {r._setting('hostname')} ESMTP hostile\r\n".encode())
        while not r._stop.is_set():
            line = self.s.readline()
            if not line:
                return
            text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            with r._lock:
                self.conn.commands.append(
                    (self.conn.tls, "AUTH " + arg.split(" ")[0] if verb == "AUTH" else text))
            handler = getattr(self, "do_" + verb.replace("-", "_"), None)
            if handler is None:
                self.send(b"502 5.5.1 command not recognized\r\n")
                continue
            if handler(arg) is False:
                return

    def extensions(self) -> list[str]:
        r = self.relay
        ext = []
        if r._setting("size") is not None:
            ext.append(f"SIZE {r._setting('size')}")
        if r._setting("eightbitmime"):
            ext.append("8BITMIME")
        if r._setting("smtputf8"):
            ext.append("SMTPUTF8")
        if r._setting("pipelining"):
            ext.append("PIPELINING")
        ext.append("ENHANCEDSTATUSCODES")
        tls_ctx = r._setting("tls_context")
        if tls_ctx is not None and r._setting("offer_starttls") and not self.conn.tls:
            ext.append("STARTTLS")
        mechs = r._setting("auth_mechanisms")
        if r.auth and mechs:
            ext.append("AUTH " + " ".join(mechs))  # type: ignore[arg-type]
        return ext

    def do_EHLO(self, arg: str) -> None:
        step = "ehlo_tls" if self.conn.tls else "ehlo"
        lines = [str(self.relay._setting("hostname")), *self.extensions()]
        text = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self.reset_transaction()
        self.reply(step, text.encode())

    def do_HELO(self, arg: str) -> None:
        self.reset_transaction()
        self.reply("helo", f"250 {self.relay._setting('hostname')}\r\n".encode())

    def do_STARTTLS(self, arg: str) -> None:
        ctx = self.relay._setting("tls_context")
        if ctx is None or self.conn.tls:
            self.send(b"502 5.5.1 no STARTTLS here\r\n")
            return
        if self.reply("starttls", b"220 2.0.0 Ready to start TLS\r\n"):
            return
        assert isinstance(ctx, ssl.SSLContext)
        self.s.starttls(ctx)  # a failed handshake raises: the session ends
        self.conn.tls = True
        self.reset_transaction()

    def do_NOOP(self, arg: str) -> None:
        self.send(b"250 2.0.0 Ok\r\n")

    def do_QUIT(self, arg: str) -> bool:
        self.reply("quit", b"221 2.0.0 Bye\r\n")
        return False

    def do_RSET(self, arg: str) -> None:
        self.reset_transaction()
        self.reply("rset", b"250 2.0.0 Ok\r\n")

    def reset_transaction(self) -> None:
        self.mail_from, self.mail_params, self.rcpts, self.rcpt_no = None, [], [], 0

    # --- AUTH ------------------------------------------------------------

    def do_AUTH(self, arg: str) -> None:
        words = arg.split(" ")
        mech = words[0].upper()
        if self.authed or mech not in self.relay._setting("auth_mechanisms"):  # type: ignore[operator]
            self.send(b"504 5.5.4 mechanism not available\r\n")
            return
        sent: list[str] = []
        if mech == "PLAIN":
            blob = words[1] if len(words) > 1 else self.ask(b"334 \r\n")
            sent.append(blob)
            parts = _b64(blob).split("\0")
            user, secret = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
            ok = self.relay.auth.get(user) == secret
        elif mech == "LOGIN":
            user_b = self.ask(b"334 VXNlcm5hbWU6\r\n")
            secret_b = self.ask(b"334 UGFzc3dvcmQ6\r\n")
            sent += [user_b, secret_b]
            user, secret = _b64(user_b), _b64(secret_b)
            ok = self.relay.auth.get(user) == secret
        else:  # CRAM-MD5 (RFC 2195)
            challenge = f"<{next(_ids)}.{int(time.time())}@{self.relay.hostname}>".encode()
            answer = self.ask(b"334 " + base64.b64encode(challenge) + b"\r\n")
            sent.append(answer)
            user, _, digest = _b64(answer).rpartition(" ")
            want = self.relay.auth.get(user)
            ok = want is not None and hmac.compare_digest(
                hmac.new(want.encode(), challenge, hashlib.md5).hexdigest(), digest)
            secret = digest
        f = self.fault("auth")
        self.echo = (" ".join(sent) + " " + user + " " + secret).encode("utf-8", "replace")
        if f is not None:
            self.strike(f)
            return
        if ok:
            self.authed = True
            self.conn.auth_user = user
            self.send(b"235 2.7.0 Authentication successful\r\n")
        else:
            self.send(b"535 5.7.8 Authentication credentials invalid\r\n")

    def read_data(self) -> bytes:
        """The message up to and including CRLF . CRLF (linear: RawSession's rescans)."""
        s = self.s
        buf = bytearray(s._buf)
        s._buf = b""
        start = 0
        while True:
            if buf.startswith(b".\r\n"):
                end = 3
            else:
                at = buf.find(b"\r\n.\r\n", start)
                end = at + 5 if at >= 0 else -1
            if end >= 0:
                s._buf = bytes(buf[end:])
                return bytes(buf[:end])
            start = max(0, len(buf) - 4)
            data = s.sock.recv(262144)
            if not data:
                raise Hangup
            buf += data

    def ask(self, prompt: bytes) -> str:
        self.send(prompt)
        line = self.s.readline()
        if not line:
            raise Hangup
        return line.decode("ascii", "replace").strip()

    # --- the transaction -------------------------------------------------------

    def do_MAIL(self, arg: str) -> None:
        if not arg.upper().startswith("FROM:<") or ">" not in arg:
            self.send(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
            return
        addr, _, rest = arg[6:].partition(">")
        params = rest.split()
        size = self.relay._setting("size")
        for p in params:
            key, _, value = p.partition("=")
            if key.upper() == "SIZE" and size and value.isdigit() and int(value) > size:  # type: ignore[operator]
                self.fault("mail")
                self.send(b"552 5.3.4 Message size exceeds fixed limit\r\n")
                return
            if key.upper() == "BODY" and value.upper() == "8BITMIME" \
                    and not self.relay._setting("eightbitmime"):
                self.fault("mail")
                self.send(b"555 5.5.4 BODY=8BITMIME not supported\r\n")
                return
        if self.mail_from is not None:
            self.send(b"503 5.5.1 nested MAIL command\r\n")
            return
        if self.reply("mail", b"250 2.1.0 Ok\r\n"):
            return
        self.mail_from, self.mail_params = addr, params

    def do_RCPT(self, arg: str) -> None:
        if self.mail_from is None:
            self.send(b"503 5.5.1 need MAIL first\r\n")
            return
        if not arg.upper().startswith("TO:<") or ">" not in arg:
            self.send(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
            return
        addr = arg[4:].partition(">")[0]
        if not addr.isascii() and not self.relay._setting("smtputf8"):
            self.fault("rcpt")
            self.send(b"553 5.6.7 non-ASCII address without SMTPUTF8\r\n")
            return
        local = addr.split("@")[0].lower()
        if local.startswith("bad"):  # a mailbox that does not exist, on every connection
            self.fault("rcpt")
            self.send(b"550 5.1.1 no such user\r\n")
            return
        if local.startswith("later") and not self.relay.healed:
            self.fault("rcpt")
            self.send(b"451 4.2.0 mailbox busy, try later\r\n")
            return
        if self.reply("rcpt", b"250 2.1.5 Ok\r\n"):
            return
        self.rcpts.append(addr)

    def do_DATA(self, arg: str) -> None:
        if self.mail_from is None or not self.rcpts:
            self.fault("data")
            self.send(b"503 5.5.1 need RCPT first\r\n")
            return
        if self.reply("data", b"354 End data with <CR><LF>.<CR><LF>\r\n"):
            return
        f = self.fault("data_stream")
        if f is not None:
            self.strike(f)
            return
        raw = self.read_data()
        data = _unstuff(raw)
        d = Delivery(self.conn.number, self.mail_from, list(self.rcpts), self.mail_params,
                     data, committed=False, answered=False, tls=self.conn.tls)
        self.reset_transaction()
        size = self.relay._setting("size")
        if size and len(data) > size:  # type: ignore[operator]
            self.fault("eod")
            self.send(b"552 5.3.4 Message size exceeds fixed limit\r\n")
            return
        f = self.fault("eod")
        if f is not None:
            if f.accept:
                d.committed = True
                self.relay._deliver(d)
            self.strike(f)
            return
        d.committed = True
        self.relay._deliver(d)
        ok = f"250 2.0.0 Ok: queued as H{next(_ids)}\r\n".encode()
        self.messages += 1
        f = self.fault("message")  # the 250 and what follows it leave in one write
        d.answered = True
        if f is None:
            self.send(ok)
            return
        self.send(ok + (f.reply if f.then != "flood" else b""))
        self.strike(replace(f, reply=b""))


def _b64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except ValueError:
        return ""


def _unstuff(raw: bytes) -> bytes:
    """Raw DATA (with the final dot line) to the message text."""
    body = raw[:-3] if raw.endswith(b".\r\n") else raw
    lines = body.split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)
