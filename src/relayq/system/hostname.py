"""This host's names, found without DNS.

Sendmail stalls for a minute when the host name is unqualified and DNS is
slow; we never ask DNS on the submission path. Order: the `domain` setting,
Debian's /etc/mailname, a dotted alias of the host name in /etc/hosts, the
kernel's node name.
"""

from __future__ import annotations

import os


def _from_file(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            line = f.readline().strip()
    except OSError:
        return ""
    return line if line and all(c.isalnum() or c in "-._" for c in line) else ""


def _from_hosts(short: str, path: str = "/etc/hosts") -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                names = line.split("#", 1)[0].split()[1:]
                if short in names or any(n.split(".", 1)[0] == short for n in names):
                    for name in names:
                        if "." in name and name.split(".", 1)[0] == short:
                            return name
    except OSError:
        pass
    return ""


_FQDN: list[str] = []  # computed once per process: Context asks for it several times


def fqdn() -> str:
    if not _FQDN:
        node = os.uname().nodename
        _FQDN.append(node if "." in node else _from_hosts(node) or node)
    return _FQDN[0]


def _fqdn_source() -> str:
    return "/etc/hosts" if fqdn() != os.uname().nodename else "the host name"


def smtp_name(ehlo_name: str = "", domain: str = "") -> str:
    """The name this relayq gives itself in SMTP: its EHLO to the smarthost, and its
    listener's greeting and EHLO reply. One function for both, so a relay greeting
    with it is known to be ourselves (a mail loop, as sendmail's "mail loops back
    to me"): `ehlo_name`, else the FQDN, else the mail domain; DNS (getfqdn) only
    as a last resort, since it can stall."""
    return smtp_name_from(ehlo_name, domain)[0]


def smtp_name_from(ehlo_name: str = "", domain: str = "") -> tuple[str, str]:
    """smtp_name and where it came from ("ehlo_name", "/etc/hosts", "domain"...),
    for relayq check-config to say it."""
    if ehlo_name:
        return ehlo_name, "ehlo_name"
    name, source = fqdn(), _fqdn_source()
    if "." not in name:
        name, source = mail_domain_from(domain)
    if "." not in name:
        import socket

        name, source = socket.getfqdn(), "DNS (getfqdn)"
    return name, source


def mail_domain(configured: str = "") -> str:
    return mail_domain_from(configured)[0]


def mail_domain_from(configured: str = "") -> tuple[str, str]:
    """mail_domain and where it came from ("domain", "/etc/mailname", "/etc/hosts",
    "the host name"), for relayq check-config to say it."""
    if configured:
        return configured, "domain"
    name = _from_file("/etc/mailname")
    return (name, "/etc/mailname") if name else (fqdn(), _fqdn_source())


def host_names() -> frozenset[str]:
    """This host's own names (not the mail domain, often the whole organisation's)."""
    node = os.uname().nodename
    names = {node, node.split(".", 1)[0], fqdn(), "localhost", "localhost.localdomain"}
    return frozenset(n.lower() for n in names if n)


def local_domains(domain: str) -> frozenset[str]:
    return host_names() | ({domain.lower()} if domain else set())
