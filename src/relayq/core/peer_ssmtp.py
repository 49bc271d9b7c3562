"""sSMTP's /etc/ssmtp/ssmtp.conf and revaliases (ssmtp.conf(5))."""

from __future__ import annotations

import os

from relayq.core.peers import Imported, Origin, auth_note, lines, yes
from relayq.core.rewrite import valid_target

KIND = "ssmtp"
NAMES = ("ssmtp.conf", "revaliases")
_PLAIN = {"authuser": "user", "authpass": "password", "tls_ca_file": "ca_file",
          "tlscert": "client_cert", "tlskey": "client_key", "rewritedomain": "masquerade_as",
          "hostname": "domain"}


def sniff(text: str) -> bool:
    return any(b.lower().startswith("mailhub") for _, b in lines("", text))


def _setting(r: Imported, origin: Origin, key: str, value: str,
             tls: dict[str, Origin]) -> None:
    k = key.lower()
    if k == "mailhub":
        r.set("smarthost", value, origin)
    elif k in _PLAIN:
        r.set(_PLAIN[k], value, origin)
    elif k in ("usestarttls", "usetls"):
        if yes(value):
            tls[k] = origin
    elif k == "fromlineoverride":
        if yes(value):
            r.already(origin, "relayq keeps the From: header a program writes")
        else:
            r.note(origin, "relayq keeps the From: header a program writes "
                           "(as FromLineOverride=YES); it does not rewrite it")
    elif k == "root":
        if not value:
            r.already(origin, "empty: local recipients are not forwarded")
        elif not valid_target(value):
            r.note(origin, "relayq forwards to a full address (user@domain) only")
        else:  # ssmtp: "the person who gets all mail for userids < 1000"
            r.set("local_forward", value, origin,
                  "ssmtp forwards only recipients written without a domain; relayq also "
                  "those at this host's names (local_domains)")
            r.set("local_forward_users", "system", origin)
    elif k == "authmethod":
        if value.lower() == "login":
            r.set("auth_mechanism", "LOGIN", origin)
        else:
            r.note(origin, auth_note(value))
    elif k == "tls_ca_dir":
        r.note(origin, "relayq takes a CA bundle file (ca_file), not a directory")
    elif k == "debug":
        r.note(origin, "relayq's -v shows the SMTP dialogue; there is no debug setting")
    else:
        r.note(origin, "not an ssmtp setting relayq knows")


def _revalias(r: Imported, origin: Origin, body: str, hubs: list[tuple[Origin, str]]) -> None:
    """`local account:outgoing address[:mailhub[:port]]`: a generics line; the
    mailhub is checked against ssmtp.conf's once both are read."""
    user, _, rest = body.partition(":")
    addr, _, hub = rest.partition(":")
    user, addr = user.strip(), addr.strip()
    if not user or not valid_target(addr) or any(c.isspace() for c in user):
        r.note(origin, "not local-account:full-address[:mailhub]")
        return
    r.generics.append((origin, f"{user} {addr}"))
    if hub.strip():
        hubs.append((origin, hub.strip()))


def convert(files: list[tuple[str, str]]) -> Imported:
    r = Imported(KIND)
    tls: dict[str, Origin] = {}
    hubs: list[tuple[Origin, str]] = []
    for path, text in files:
        revaliases = os.path.basename(path) == "revaliases" or not sniff(text)
        for origin, body in lines(path, text):
            if revaliases:
                _revalias(r, origin, body, hubs)
                continue
            key, sep, value = body.partition("=")
            if not sep:
                r.note(origin, "not key=value")
                continue
            _setting(r, origin, key.strip(), value.strip(), tls)
    # UseSTARTTLS: TLS after EHLO (ssmtp needs UseTLS too); UseTLS alone: TLS from the start
    if "usestarttls" in tls:
        r.set("tls", "required", tls["usestarttls"])
    elif "usetls" in tls:
        r.set("tls", "implicit", tls["usetls"])
    _generics(r, hubs)
    return r


def _generics(r: Imported, hubs: list[tuple[Origin, str]]) -> None:
    """revaliases sets the envelope sender and the From: ssmtp writes; with
    FromLineOverride=YES a program's From: is kept: the envelope only."""
    for origin, hub in hubs:
        if hub != r.get("smarthost"):
            r.note(origin, f"relayq relays through one smarthost: this user's mailhub {hub} "
                           "is not used (the address is)")
    if r.generics:
        keeps = any("fromlineoverride" in n.origin.text.lower() for n in r.same)
        r.set("generics_apply", "envelope" if keeps else "both", r.generics[0][0])
