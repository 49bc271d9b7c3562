"""sSMTP's /etc/ssmtp/ssmtp.conf and revaliases (ssmtp.conf(5))."""

from __future__ import annotations

import os

from relayq.core.peers import Imported, Origin, lines, yes

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
        r.note(origin, "relayq has no forward address for local recipients yet: with "
                       "local_delivery = true, an /etc/aliases line (root: ADDRESS) does it")
    elif k == "authmethod":
        if value.lower() == "login":
            r.set("auth_mechanism", "LOGIN", origin)
        else:
            r.note(origin, f"relayq does not offer AUTH {value} (PLAIN, LOGIN or XOAUTH2)")
    elif k == "tls_ca_dir":
        r.note(origin, "relayq takes a CA bundle file (ca_file), not a directory")
    elif k == "debug":
        r.note(origin, "relayq's -v shows the SMTP dialogue; there is no debug setting")
    else:
        r.note(origin, "not an ssmtp setting relayq knows")


def convert(files: list[tuple[str, str]]) -> Imported:
    r = Imported(KIND)
    tls: dict[str, Origin] = {}
    for path, text in files:
        revaliases = os.path.basename(path) == "revaliases" or not sniff(text)
        for origin, body in lines(path, text):
            if revaliases:
                r.note(origin, "relayq cannot yet map a local user to another sender address")
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
    return r
