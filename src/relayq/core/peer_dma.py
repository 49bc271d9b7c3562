"""dma's /etc/dma/dma.conf and auth.conf (dma(8))."""

from __future__ import annotations

import os

from relayq.core.peers import (
    Credential,
    Imported,
    Origin,
    credentials,
    host_port,
    lines,
    smarthost_of,
)

KIND = "dma"
NAMES = ("dma.conf", "auth.conf")
_WORDS = ("SMARTHOST", "PORT", "AUTHPATH", "SECURETRANSFER", "STARTTLS", "OPPORTUNISTIC_TLS",
          "CERTFILE", "MASQUERADE", "NULLCLIENT", "MAILNAME", "SPOOLDIR", "ALIASES", "DEFER",
          "FULLBOUNCE", "INSECURE", "FINGERPRINT")
_NOTES = {
    "SPOOLDIR": "relayq keeps its own queue (queue_dir); deliver dma's queue before switching",
    "FULLBOUNCE": "relayq's bounces carry the returned message's headers (RFC 3464)",
    "INSECURE": "relayq never sends a password without TLS",
    "FINGERPRINT": "relayq checks the certificate against a CA (ca_file), not a fingerprint",
}


def sniff(text: str) -> bool:
    return any(b.split()[0] in ("SMARTHOST", "SECURETRANSFER", "NULLCLIENT")
               for _, b in lines("", text))


def _auth(r: Imported, path: str, text: str) -> None:
    """auth.conf: `user|smarthost:password`; the line for the smarthost, else the first."""
    entries: list[Credential] = []
    for origin, body in lines(path, text):
        who, sep, secret = body.partition(":")
        user, bar, server = who.partition("|")
        if not (sep and bar):
            r.note(Origin(path, origin.line, ""), "not user|smarthost:password")
            continue
        entries.append((server, user, secret, Origin(path, origin.line, "")))
    credentials(r, entries, (smarthost_of(r).split(":")[0],))


def _word(r: Imported, origin: Origin, word: str, value: str, seen: dict[str, str]) -> None:
    if word in ("SMARTHOST", "PORT", "SECURETRANSFER", "STARTTLS", "OPPORTUNISTIC_TLS",
                "AUTHPATH"):
        seen[word] = value
    elif word == "CERTFILE":
        r.set("client_cert", value, origin)
    elif word == "MASQUERADE":
        _masquerade(r, origin, value)
    elif word == "MAILNAME":
        if value == "/etc/mailname":
            r.already(origin, "relayq reads /etc/mailname itself")
        elif value.startswith("/"):
            r.note(origin, "give the name that file holds as domain")
        else:
            r.set("domain", value, origin)
    elif word == "DEFER":
        r.set("delivery_mode", "deferred", origin)
    elif word == "ALIASES":
        r.set("aliases_file", value, origin)
    elif word == "NULLCLIENT":
        r.already(origin, "relayq relays everything unless local_delivery = true")
    elif word in _NOTES:
        r.note(origin, _NOTES[word])
    else:
        r.note(origin, "not a dma setting relayq knows")


def _masquerade(r: Imported, origin: Origin, value: str) -> None:
    """dma(8) MASQUERADE sets the envelope-from (over -f): `user@domain` every
    message's, `domain` user@domain, `user@` user@this-host."""
    user, at, domain = value.rpartition("@")
    if not at:
        r.set("masquerade_as", value, origin,
              "dma rewrites the envelope sender only; relayq the From: header too")
    elif not domain:
        r.note(origin, f"relayq needs the whole address: all_mail_from = \"{user}@THIS-HOST\"")
    elif user:
        r.set("all_mail_from", value, origin, "the null sender <> of a bounce stays <>")
    else:
        r.set("masquerade_as", domain, origin,
              "dma rewrites the envelope sender only; relayq the From: header too")


def convert(files: list[tuple[str, str]]) -> Imported:
    r = Imported(KIND)
    seen: dict[str, str] = {}
    origins: dict[str, Origin] = {}
    auth = [(p, t) for p, t in files if os.path.basename(p) == "auth.conf" or not sniff(t)]
    for path, text in files:
        if (path, text) in auth:
            continue
        for origin, body in lines(path, text):
            word, _, value = body.partition(" ")
            origins[word] = origin
            _word(r, origin, word, value.strip(), seen)
    port = seen.get("PORT")
    if port is not None and not port.isdigit():
        r.note(origins["PORT"], "not a port number")
        port = None
    if "SMARTHOST" in seen:
        r.set("smarthost", host_port(seen["SMARTHOST"], port), origins["SMARTHOST"])
    elif port:
        r.set("port", int(port), origins["PORT"])
    if "SECURETRANSFER" in seen:
        mode = "implicit"
        if "STARTTLS" in seen:
            mode = "opportunistic" if "OPPORTUNISTIC_TLS" in seen else "required"
        r.set("tls", mode, origins["STARTTLS" if "STARTTLS" in seen else "SECURETRANSFER"])
    for path, text in auth:
        _auth(r, path, text)
    if "AUTHPATH" in seen and not auth:
        r.note(origins["AUTHPATH"], f"the credentials are in {seen['AUTHPATH']}: give that "
                                    "file to relayq import too")
    return r
