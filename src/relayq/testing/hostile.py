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
matrix (tests/system/test_hostile_matrix.py, docs/reliability.md). What it can be
told and what it records is relayq.testing.faults; the conversation of one
connection is relayq.testing.hostile_session.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from typing import TYPE_CHECKING

from relayq.testing.faults import STEPS, THEN, Connection, Delivery, Fault
from relayq.testing.hostile_session import Session
from relayq.testing.scripted import ScriptedServer

if TYPE_CHECKING:
    from relayq.testing.scripted import RawSession
    from relayq.testing.tls import TestPKI

__all__ = ["NAME", "STEPS", "THEN", "Connection", "Delivery", "Fault", "HostileRelay",
           "server_context"]

NAME = "hostile.example.org"


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
        Session(self, s, conn, faulty).run()

    def _deliver(self, d: Delivery) -> None:
        with self._lock:
            self.deliveries.append(d)


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
