"""A Postfix null client's /etc/postfix/main.cf, with its sasl_passwd (postconf(5))."""

from __future__ import annotations

import os
import re

from relayq.core.peers import Credential, Imported, Origin, credentials, lines, smarthost_of

KIND = "postfix"
NAMES = ("main.cf", "sasl_passwd")
_LEVELS = {"none": "none", "may": "opportunistic", "encrypt": "required", "dane": "required",
           "dane-only": "required", "fingerprint": "required", "verify": "required",
           "secure": "required"}
_SECONDS = {"maximal_queue_lifetime": "max_queue_age", "delay_warning_time": "delay_warning",
            "minimal_backoff_time": "retry_min", "maximal_backoff_time": "retry_max"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# what only a server or a full MTA needs: nothing to carry over to a null client
_SERVER = re.compile(r"(smtpd_|virtual_|lmtp_|milter|content_filter|header_checks|"
                     r"body_checks|local_recipient_maps|home_mailbox|mailbox_|alias_|"
                     r"biff$|readme_directory$|compatibility_level$|append_dot_mydomain$|"
                     r"recipient_delimiter$|mynetworks|inet_protocols$|myhostname$|"
                     r"mydestination$|relay_domains$|local_transport$|mydomain$)")
_NOTES = {
    "sender_dependent_relayhost_maps": "relayq relays through one smarthost account; "
                                       "accounts per sender come later",
    "smtp_sasl_security_options": "relayq never sends a password without TLS",
}


def sniff(text: str) -> bool:
    return any(b.split("=")[0].strip() in ("relayhost", "myorigin", "inet_interfaces")
               for _, b in lines("", text) if "=" in b)


def _params(path: str, text: str) -> dict[str, tuple[Origin, str]]:
    """name -> (origin, value): continuation lines (leading space) joined."""
    out: dict[str, tuple[Origin, str]] = {}
    last = ""
    for origin, body in lines(path, text):
        raw = origin.text
        if raw[:1].isspace() and last:
            first, value = out[last]
            out[last] = (first, f"{value} {body}")
            continue
        name, sep, value = body.partition("=")
        if sep:
            last = name.strip()
            out[last] = (origin, value.strip())
    return out


def _expand(value: str, params: dict[str, tuple[Origin, str]], depth: int = 0) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return _expand(params[name][1], params, depth + 1) if name in params and depth < 5 \
            else m.group(0)
    return re.sub(r"\$\{?(\w+)\}?|\$\((\w+)\)", one, value)


def _seconds(value: str) -> int | None:
    m = re.fullmatch(r"(\d+)([smhdw]?)", value.strip())
    return int(m.group(1)) * _UNITS.get(m.group(2) or "d", 1) if m else None


def _sasl(r: Imported, path: str, text: str) -> None:
    """sasl_passwd: `[host]:port user:password`; the relayhost's line, else the first."""
    entries: list[Credential] = []
    for origin, body in lines(path, text):
        words = body.split()
        if len(words) != 2 or ":" not in words[1]:
            r.note(Origin(path, origin.line, ""), "not `[host]:port user:password`")
            continue
        user, _, secret = words[1].partition(":")
        entries.append((words[0], user, secret, Origin(path, origin.line, "")))
    credentials(r, entries, (smarthost_of(r),))


def _param(r: Imported, name: str, origin: Origin, value: str, sasl_given: bool) -> None:
    if _SERVER.match(name) or name in ("smtp_sasl_auth_enable", "smtp_tls_loglevel",
                                       "smtp_tls_session_cache_database"):
        r.already(origin, "nothing to set for a null client")
    elif "$" in value:
        r.note(origin, "names a parameter this file does not set")
    elif name == "relayhost":
        hosts = value.replace(",", " ").split()
        if hosts:
            r.set("smarthost", hosts if len(hosts) > 1 else hosts[0], origin)
    elif name == "myorigin":
        if value.startswith("/"):
            if value != "/etc/mailname":
                r.note(origin, "give the name that file holds as domain")
            else:
                r.already(origin, "relayq reads /etc/mailname itself")
        else:
            r.set("domain", value, origin)
    elif name == "inet_interfaces":
        if value in ("loopback-only", "localhost", "127.0.0.1"):
            r.already(origin, "relayq's listener takes loopback clients only")
        else:
            r.note(origin, "relayq's listener is for local programs: listen and "
                           "listen_nonloopback say where")
    elif name == "smtp_tls_security_level":
        if value in _LEVELS:
            r.set("tls", _LEVELS[value], origin)
    elif name == "smtp_tls_wrappermode" and value == "yes":
        r.set("tls", "implicit", origin)
    elif name == "smtp_tls_CAfile":
        r.set("ca_file", value, origin)
    elif name in ("smtp_tls_cert_file", "smtp_tls_key_file"):
        r.set("client_cert" if name.endswith("cert_file") else "client_key", value, origin)
    elif name in _SECONDS:
        seconds = _seconds(value)
        if seconds is not None:
            r.set(_SECONDS[name], seconds, origin)
    elif name in ("smtp_generic_maps", "sender_canonical_maps"):
        _generic_maps(r, name, origin, value)
    elif name in _NOTES:
        r.note(origin, _NOTES[name])
    elif name == "smtp_sasl_password_maps":
        if sasl_given:
            r.already(origin, "read from the map's source file given with it")
        else:
            r.note(origin, "give that map's source file (e.g. /etc/postfix/sasl_passwd) to "
                           "relayq import too")
    else:
        r.note(origin, "not a Postfix setting relayq knows")


# tables whose source is a text file of "key value" lines (postmap(1)); others are not
_TEXT_TABLES = ("hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash")
_GENERIC = {  # generic(5) and canonical(5): what relayq's generics do not do
    "smtp_generic_maps": "Postfix rewrites recipients too (envelope and headers); relayq's "
                         "generics rewrite senders only",
    "sender_canonical_maps": "Postfix rewrites every sender as mail arrives; relayq only "
                             "a local one (no domain or one of local_domains)",
}


def _generic_maps(r: Imported, name: str, origin: Origin, value: str) -> None:
    """smtp_generic_maps / sender_canonical_maps = hash:/etc/postfix/generic: the
    map's source file, relayq's generics format; one map only."""
    tables = [t for t in re.split(r"[\s,]+", value) if t]
    for i, table in enumerate(tables):
        kind, _, path = table.partition(":")
        if i:
            r.note(origin, f"{table}: relayq reads one generics file; only the first is used")
        elif kind not in _TEXT_TABLES or not path.startswith("/"):
            r.note(origin, f"relayq reads a generics file of 'key address' lines, not a {kind} "
                           "table: write its entries as such a file and set generics_file")
        else:
            r.set("generics_file", path, origin,
                  "keys at another domain than this host's (local_domains) never match; "
                  "relayq does not strip a +extension before the lookup")
            if r.get("generics_file") == path:  # not a second map (that is a note)
                r.set("generics_apply", "both", origin)
                r.note(origin, _GENERIC[name])


def convert(files: list[tuple[str, str]]) -> Imported:
    r = Imported(KIND)
    sasl = [(p, t) for p, t in files if os.path.basename(p).startswith("sasl_passwd")
            or not sniff(t)]
    for path, text in files:
        if (path, text) in sasl:
            continue
        params = _params(path, text)
        for name, (origin, value) in params.items():
            _param(r, name, origin, _expand(value, params), bool(sasl))
    for path, text in sasl:
        _sasl(r, path, text)
    return r
