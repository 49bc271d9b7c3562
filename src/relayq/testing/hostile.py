"""A hostile smarthost: a real ESMTP server on loopback that misbehaves on cue.

`HostileRelay` speaks enough ESMTP to take mail (EHLO/HELO, STARTTLS, AUTH
PLAIN/LOGIN/CRAM-MD5, MAIL/RCPT/DATA/RSET/NOOP/QUIT, PIPELINING) and records,
per connection, what it committed: which recipients, and whether the client
was told 250. It misbehaves by a declarative list of `Fault`s (which step,
which occurrence, what bytes, then what) and a few server-wide options (a
byte every T seconds, a reply split at every byte, a tiny receive window,
capabilities left out). `heal()` turns it into a well-behaved relay for the
next queue run, so a test can check that what was deferred gets through once.

It is built on ScriptedServer (raw bytes: aiosmtpd would hide the framing
faults), one thread per connection, and is used by the hostile-smarthost
matrix (tests/system/test_hostile_matrix.py, docs/reliability.md).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import itertools
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from relayq.testing.smarthost import RawSession, ScriptedServer

if TYPE_CHECKING:
    from relayq.testing.tls import TestPKI

NAME = "hostile.example.org"
# Where a fault can strike. "ehlo_tls" is the EHLO after the TLS handshake;
# "message" strikes right after the n-th message's 250 (in the same write);
# "data_stream" is the message text after 354 (then="stall" stops reading).
STEPS = ("greeting", "ehlo", "helo", "starttls", "ehlo_tls", "auth", "mail", "rcpt", "data",
         "data_stream", "eod", "rset", "message", "quit")
THEN = ("", "close", "reset", "stall", "flood")
_ids = itertools.count(1)


@dataclass(frozen=True)
class Fault:
    """At the `nth` `step` of a connection (and later ones with `and_after`): send `reply`.

    then: "" go on; "close" FIN; "reset" RST (SO_LINGER 0); "stall" neither read
    nor answer until the client gives up; "flood" send reply bytes without end.
    accept (at "eod"): commit the message before misbehaving, as a relay
    that took it but whose answer never arrived. In a reply, b"{echo}" becomes
    what the client sent in AUTH, decoded (a server quoting the credentials).
    """

    step: str
    reply: bytes = b""
    nth: int = 1
    and_after: bool = False
    then: str = ""
    accept: bool = False

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise ValueError(f"unknown step {self.step!r}")
        if self.then not in THEN:
            raise ValueError(f"unknown then {self.then!r}")


@dataclass
class Delivery:
    """One transaction that reached the end of data."""

    connection: int
    mail_from: str
    rcpt_tos: list[str]
    mail_params: list[str]
    data: bytes  # dot-unstuffed, CRLF line ends
    committed: bool  # the relay took responsibility (would deliver it)
    answered: bool  # ... and wrote its 250 to the client
    tls: bool


@dataclass
class Connection:
    number: int
    commands: list[tuple[bool, str]] = field(default_factory=list)  # (in TLS, line); AUTH masked
    tls: bool = False
    auth_user: str = ""


class _Hangup(Exception):
    """The script ends the connection (close, reset or end of a stall)."""


class HostileRelay(ScriptedServer):
    """An ESMTP relay on 127.0.0.1 that misbehaves as told; see the module docstring.

    faulty: how many connections misbehave (0: every one until heal()).
    drip: seconds between the bytes of every reply (0: write at once).
    slow: every reply spread over this many seconds (each one just inside a timeout).
    segment: write each reply in pieces of this many bytes (1: split at every byte).
    rcvbuf: SO_RCVBUF of accepted sockets (a small TCP window for stall tests).
    """

    def __init__(
        self,
        *,
        faults: tuple[Fault, ...] = (),
        faulty: int = 0,
        hostname: str = NAME,
        tls_context: ssl.SSLContext | None = None,
        offer_starttls: bool = True,
        pipelining: bool = True,
        eightbitmime: bool = True,
        smtputf8: bool = True,
        size: int | None = 10 * 2**20,
        auth: dict[str, str] | None = None,
        auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5"),
        drip: float = 0.0,
        slow: float = 0.0,
        segment: int = 0,
        rcvbuf: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(script=self._serve, host=host, tls_context=tls_context,
                         segment=segment)
        self.faults = tuple(faults)
        self.faulty = faulty
        self.hostname = hostname
        self.offer_starttls = offer_starttls
        self.pipelining = pipelining
        self.eightbitmime = eightbitmime
        self.smtputf8 = smtputf8
        self.size = size
        self.auth = dict(auth or {})
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self.drip = drip
        self.slow = slow
        self.rcvbuf = rcvbuf
        self.healed = False
        self._healthy: dict[str, object] = {}
        self.connections: list[Connection] = []
        self.deliveries: list[Delivery] = []
        if rcvbuf:  # the window is advertised from the listening socket's buffer
            self._sock.close()
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.socket(family, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((host, 0))
            self._sock.listen(16)
            self._sock.settimeout(0.1)
            self.port = self._sock.getsockname()[1]

    def start(self) -> HostileRelay:
        super().start()
        return self

    def __enter__(self) -> HostileRelay:
        return self.start()

    # --- what the tests read ---------------------------------------------------

    def heal(self, **healthy: object) -> None:
        """From the next connection on, behave: no faults, normal capabilities.

        `healthy` overrides attributes for the healed relay (e.g. tls_context).
        """
        with self._lock:
            self.healed = True
            self._healthy = dict(healthy)

    def copies(self, rcpt: str, *, answered: bool = True, sender: str | None = None) -> int:
        """Transactions the relay committed for `rcpt` (told 250 unless answered=False)."""
        with self._lock:
            return sum(1 for d in self.deliveries
                       if d.committed and (d.answered or not answered)
                       and rcpt.lower() in (r.lower() for r in d.rcpt_tos)
                       and (sender is None or d.mail_from == sender))

    def commands(self, *, clear: bool = False) -> list[str]:
        """Every command line received (only those sent in clear with clear=True)."""
        with self._lock:
            return [c for conn in self.connections for tls, c in conn.commands
                    if not (clear and tls)]

    # --- server side ---------------------------------------------------------

    def _setting(self, name: str) -> object:
        if self.healed and name in self._healthy:
            return self._healthy[name]
        if self.healed and name in ("drip", "segment", "slow"):
            return 0
        if self.healed and name in ("pipelining", "eightbitmime", "smtputf8", "offer_starttls"):
            return True
        if self.healed and name == "size":
            return 10 * 2**20
        if self.healed and name == "auth_mechanisms":
            return ("PLAIN", "LOGIN", "CRAM-MD5")
        return getattr(self, name)

    def _serve(self, s: RawSession) -> None:
        with self._lock:
            conn = Connection(len(self.connections) + 1)
            self.connections.append(conn)
            faulty = not self.healed and (self.faulty == 0 or conn.number <= self.faulty)
        _Session(self, s, conn, faulty).run()

    def _deliver(self, d: Delivery) -> None:
        with self._lock:
            self.deliveries.append(d)


class _Session:
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
                    raise _Hangup
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
            raise _Hangup
        if f.then == "reset":
            self.reset()
        if f.then == "stall":
            self.stall()
        if f.then == "flood":
            self.flood(f.reply or b"250-flood\r\n")

    def reset(self) -> None:
        with contextlib.suppress(OSError):
            self.s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raise _Hangup

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
        raise _Hangup

    def flood(self, piece: bytes, limit: int = 256 * 2**20) -> None:
        block = piece * max(1, 65536 // len(piece))
        sent = 0
        with contextlib.suppress(OSError):
            while sent < limit and not self.relay._stop.is_set():
                self.s.sock.sendall(block)
                sent += len(block)
        raise _Hangup

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
        except _Hangup:
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
                raise _Hangup
            buf += data

    def ask(self, prompt: bytes) -> str:
        self.send(prompt)
        line = self.s.readline()
        if not line:
            raise _Hangup
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


# --- certificates the test PKI does not make -------------------------------------


def server_context(pki: TestPKI, which: str) -> ssl.SSLContext:
    """A server context: the TestPKI ones ('good', 'wrong-name', 'unknown-ca'), or
    'expired' (the trusted CA, valid names, expired yesterday) and 'self-signed'."""
    if which == "expired":
        now = datetime.datetime.now(datetime.UTC)
        cert = pki.ca.issue_cert("127.0.0.1", "localhost", "smarthost.example.org",
                                 not_before=now - datetime.timedelta(days=30),
                                 not_after=now - datetime.timedelta(days=1))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        return ctx
    if which == "self-signed":
        return _self_signed()
    return pki.server_context(which)


def _self_signed() -> ssl.SSLContext:
    import ipaddress
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(pem)
        f.flush()
        ctx.load_cert_chain(f.name)
    return ctx
