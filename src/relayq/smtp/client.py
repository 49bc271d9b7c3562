"""One SMTP client connection: sockets and TLS around relayq.smtp.protocol.

This module owns the socket of one connection to one address. It connects
(plain or implicit TLS), reads replies against a per-reply timeout and an
optional overall deadline (a whole connection setup or transaction), runs
STARTTLS (dropping whatever arrived in clear before the handshake), EHLO/HELO,
AUTH, pipelined or lock-step commands and the DATA stream. Every failure that
makes the connection unusable is raised as an SmtpError subclass with a
one-line, secret-free message; SMTP replies themselves are returned as data.
It is synchronous on purpose: it runs in short-lived processes.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from typing import TYPE_CHECKING

from relayq.smtp import protocol as proto
from relayq.smtp.protocol import Capabilities, Reply

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

    Sink = Callable[[str], None]

QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
READ_SIZE = 64 * 1024
DATA_CHUNK = 256 * 1024
MASK = "********"


class SmtpError(Exception):
    """The connection failed or can no longer be trusted: defer and close."""

    dsn_code = "4.4.2"

    def __init__(self, message: str, dsn_code: str | None = None) -> None:
        super().__init__(message)
        if dsn_code:
            self.dsn_code = dsn_code


class ConnectFailed(SmtpError):
    """TCP connect failed, the name did not resolve, or the greeting refused us."""

    dsn_code = "4.4.1"


class TlsFailed(SmtpError):
    """STARTTLS missing or refused where required, or the handshake/verification failed."""

    dsn_code = "4.7.5"
    certificate = False  # the handshake ended on the peer's certificate (relayq test shows it)


class AuthFailed(SmtpError):
    """AUTH impossible or refused (never a bounce: the fault is ours to fix).

    `code` is the server's reply code when it refused the credentials (535), else 0.
    """

    dsn_code = "4.7.0"

    def __init__(self, message: str, dsn_code: str | None = None, *, code: int = 0) -> None:
        super().__init__(message, dsn_code)
        self.code = code


class ReauthNeeded(AuthFailed):
    """The OAuth2 grant is gone (invalid_grant: consent revoked, password changed).
    The account's mail is held, never bounced, until `relayq oauth2 login`; its
    message starts with core.policy.REAUTH_REASON."""


class ConnectionLost(SmtpError):
    pass


class ReplyTimeout(SmtpError):
    pass


class DeadlineExceeded(ReplyTimeout):
    """The whole connection setup or message transaction took longer than allowed."""


class ProtocolViolation(SmtpError):
    """Malformed, oversized, unsolicited or mis-paired reply."""

    dsn_code = "4.5.0"


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def auth_allowed(tls: bool, peer_ip: str) -> bool:
    """AUTH only inside TLS, or in clear to a loopback peer (nobody can sniff it)."""
    return tls or is_loopback(peer_ip)


def tls_context(
    *, ca_file: str = "", verify: bool = True, client_cert: str = "", client_key: str = ""
) -> ssl.SSLContext:
    """A verifying client context (system store unless ca_file), optional client cert."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFailed(f"cannot load ca_file {ca_file}: {_why(exc)}") from None
    ctx.minimum_version = max(ctx.minimum_version, ssl.TLSVersion.TLSv1_2)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert:
        try:
            ctx.load_cert_chain(client_cert, client_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFailed(f"cannot load client_cert {client_cert}: {_why(exc)}") from None
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class SmtpClient:
    """One connection to one server address.

    `name` is the host name used in messages (an IP literal when the smarthost
    was given as one); `tls_name`, if set, is the name the certificate must
    carry instead (the configured smarthost, never a name DNS told us).
    """

    def __init__(
        self,
        name: str,
        port: int,
        *,
        timeout: float = 300.0,
        connect_timeout: float = 30.0,
        transcript: Sink | None = None,
        log: Sink | None = None,
        tls_name: str = "",
    ) -> None:
        self.name = name
        self.tls_name = tls_name or name
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.transcript = transcript
        self.log = log
        self.sock: socket.socket | None = None
        self.parser = proto.ReplyParser()
        self.caps = Capabilities()
        self.tls = False
        self.tls_info = ""
        self.greeting: Reply | None = None  # the 220, and the last EHLO reply (relayq test)
        self.ehlo_reply: Reply | None = None
        self.peer_ip = ""
        self.dirty = False  # a transaction was started since the last RSET
        self.after_dot = False  # the final dot of the current message was sent
        self._hide: tuple[str, ...] = ()  # AUTH secrets, masked in every reply read after
        self.deadline: float | None = None  # monotonic time every I/O must end by
        self._deadline_what = ""

    # --- naming ---------------------------------------------------------

    @property
    def where(self) -> str:
        """sendmail's way of naming the peer in errors: `[ip]` or `host`."""
        if not self.peer_ip or self.name != self.peer_ip:
            return self.name
        return f"[{self.peer_ip}]"

    @property
    def relay(self) -> str:
        """`mail.example.org [192.0.2.1]` (the `relay=` of log lines)."""
        if not self.peer_ip:
            return self.name
        if self.name == self.peer_ip:
            return f"[{self.peer_ip}]"
        return f"{self.name} [{self.peer_ip}]"

    # --- connection -------------------------------------------------------

    def connect(
        self,
        family: int,
        sockaddr: tuple[object, ...],
        implicit_tls: ssl.SSLContext | None = None,
    ) -> Reply:
        """Open the TCP (and implicit TLS) connection and read the greeting."""
        self.peer_ip = str(sockaddr[0])
        sock = socket.socket(family, socket.SOCK_STREAM)
        limit, hard = self._limit(self.connect_timeout)
        try:
            sock.settimeout(limit)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            if isinstance(exc, ConnectionRefusedError):
                msg = f"Connection refused by {self.where}"
            elif isinstance(exc, TimeoutError) and hard:
                raise self._late("connecting to") from None
            elif isinstance(exc, TimeoutError):
                msg = f"Connection timed out with {self.where}"
            else:
                msg = f"{_why(exc)} with {self.where}"
            raise ConnectFailed(msg) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.sock = sock
        if implicit_tls is not None:
            self._handshake(implicit_tls)
        greeting = self.greeting = self.read_reply("greeting")
        if not greeting.positive:
            raise ConnectFailed(
                f"{self.where} refused the connection: {greeting}", _temp(greeting.dsn_code)
            )
        return greeting

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def quit(self) -> None:
        """Polite goodbye; never raises, never waits long."""
        if self.sock is None:
            return
        try:
            self.timeout = min(self.timeout, 5.0)
            self.deadline = None  # QUIT has its own 5 s
            self.command(proto.QUIT, "QUIT")
        except SmtpError:
            pass
        finally:
            self.close()

    # --- low-level I/O ------------------------------------------------------

    def _log(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def _show(self, line: str) -> None:
        if self.transcript is not None:
            self.transcript(line)

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise ConnectionLost(f"not connected to {self.where}")
        return self.sock

    def set_deadline(self, seconds: float, what: str) -> None:
        """Every read and write from now on must end within `seconds` in all (0: none).

        The per-reply `timeout` still applies; this bounds the sum, so a relay
        answering each command just inside `timeout` cannot hold us for hours.
        """
        self.deadline = time.monotonic() + seconds if seconds > 0 else None
        self._deadline_what = f"{what} exceeded its deadline of {seconds:.0f} s"

    def clear_deadline(self) -> None:
        self.deadline = None

    def _limit(self, timeout: float) -> tuple[float, bool]:
        """Seconds the next I/O may take, and whether the deadline (not `timeout`) decides."""
        if self.deadline is None:
            return timeout, False
        left = self.deadline - time.monotonic()
        if left < timeout:
            return max(left, 0.0), True
        return timeout, False

    def _late(self, doing: str) -> DeadlineExceeded:
        self.close()
        return DeadlineExceeded(f"{self._deadline_what} {doing} {self.where}")

    def send(self, data: bytes, what: str) -> None:
        sock = self._sock()
        limit, hard = self._limit(self.timeout)
        try:
            if limit <= 0:
                raise TimeoutError
            sock.settimeout(limit)
            sock.sendall(data)
        except TimeoutError:
            self.close()
            if hard:
                raise self._late(f"while sending {what} to") from None
            raise ReplyTimeout(f"timeout writing {what} to {self.where}") from None
        except OSError as exc:
            self.close()
            raise ConnectionLost(
                f"lost connection with {self.where} while sending {what} ({_why(exc)})"
            ) from None

    def read_reply(self, what: str) -> Reply:
        """Read one reply; the whole reply must arrive within `timeout` (and the deadline)."""
        limit, hard = self._limit(self.timeout)
        deadline = time.monotonic() + limit
        sock = self._sock()
        while True:
            try:
                reply = self.parser.next_reply()
            except proto.SmtpProtocolError as exc:
                self.close()
                raise ProtocolViolation(
                    f"protocol error from {self.where} in reply to {what}: {exc}"
                ) from None
            if reply is not None:
                if self._hide:  # a server quoting our AUTH line must not put it in logs
                    reply = proto.masked(reply, self._hide, MASK)
                if self.transcript is not None:
                    last = len(reply.lines) - 1
                    for i, text in enumerate(reply.lines):
                        sep = "-" if i < last else " "
                        self.transcript(f"{reply.code}{sep}{text}".rstrip())
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                if hard:
                    raise self._late(f"waiting for reply to {what} from")
                raise ReplyTimeout(f"timeout waiting for reply to {what} from {self.where}")
            try:
                sock.settimeout(remaining)
                if QUICKACK is not None:
                    # ACK at once: a server that sends pipelined replies as separate
                    # small writes with Nagle on would otherwise wait for our
                    # delayed ACK (40 ms per transaction on Linux).
                    sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                self.close()
                if hard:
                    raise self._late(f"waiting for reply to {what} from") from None
                raise ReplyTimeout(
                    f"timeout waiting for reply to {what} from {self.where}"
                ) from None
            except OSError as exc:
                self.close()
                raise ConnectionLost(
                    f"lost connection with {self.where} while waiting for reply to {what}"
                    f" ({_why(exc)})"
                ) from None
            if not data:
                self.close()
                raise ConnectionLost(
                    f"lost connection with {self.where} while waiting for reply to {what}"
                )
            self.parser.feed(data)

    def ensure_quiet(self, what: str) -> None:
        """Nothing may arrive unasked: unsolicited bytes would pair with the wrong command."""
        sock = self._sock()
        if self.parser.buffered:
            self.close()
            raise ProtocolViolation(f"unsolicited data from {self.where} before {what}")
        data: bytes | None
        try:
            sock.setblocking(False)
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            data = None
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"lost connection with {self.where} ({_why(exc)})") from None
        finally:
            if self.sock is not None:
                sock.settimeout(self.timeout)
        if data == b"":
            self.close()
            raise ConnectionLost(f"connection closed by {self.where}")
        if data:
            self.close()
            raise ProtocolViolation(f"unsolicited data from {self.where} before {what}")

    def _after(self, what: str) -> None:
        if self.parser.buffered:
            self.close()
            raise ProtocolViolation(f"unsolicited data from {self.where} after reply to {what}")

    def command(self, line: bytes, what: str, show: str | None = None) -> Reply:
        """Send one command and read its one reply (lock-step)."""
        self.ensure_quiet(what)
        self._show(">>> " + (show if show is not None else line.decode("utf-8", "replace")[:-2]))
        self.send(line, what)
        reply = self.read_reply(what)
        self._after(what)
        return reply

    def pipeline(self, lines: list[tuple[bytes, str]]) -> list[Reply]:
        """RFC 2920: write the whole group at once, then read one reply per command."""
        self.ensure_quiet(lines[0][1])
        for line, _ in lines:
            self._show(">>> " + line.decode("utf-8", "replace")[:-2])
        self.send(b"".join(line for line, _ in lines), lines[0][1])
        replies = [self.read_reply(what) for _, what in lines]
        self._after(lines[-1][1])
        return replies

    # --- SMTP steps ---------------------------------------------------------

    def ehlo(self, name: str) -> Reply:
        """EHLO, falling back to HELO on 5xx; sets `caps` from this reply only."""
        self.caps = Capabilities()
        try:  # a host name (the kernel's node name) may hold anything: refuse before writing
            ehlo, helo = proto.ehlo(name), proto.helo(name)
        except proto.CommandError as exc:
            raise SmtpError(f"cannot greet {self.where} as {name!r}: {exc} (set ehlo_name)",
                            "4.3.5") from None
        reply = self.ehlo_reply = self.command(ehlo, "EHLO")
        if reply.positive:
            self.caps = Capabilities.from_ehlo(reply)
            return reply
        if reply.permanent:
            reply = self.command(helo, "HELO")
            if reply.positive:
                return reply
        raise ConnectFailed(f"{self.where} refused our greeting: {reply}", _temp(reply.dsn_code))

    def starttls(self, context: ssl.SSLContext) -> None:
        """STARTTLS, dropping anything received in clear, then the handshake.

        The caller must EHLO again; capabilities seen before are forgotten.
        """
        self.ensure_quiet("STARTTLS")
        self._show(">>> STARTTLS")
        self.send(proto.STARTTLS, "STARTTLS")
        reply = self.read_reply("STARTTLS")
        if reply.code != 220:
            raise TlsFailed(f"{self.where} refused STARTTLS: {reply}")
        dropped = self.parser.discard()
        if dropped:
            self._log(f"discarded {dropped} bytes sent by {self.where} with its STARTTLS reply")
        self.caps = Capabilities()
        self._handshake(context)

    def _handshake(self, context: ssl.SSLContext) -> None:
        sock = self._sock()
        server_hostname = self.tls_name if context.check_hostname else None
        limit, hard = self._limit(self.connect_timeout)
        try:
            sock.settimeout(limit)
            self.sock = context.wrap_socket(sock, server_hostname=server_hostname)
        except (ssl.SSLError, OSError) as exc:
            self.close()
            if hard and isinstance(exc, TimeoutError):
                raise self._late("in the TLS handshake with") from None
            hint = ""
            if isinstance(exc, ssl.SSLCertVerificationError) and self.tls_name != self.name:
                hint = (f"; the certificate must be valid for the configured smarthost "
                        f"{self.tls_name}, not only for the MX host {self.name} "
                        f"(write [{self.name}] to trust that name)")
            failed = TlsFailed(f"TLS handshake with {self.where} failed: {_why(exc)}{hint}")
            failed.certificate = isinstance(exc, ssl.SSLCertVerificationError)
            raise failed from None
        self.tls = True
        tls = self.sock
        assert isinstance(tls, ssl.SSLSocket)
        cipher = tls.cipher()
        verified = "verified" if context.verify_mode == ssl.CERT_REQUIRED else "not verified"
        self.tls_info = (
            f"{tls.version()} {cipher[0] if cipher else '?'} with {self.relay}, "
            f"certificate {verified}"
        )
        bits = cipher[2] if cipher else 0
        # sendmail's line (log parsers count it); verify=NOT: not checked (tls_verify off)
        self._log(f"STARTTLS=client, relay={self.relay}, version={tls.version()}, "
                  f"verify={'OK' if verified == 'verified' else 'NOT'}, "
                  f"cipher={cipher[0] if cipher else '?'}, bits={bits}/{bits}")

    def auth(self, mechanism: str, user: str, secret: str) -> Reply:
        """AUTH with the given mechanism; raises AuthFailed unless 235."""
        mech = mechanism.upper()
        forms = {*self._hide, *proto.secret_forms(user, secret)}  # a retry keeps hiding the first
        if mech == "OAUTHBEARER":  # its initial response names this host and port too
            try:
                forms.add(proto.auth_oauthbearer(user, secret, self.tls_name, self.port))
            except proto.CommandError:
                pass  # refused below, before anything is sent
        self._hide = tuple(sorted(forms, key=len, reverse=True))
        try:
            return self._auth(mech, user, secret)
        except proto.CommandError as exc:  # raised before the offending line is written
            raise AuthFailed(f"cannot send AUTH {mech} to {self.where}: {exc}") from None

    def _auth(self, mech: str, user: str, secret: str) -> Reply:
        proto.check_arg(user, "AUTH user")
        what = f"AUTH {mech}"
        if mech == "PLAIN":
            reply = self._initial("PLAIN", proto.auth_plain(user, secret), what)
        elif mech == "LOGIN":
            first, second = proto.auth_login_steps(user, secret)
            reply = self.command(b"AUTH LOGIN\r\n", what)
            if reply.code == 334:
                reply = self.command(first.encode() + proto.CRLF, what, show=MASK)
            if reply.code == 334:
                reply = self.command(second.encode() + proto.CRLF, what, show=MASK)
        elif mech in ("XOAUTH2", "OAUTHBEARER"):
            initial = proto.auth_xoauth2(user, secret) if mech == "XOAUTH2" else \
                proto.auth_oauthbearer(user, secret, self.tls_name, self.port)
            reply = self._initial(mech, initial, what)
            if reply.code == 334:
                # the SASL error (RFC 7628 3.2.2): a JSON status; the client ends the
                # exchange (an empty line for XOAUTH2, %x01 for OAUTHBEARER) and the
                # server answers with its failure reply
                status = proto.oauth_error(reply.text)
                end = "AQ==" if mech == "OAUTHBEARER" else ""
                reply = self.command(end.encode() + proto.CRLF, what, show=end)
                if status:  # the log has it; the reason kept for mailq stays the reply
                    self._log(f"AUTH {mech} refused by {self.relay}: token status {status}")
                if reply.code not in (235, 334):
                    raise AuthFailed(f"AUTH {mech} failed at {self.where}: {reply}",
                                     code=reply.code if reply.code >= 400 else 535)
        else:
            raise AuthFailed(f"unsupported AUTH mechanism {mech}")
        if reply.code == 334:  # still asking after our last line: the exchange never
            self.close()  # ended, so nothing more may be sent on this connection
            raise AuthFailed(f"AUTH {mech} failed at {self.where}: the server did not end "
                             "the SASL exchange (334 after the last response); "
                             "connection closed")
        if reply.code != 235:
            raise AuthFailed(f"AUTH {mech} failed at {self.where}: {reply}", code=reply.code)
        self._log(f"AUTH=client, relay={self.relay}, authid={user}, mech={mech}, bits=0")
        return reply

    def _initial(self, mech: str, initial: str, what: str) -> Reply:
        """AUTH with its initial response on the command line, unless that would pass
        the 512-octet command limit (a 1.5 KB access token does): then AUTH alone and
        the response after the server's empty 334, as RFC 4954 section 4 requires."""
        line = proto.command("AUTH", mech, initial)
        if len(line) <= proto.MAX_COMMAND_LINE:
            return self.command(line, what, show=f"AUTH {mech} {MASK}")
        reply = self.command(proto.command("AUTH", mech), what)
        if reply.code != 334:
            return reply
        return self.command(initial.encode("ascii") + proto.CRLF, what, show=MASK)

    def rset(self) -> None:
        reply = self.command(proto.RSET, "RSET")
        if not reply.positive:
            self.close()
            raise ConnectionLost(f"{self.where} refused RSET: {reply}")
        self.dirty = False

    def send_data(self, data: BinaryIO) -> Reply:
        """Stream the message after a 354 and return the end-of-data reply."""
        self.after_dot = False
        enc = proto.DataEncoder()
        while True:
            try:
                chunk = data.read(DATA_CHUNK)
            except BaseException:
                self.close()  # mid-DATA: no later command may land in this message
                raise
            if not chunk:
                break
            out = enc.feed(chunk)
            if out:
                self.send(out, "message data")
        self._show(">>> .")
        self.send(enc.finish(), "end of data")
        self.after_dot = True  # the whole dot is out: a lost reply may hide an acceptance
        reply = self.read_reply("end of data")
        if self.parser.buffered:
            # The reply stands: after a 250 the message is the relay's, and refusing it
            # would send it again. What came with it pairs with nothing: the connection
            # is out of step, so it is closed and never reused.
            n = self.parser.discard()
            self._log(f"discarded {n} unsolicited bytes sent by {self.where} with its reply "
                      "to end of data; closing the connection")
            self.close()
        return reply


def _temp(code: str) -> str:
    """A connection-level refusal is a reason to retry, even if the server said 5xx."""
    return "4" + code[1:] if code[:1] in "25" else code
