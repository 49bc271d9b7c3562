"""Debian's exim4 as a smarthost client: update-exim4.conf.conf, passwd.client and
/etc/email-addresses (the senders Debian's exim4 rewrites)."""

from __future__ import annotations

import os

from relayq.core.peers import Credential, Imported, Origin, credentials, lines, smarthost_of
from relayq.core.rewrite import valid_target

KIND = "exim4"
NAMES = ("update-exim4.conf.conf", "passwd.client", "email-addresses")
_SAME = {
    "dc_local_interfaces": "relayq's listener takes loopback clients only",
    "dc_use_split_config": "nothing to set",
    "dc_minimaldns": "nothing to set",
    "dc_mailname_in_oh": "nothing to set",
    "dc_relay_nets": "relayq relays for local clients only",
    "dc_relay_domains": "relayq relays for local clients only",
    "dc_other_hostnames": "local_domains says which domains are this host's",
    "ce_package_version": "nothing to set",
    "CFILEMODE": "nothing to set (the mode of exim's generated file)",
}


def sniff(text: str) -> bool:
    return any(b.startswith(("dc_eximconfig_configtype", "dc_smarthost"))
               for _, b in lines("", text))


def _hosts(value: str) -> list[str]:
    """exim's list: hosts separated by `:`, a port after `::` (host::587)."""
    out = []
    for item in value.replace("::", "\0").split(":"):
        host, _, port = item.strip().partition("\0")
        if host:
            out.append(f"{host}:{port.strip()}" if port.strip() else host)
    return out


def _value(r: Imported, origin: Origin, key: str, value: str) -> None:
    if key == "dc_eximconfig_configtype":
        if value == "smarthost":
            r.note(origin, "exim delivered this host's own mail locally; relayq relays it "
                           "unless local_delivery = true")
        elif value == "satellite":
            r.already(origin, "relayq is a satellite: everything goes to the smarthost")
        else:
            r.note(origin, f"relayq is a null client, not an exim {value!r} configuration")
    elif key == "dc_smarthost":
        hosts = _hosts(value)
        if hosts:
            r.set("smarthost", hosts if len(hosts) > 1 else hosts[0], origin)
    elif key == "dc_readhost":
        if value:
            r.set("masquerade_as", value, origin)
    elif key == "dc_hide_mailname":
        r.already(origin, "masquerade_as rewrites headers and envelope")
    elif key == "dc_localdelivery":
        r.already(origin, "only with local_delivery = true (mailbox_format = mbox or maildir)")
    elif key in _SAME:
        r.already(origin, _SAME[key])
    else:
        r.note(origin, "not an exim4 setting relayq knows")


def _passwd(r: Imported, path: str, text: str) -> None:
    """passwd.client: `host:user:password`; the smarthost's line, a `*` line, or the first."""
    entries: list[Credential] = []
    for origin, body in lines(path, text):
        parts = body.split(":", 2)
        if len(parts) != 3:
            r.note(Origin(path, origin.line, ""), "not host:user:password")
            continue
        entries.append((parts[0].strip(), parts[1].strip(), parts[2].strip(),
                        Origin(path, origin.line, "")))
    credentials(r, entries, (smarthost_of(r).split(":")[0], "*"))


def _email_addresses(r: Imported, path: str, text: str) -> None:
    """`user: address` lines: Debian's exim4 rewrites a local sender found there in
    the envelope and in From:, Reply-To: and Sender: (its rewrite rule's Ffrs)."""
    for origin, body in lines(path, text):
        user, sep, addr = (w.strip() for w in body.partition(":"))
        if not sep or not user or any(c.isspace() for c in user) or not valid_target(addr):
            r.note(origin, "not user: full-address")
            continue
        r.generics.append((origin, f"{user} {addr}"))
    if r.generics:
        r.set("generics_apply", "both", r.generics[0][0],
              "exim also rewrites Reply-To:; relayq From:, Sender: and the Resent- ones")


def convert(files: list[tuple[str, str]]) -> Imported:
    r = Imported(KIND)
    maps = [(p, t) for p, t in files if os.path.basename(p) == "email-addresses"]
    secrets = [(p, t) for p, t in files if os.path.basename(p) == "passwd.client"
               or (not sniff(t) and (p, t) not in maps)]
    for path, text in files:
        if (path, text) in secrets or (path, text) in maps:
            continue
        for origin, body in lines(path, text):
            key, sep, value = body.partition("=")
            if not sep:
                r.note(origin, "not key='value'")
                continue
            _value(r, origin, key.strip(), value.strip().strip("'\""))
    for path, text in secrets:
        _passwd(r, path, text)
    for path, text in maps:
        _email_addresses(r, path, text)
    return r
