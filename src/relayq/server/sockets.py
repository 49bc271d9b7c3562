"""Where the listener listens and who is on the other end.

Binding needs root (before privileges are dropped) and systemd may pass the
sockets instead; either way only loopback addresses unless the configuration
says `listen_nonloopback = true`. The peer's identity is the kernel's word
(sock_diag over netlink, else /proc/net/tcp{,6}), what identd would answer:
the listener records the local user whose process connected.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import TYPE_CHECKING

from relayq.core.config import parse_listen
from relayq.core.errors import ConfigError, RelayqError

if TYPE_CHECKING:
    from relayq.core.config import Config

LOCAL_CLIENTS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})



def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_config(cfg: Config) -> list[tuple[str, int]]:
    """The listen addresses; ConfigError (78) for a non-loopback one not allowed, and
    for a smarthost that is one of them (a relay loop: issue 12 §3)."""
    out = []
    if not cfg.listen:
        raise ConfigError("listen: no address to listen on")
    for spec in cfg.listen:
        host, port = parse_listen(spec)
        if not _is_loopback(host) and not cfg.listen_nonloopback:
            raise ConfigError(f"listen: {spec} is not a loopback address; set "
                              "listen_nonloopback = true to bind it (only local clients "
                              "may relay even then)")
        out.append((host, port))
    cfg.check_no_loop()
    return out


def check_sockets(cfg: Config, socks: list[socket.socket]) -> None:
    """The same rule for sockets passed by systemd."""
    for s in socks:
        if s.family not in (socket.AF_INET, socket.AF_INET6):
            raise ConfigError("listen: systemd passed a socket that is not TCP/IP")
        host = s.getsockname()[0]
        if not _is_loopback(host) and not cfg.listen_nonloopback:
            raise ConfigError(f"listen: the socket from systemd is bound to {host}, not a "
                              "loopback address; set listen_nonloopback = true to allow it")
    cfg.check_no_loop([f"[{s.getsockname()[0]}]:{s.getsockname()[1]}" for s in socks])


def bind(cfg: Config) -> list[socket.socket]:
    """Bind and listen on every configured address (before dropping privileges)."""
    out: list[socket.socket] = []
    for host, port in check_config(cfg):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(128)
        except OSError as exc:
            s.close()
            for other in out:
                other.close()
            shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            code = 77 if exc.errno == 13 else 75
            raise RelayqError(f"cannot listen on {shown}: {exc.strerror}", code) from None
        out.append(s)
    return out


def user_name(uid: int) -> str:
    """A uid's login name, or the number when it has none."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --- who is on the other end of a loopback connection ------------------------------


def _proc_hex(ip: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word of the address in
    the host's byte order, in hex, then the port."""
    import struct

    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def find_socket_uid(table: bytes, local: str, remote: str) -> int | None:
    """The uid owning the socket whose row in a /proc/net/tcp{,6} `table` has this
    local and remote address (as _proc_hex writes them), or None.

    A row without an inode (TIME_WAIT, or an orphan its process closed) belongs to
    no process: its uid column says 0, which must never be taken for root.
    """
    needle = f" {local} {remote} ".encode()
    start = 0
    while (at := table.find(needle, start)) >= 0:
        end = table.find(b"\n", at)
        fields = table[at:end if end >= 0 else len(table)].split()
        start = at + len(needle)
        # local remote st tx:rx tr:when retrnsmt uid timeout inode
        if len(fields) >= 9 and fields[6].isdigit() and fields[8].isdigit() and fields[8] != b"0":
            return int(fields[6])
    return None


def peer_uid(peer: tuple[str, int], ours: tuple[str, int], proc: str = "/proc/net",
             netlink: bool = True) -> int | None:
    """The uid of the local process at the other end of a loopback TCP connection,
    from the kernel's socket table (what identd answers): the client's socket is the
    one whose local address is our peer's and whose remote address is ours.

    Asked first with one exact sock_diag lookup over netlink (about 20 us, what `ss`
    uses); where that is not available, from /proc/net/tcp or tcp6 (by the peer's
    address), which costs about 12 ms on a quiet host: the kernel walks its whole
    table to print it. An IPv4 client of a dual-stack socket appears as
    ::ffff:a.b.c.d, its socket in either table. None when it cannot be told (not
    found: the client already gone; no owner: TIME_WAIT).
    """
    ip, port = peer[0].split("%", 1)[0], peer[1]
    our_ip, our_port = ours[0].split("%", 1)[0], ours[1]
    candidates: list[tuple[int, str, str]] = []
    if ":" not in ip:
        candidates.append((socket.AF_INET, ip, our_ip))
    else:
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
        our_mapped = ipaddress.IPv6Address(our_ip).ipv4_mapped if ":" in our_ip else None
        if mapped is not None and our_mapped is not None:
            candidates.append((socket.AF_INET, str(mapped), str(our_mapped)))
        candidates.append((socket.AF_INET6, ip, our_ip))
    for family, local, remote in candidates:
        if netlink:
            try:
                uid = _diag_uid(family, (local, port), (remote, our_port))
            except OSError:  # no sock_diag here (a kernel without it, a seccomp filter)
                pass
            else:
                if uid is not None:
                    return uid
                continue
        name = "tcp" if family == socket.AF_INET else "tcp6"
        try:
            with open(os.path.join(proc, name), "rb") as f:
                table = f.read()
        except OSError:
            continue
        uid = find_socket_uid(table, _proc_hex(local, port), _proc_hex(remote, our_port))
        if uid is not None:
            return uid
    return None


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2


def _diag_uid(family: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """One exact lookup of a TCP socket by its addresses (inet_diag_req_v2, no dump):
    its owner's uid, or None if there is no such socket or it has no owner (inode 0).
    OSError when the kernel cannot be asked."""
    import struct

    src = socket.inet_pton(family, local[0]).ljust(16, b"\0")
    dst = socket.inet_pton(family, remote[0]).ljust(16, b"\0")
    # inet_diag_sockid: ports (network order), addresses, interface, cookie (none)
    sockid = (struct.pack("!HH", local[1], remote[1]) + src + dst
              + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    msg = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req  # REQUEST
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(msg)
        data = nl.recv(8192)
    if len(data) < 16:
        raise OSError("short sock_diag answer")
    mtype = struct.unpack_from("=H", data, 4)[0]
    if mtype == NLMSG_ERROR:
        errno_ = -struct.unpack_from("=i", data, 16)[0] if len(data) >= 20 else 0
        if errno_ == 2:  # ENOENT: no such socket
            return None
        raise OSError(errno_, "sock_diag lookup failed")
    if mtype != SOCK_DIAG_BY_FAMILY or len(data) < 16 + 72:
        raise OSError("unexpected sock_diag answer")
    # inet_diag_msg: family state timer retrans, sockid (48), expires rqueue wqueue uid inode
    uid, inode = struct.unpack_from("=II", data, 16 + 64)
    return int(uid) if inode else None

