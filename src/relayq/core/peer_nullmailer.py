"""nullmailer's /etc/nullmailer (one file per setting; nullmailer-send(8), remotes)."""

from __future__ import annotations

import os

from relayq.core.peers import Imported, Origin, host_port, lines
from relayq.core.rewrite import valid_target

KIND = "nullmailer"
NAMES = ("remotes", "me", "defaultdomain", "defaulthost", "helohost", "idhost", "adminaddr",
         "allmailfrom", "queuelifetime", "sendtimeout", "pausetime", "maxpause")
_SECONDS = {"queuelifetime": "max_queue_age", "sendtimeout": "timeout",
            "pausetime": "retry_min", "maxpause": "retry_max"}
# nullmailer-queue(8): adminaddr remaps recipients at "localhost" and at the canonical
# host name (`me` upstream, /etc/mailname in Debian's build); a comma list is allowed
_ADMIN = ("nullmailer remaps recipients at localhost and at `me` (or /etc/mailname on "
          "Debian); relayq forwards names typed bare, localhost and this host's own names "
          "(its node name and FQDN; local_domains chooses others)")
_ALLFROM = "the null sender <> of a bounce stays <> (nullmailer replaces every sender)"
_NOT_YET = {
    "defaultdomain": "relayq does not append a domain to host names without a dot",
    "idhost": "relayq's Message-IDs use domain",
}


def sniff(text: str) -> bool:
    """A remotes file: lines of `host smtp|qmqp [--option...]`."""
    body = [b for _, b in lines("", text)]
    return bool(body) and all(len(b.split()) >= 2 and b.split()[1] in ("smtp", "qmqp")
                              for b in body)


def _remote(r: Imported, origin: Origin, words: list[str], first: bool) -> None:
    host, protocol, opts = words[0], words[1] if len(words) > 1 else "smtp", words[2:]
    if protocol != "smtp":
        r.note(origin, f"relayq speaks SMTP only, not {protocol}: this remote is left out")
        return
    port = ""
    for opt in opts:
        name, _, value = opt.lstrip("-").partition("=")
        if name == "port":
            port = value
        elif not first and name in ("user", "pass", "ssl", "starttls", "auth-login",
                                    "insecure", "x509cafile", "x509certfile"):
            r.note(origin, f"--{name}: relayq has one set of credentials and TLS settings "
                           "for all smarthosts; the first remote's are used")
        elif name == "user":
            r.set("user", value, origin)
        elif name == "pass":
            r.set("password", value, origin)
        elif name == "ssl":
            r.set("tls", "implicit", origin)
        elif name == "starttls":
            r.set("tls", "required", origin)
        elif name == "auth-login":
            r.set("auth_mechanism", "LOGIN", origin)
        elif name == "insecure":
            r.set("tls_verify", False, origin)
        elif name == "x509cafile":
            r.set("ca_file", value, origin)
        elif name == "x509certfile":
            r.set("client_cert", value, origin)
        else:
            r.note(origin, f"--{name}: not a relayq setting")
    hosts = r.get("smarthost")
    entry = host_port(host, port)
    if isinstance(hosts, list):
        hosts.append(entry)
    else:
        r.set("smarthost", [entry], origin)


def _address(r: Imported, origin: Origin, name: str, value: str) -> None:
    """adminaddr -> local_forward, allmailfrom -> all_mail_from: one full address."""
    addrs = [a.strip() for a in value.split(",") if a.strip()]
    if len(addrs) != 1 or not valid_target(addrs[0]):
        r.note(origin, "relayq takes one full address (user@domain) here"
                       + (": forward to a list at the smarthost" if len(addrs) > 1 else ""))
    elif name == "adminaddr":
        r.set("local_forward", addrs[0], origin, _ADMIN)
    else:
        r.set("all_mail_from", addrs[0], origin, _ALLFROM)


def convert(files: list[tuple[str, str]]) -> Imported:
    r = Imported(KIND)
    by_name = {os.path.basename(p): (p, t) for p, t in files}
    for name in sorted(by_name, key=lambda n: (n != "remotes", n)):
        path, text = by_name[name]
        body = lines(path, text)
        if name == "remotes" or (name not in NAMES and sniff(text)):
            for i, (origin, line) in enumerate(body):
                _remote(r, origin, line.split(), first=i == 0)
            continue
        if not body:
            continue
        origin, value = body[0]
        if name in ("me", "defaulthost"):
            if name == "defaulthost" or "defaulthost" not in by_name:
                r.set("domain", value, origin)  # what unqualified addresses get
            if name == "me" and "helohost" not in by_name:
                r.set("ehlo_name", value, origin)
        elif name == "helohost":
            r.set("ehlo_name", value, origin)
        elif name in _SECONDS:
            if value.isdigit():
                r.set(_SECONDS[name], int(value), origin)
            else:
                r.note(origin, "not a number of seconds")
        elif name in ("adminaddr", "allmailfrom"):
            _address(r, origin, name, value)
        elif name in _NOT_YET:
            r.note(origin, _NOT_YET[name])
        else:
            r.note(origin, "not a nullmailer file relayq knows")
    if r.get("password") is not None and r.get("tls") is None:
        r.note(Origin(KIND, 0, ""), "nullmailer sent the password without TLS unless told; "
                                    "relayq requires TLS with a password (tls = required)")
    return r
