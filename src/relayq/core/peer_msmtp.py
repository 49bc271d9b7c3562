"""msmtp's msmtprc (/etc/msmtprc, ~/.msmtprc): the default account, or the first."""

from __future__ import annotations

from relayq.core.peers import Imported, Origin, auth_mechanism, auth_note, host_port, lines
from relayq.core.rewrite import valid_target

KIND = "msmtp"
NAMES = ("msmtprc", ".msmtprc")
_ON = ("on", "yes", "true", "")
_SAME_NAME = {"user": "user", "password": "password", "passwordeval": "password_command",
              "tls_trust_file": "ca_file", "tls_cert_file": "client_cert",
              "tls_key_file": "client_key", "domain": "ehlo_name", "logfile": "log_file"}
_NOTES = {
    "aliases": "relayq forwards local recipients to one address (local_forward), not "
               "through a map: set it to that file's root or default: address",
    "set_from_header": "relayq keeps the From: header a program writes",
    "tls_fingerprint": "relayq checks the certificate against a CA (ca_file), not a "
                       "fingerprint",
    "auto_from": "relayq qualifies senders with domain",
    "maildomain": "relayq qualifies senders with domain",
}


def sniff(text: str) -> bool:
    return any(b.split()[0] in ("account", "defaults") for _, b in lines("", text))


Items = list[tuple[Origin, str, str]]


def _accounts(path: str, text: str) -> tuple[dict[str, Items], dict[str, Origin],
                                             dict[str, set[str]]]:
    """Each account's settings (defaults and `: parent` inherited, in order), where
    each account starts, and each account's parents (`account default : work`)."""
    accounts: dict[str, Items] = {}
    starts: dict[str, Origin] = {}
    lineage: dict[str, set[str]] = {}  # an account's parents, theirs included
    defaults: Items = []
    current: Items = defaults
    for origin, body in lines(path, text):
        key, _, value = body.partition(" ")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]  # msmtp's quoting
        if key == "defaults":
            current = defaults
        elif key == "account":
            name, _, parents = (v.strip() for v in value.partition(":"))
            current = accounts.setdefault(name, list(defaults))
            starts[name] = origin
            for parent in (p.strip() for p in parents.split(",") if p.strip()):
                current += accounts.get(parent, [])
                lineage.setdefault(name, set()).update({parent, *lineage.get(parent, ())})
        else:
            current.append((origin, key, value))
    return accounts, starts, lineage


def _apply(r: Imported, items: Items) -> None:
    got = {key: (origin, value) for origin, key, value in items}  # the last one wins
    if "host" in got:
        origin, host = got["host"]
        r.set("smarthost", host_port(host, got.get("port", (None, ""))[1]), origin)
    tls = got.get("tls", (None, "off"))[1].lower() in _ON
    starttls = got.get("tls_starttls", (None, "on"))[1].lower() in _ON
    if "tls" in got:
        r.set("tls", ("required" if starttls else "implicit") if tls else "none",
              got["tls"][0])
    if got.get("tls_certcheck", (None, "on"))[1].lower() not in _ON:
        r.set("tls_verify", False, got["tls_certcheck"][0])
    if "auth" in got:
        origin, auth = got["auth"]
        if auth_mechanism(auth):
            r.set("auth_mechanism", auth_mechanism(auth), origin)
        elif auth.lower() not in ("on", "off", ""):
            r.note(origin, auth_note(auth))
    if got.get("syslog", (None, "off"))[1].lower() not in ("off", "no", "false"):
        r.set("syslog", True, got["syslog"][0])
    if "timeout" in got and got["timeout"][1].isdigit():
        r.set("timeout", int(got["timeout"][1]), got["timeout"][0])
    for key, (origin, value) in got.items():
        if key == "from":
            _from(r, origin, value)
        elif key in _SAME_NAME:
            r.set(_SAME_NAME[key], value, origin)
        elif key in _NOTES:
            r.note(origin, _NOTES[key])
        elif key not in ("host", "port", "tls", "tls_starttls", "tls_certcheck", "auth",
                         "syslog", "timeout"):
            r.note(origin, "not an msmtp setting relayq knows")


def _from(r: Imported, origin: Origin, value: str) -> None:
    """msmtp's `from` is the envelope-from: a fixed one is all_mail_from; one with
    %U (user), %H (host), %C (canonical host), %M (mail domain) varies per user."""
    if "%" in value:
        r.note(origin, "relayq's all_mail_from is one fixed address; msmtp fills in "
                       "%U/%H/%C/%M per message: set domain (or masquerade_as) instead")
    elif not valid_target(value):
        r.note(origin, "not a full address (user@domain)")
    else:
        r.set("all_mail_from", value, origin,
              "msmtp takes the sender given with -f (sendmail -f) over `from`; relayq's "
              "all_mail_from replaces it too. The From: header a program writes is kept")


def convert(files: list[tuple[str, str]]) -> Imported:
    r = Imported(KIND)
    for path, text in files:
        accounts, starts, lineage = _accounts(path, text)
        if not accounts:
            continue
        name = "default" if "default" in accounts else next(iter(accounts))
        _apply(r, accounts[name])
        for other in accounts:
            if other != name and other not in lineage.get(name, ()):
                r.note(starts[other], f"relayq relays through one account (here {name!r}); "
                                      "accounts per sender come later")
    return r
