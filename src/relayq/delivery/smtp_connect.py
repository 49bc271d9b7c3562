"""Where and how to reach a relay: addresses (MX and A/AAAA lookups), the loop
check, and the AUTH secret.

SmtpTransport (relayq.delivery.smtp_transport) asks these questions when it
opens a session; nothing here keeps state between calls, except what the
caller keeps (the resolver is made per lookup, the secret cached by it).
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relayq.core import policy
from relayq.smtp.client import AuthFailed, ConnectFailed, SmtpError

if TYPE_CHECKING:
    from collections.abc import Callable

    import dns.resolver

    from relayq.core.config import Config
    from relayq.smtp.protocol import Reply

SECRET_COMMAND_TIMEOUT = 30.0
DNS_TIMEOUT = 5.0


@dataclass
class Target:
    """One address to try: the host name (for messages and TLS) and where to connect."""

    name: str
    port: int
    family: int
    sockaddr: tuple[object, ...]


def targets(cfg: Config, host: str, port: int, mx: bool,
            say: Callable[[str], None]) -> list[Target]:
    """Addresses to try for one smarthost, in order (`say` hears each lookup failure)."""
    names = mx_route(cfg, host, mx) or [host]
    use_dns = bool(cfg.dns_servers)
    out: list[Target] = []
    last: SmtpError | None = None
    for name in names:
        try:
            if use_dns and not _is_ip(name):
                out.extend(_dns_addresses(cfg, name, port))
            else:
                out.extend(_getaddrinfo(name, port))
        except SmtpError as exc:
            say(str(exc))
            last = exc
    if not out:
        raise last or ConnectFailed(f"no address for {host}")
    return out


def mx_route(cfg: Config, host: str, mx: bool) -> list[str] | None:
    """The MX hosts a smarthost stands for, by preference: None when none are looked up
    ([host], an IP address, a name without a dot), [] when it has no MX (the host
    itself); ConnectFailed (4.4.3) when the lookup fails. `sendmail -bv` shows this."""
    if not mx or _is_ip(host) or "." not in host.strip("."):
        return None
    return mx_hosts(host, _resolver(cfg))


def _resolver(cfg: Config) -> dns.resolver.Resolver | None:
    return make_resolver(cfg.dns_servers, min(DNS_TIMEOUT, cfg.connect_timeout))


def _dns_addresses(cfg: Config, name: str, port: int) -> list[Target]:
    import dns.exception
    import dns.resolver

    res = _resolver(cfg)
    if res is None:
        raise ConnectFailed("no DNS resolver configured")
    out: list[Target] = []
    for rtype, family in (("AAAA", socket.AF_INET6), ("A", socket.AF_INET)):
        try:
            answer = res.resolve(name, rtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise ConnectFailed(f"DNS lookup of {name} failed: {exc}") from None
        for rr in answer:
            ip = rr.to_text()
            sockaddr: tuple[object, ...] = (ip, port, 0, 0) if family == socket.AF_INET6 \
                else (ip, port)
            out.append(Target(name, port, family, sockaddr))
    if not out:
        raise ConnectFailed(f"Host unknown: {name}", "4.4.4")
    return out


def _dns_why(exc: BaseException) -> str:
    """One short line: dnspython's messages list every server and attempt."""
    import dns.exception
    import dns.resolver

    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL or REFUSED)"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


class MailLoop(SmtpError):
    """The relay is this relayq itself: defer (4.4.6), never bounce; the fix is ours."""

    dsn_code = policy.LOOP_STATUS


def loop_reason(ip: str, port: int, listen: list[str], own_name: str, *replies: Reply) -> str:
    """Why a relay is ourselves, or "": its address is one of our listen addresses
    (config.own_listener), or its greeting or EHLO reply names it as we name
    ourselves (hostname.smtp_name), as sendmail and Postfix decide."""
    from relayq.core.config import own_listener

    spec = own_listener(ip, port, listen)
    where = f"[{ip}]:{port}"
    if spec:
        return f"smarthost {where} is this relayq's own listener (listen {spec})"
    mine = own_name.rstrip(".").lower()
    if "." not in mine or mine.split(".", 1)[0] == "localhost":
        return ""  # a name many hosts share (a container's default) proves nothing
    for reply in replies:
        words = reply.lines[0].split() if reply.lines else []
        if words and words[0].rstrip(".").lower() == mine:
            return f"smarthost {where} greets as {words[0]}, this relayq's own name"
    return ""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _getaddrinfo(name: str, port: int) -> list[Target]:
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectFailed(f"Host unknown: {name} ({exc.strerror})", "4.4.4") from None
    seen: set[tuple[object, ...]] = set()
    out = []
    for family, _, _, _, sockaddr in infos:
        if sockaddr not in seen:
            seen.add(sockaddr)
            out.append(Target(name, port, family, tuple(sockaddr)))
    return out


def parse_dns_server(spec: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '::1', '[::1]:5353' -> (ip, port)."""
    spec = spec.strip()
    if spec.startswith("["):
        ip, _, rest = spec[1:].partition("]")
        return ip, int(rest[1:]) if rest.startswith(":") else 53
    if spec.count(":") == 1:
        ip, port = spec.split(":")
        return ip, int(port)
    return spec, 53


def make_resolver(servers: list[str], timeout: float) -> dns.resolver.Resolver | None:
    """A dnspython resolver with a short timeout; `servers` override resolv.conf.

    dnspython 2.4 and later take a port per server (Do53Nameserver); Debian 12's
    2.3 takes addresses and a port for each address (nameserver_ports).
    """
    import dns.resolver

    if servers:
        res = dns.resolver.Resolver(configure=False)
        given = [parse_dns_server(s) for s in servers]
        try:
            import dns.nameserver
        except ImportError:  # dnspython 2.3
            res.nameservers = [ip for ip, _ in given]
            res.nameserver_ports = dict(given)
        else:
            res.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in given]
    else:
        try:
            res = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            return None
    res.timeout = timeout
    res.lifetime = timeout * 2
    return res


def mx_hosts(name: str, resolver: dns.resolver.Resolver | None) -> list[str]:
    """MX targets by preference; [] when there is no MX (use the host itself).

    Only an answer saying "no MX" (NXDOMAIN, an empty answer) means the host
    itself (RFC 5321 5.1); SERVFAIL, REFUSED or a timeout say nothing, so the
    message waits (ConnectFailed, 4.4.3) instead of going to the A record.
    """
    import dns.exception
    import dns.resolver

    if resolver is None:
        return []
    try:
        answer = resolver.resolve(name, "MX", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise ConnectFailed(f"MX lookup of {name} failed: {_dns_why(exc)}", "4.4.3") from None
    records = sorted(((rr.preference, i, rr.exchange.to_text(omit_final_dot=True))
                      for i, rr in enumerate(answer)))
    hosts = [h for _, _, h in records if h and h != "."]
    return hosts


def read_secret(cfg: Config) -> str:
    """The AUTH secret from password, password_file or password_command.

    The command runs without a shell, with a timeout, and its output never
    appears in an error message.
    """
    if cfg.password:
        return cfg.password
    if cfg.password_file:
        try:
            with open(cfg.password_file, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise AuthFailed(f"cannot read password_file {cfg.password_file}: "
                             f"{exc.strerror}") from None
        return _one_line(raw.decode("utf-8", "replace"))
    if cfg.password_command:
        try:
            argv = shlex.split(cfg.password_command)
        except ValueError as exc:
            raise AuthFailed(f"password_command: {exc}") from None
        if not argv:
            raise AuthFailed("password_command is empty")
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=SECRET_COMMAND_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise AuthFailed(f"password_command timed out after {SECRET_COMMAND_TIMEOUT:.0f}s"
                             ) from None
        except OSError as exc:
            raise AuthFailed(f"password_command {argv[0]}: {exc.strerror}") from None
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            hint = f": {err[0][:200]}" if err else ""
            raise AuthFailed(f"password_command exited with status {proc.returncode}{hint}")
        return _one_line(proc.stdout.decode("utf-8", "replace"))
    raise AuthFailed("user is set but no password, password_file or password_command")


def _one_line(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text

