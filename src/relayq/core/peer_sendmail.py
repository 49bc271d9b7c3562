"""Sendmail's m4 (.mc: submit.mc, sendmail.mc) and built .cf files, and authinfo.

The seed's client setup is `FEATURE(`msp', `[mail.example.org]')dnl` with
`define(`confDELIVERY_MODE', `deferred')dnl` and masquerading; what it means is
in cf/README (FEATURE(msp), SMART_HOST, MASQUERADE_AS and the conf* options).
"""

from __future__ import annotations

import os
import re

from relayq.core.peers import (
    Credential,
    Imported,
    Origin,
    credentials,
    host_port,
    lines,
    smarthost_of,
)

KIND = "sendmail"
NAMES = ("submit.mc", "sendmail.mc", "submit.cf", "sendmail.cf", "authinfo")
_MODES = {"b": "background", "i": "interactive", "q": "queue", "d": "deferred"}
_CALL = re.compile(r"\b([A-Z][A-Z_]*|define|undefine|include|divert)\(")
_NOTES = {
    "allmasquerade": "relayq masquerades and maps (genericstable) senders only, "
                     "not recipients",
    "GENERICS_DOMAIN": "relayq looks up senders at this host's names (local_domains) in "
                       "generics_file: add this domain to local_domains if it is not one",
    "GENERICS_DOMAIN_FILE": "relayq looks up senders at local_domains in generics_file: "
                            "list that file's domains there",
    "generics_entire_domain": "relayq looks up senders at the domains in local_domains, "
                              "not at their subdomains",
    "MASQUERADE_DOMAIN": "relayq masquerades this host's own names only",
    "EXPOSED_USER": "relayq masquerades every local sender",
    "LOCAL_DOMAIN": "local_domains says which domains are this host's",
}
_SAME = {
    "masquerade_envelope": "masquerade_as rewrites the envelope sender too",
    "DAEMON_OPTIONS": "relayq's listener takes loopback clients only",
    "OSTYPE": "nothing to set", "DOMAIN": "nothing to set", "VERSIONID": "nothing to set",
    "MAILER": "nothing to set", "divert": "nothing to set", "include": "nothing to set",
    "use_ct_file": "nothing to set", "nocanonify": "relayq does not canonify with DNS",
    "confCF_VERSION": "nothing to set", "confTIME_ZONE": "nothing to set",
    "confDONT_INIT_GROUPS": "nothing to set", "confPID_FILE": "nothing to set",
}


def sniff(text: str) -> bool:
    return bool(re.search(r"\b(FEATURE|SMART_HOST|MASQUERADE_AS|OSTYPE)\(", text)) or \
        bool(re.search(r"(?m)^(DS|DM|O DeliveryMode)", text))


def _args(text: str, start: int) -> tuple[list[str], int]:
    """The comma-separated arguments from `start` (after the open parenthesis) to the
    matching close one, m4 quotes (`...') nesting; returns them and the end."""
    args, cur, depth, quote, i = [], "", 0, 0, start
    while i < len(text):
        c = text[i]
        if c == "`":
            quote += 1
            if quote == 1:
                i += 1
                continue
        elif c == "'" and quote:
            quote -= 1
            if quote == 0:
                i += 1
                continue
        elif not quote and c == "(":
            depth += 1
        elif not quote and c == ")":
            if depth == 0:
                args.append(cur.strip())
                return args, i + 1
            depth -= 1
        elif not quote and c == "," and depth == 0:
            args.append(cur.strip())
            cur, i = "", i + 1
            continue
        cur += c
        i += 1
    return [*args, cur.strip()], i


def _uncomment(line: str) -> str:
    """The line without its `dnl` remainder and an m4 `#` comment (one not in quotes)."""
    line = re.sub(r"\bdnl\b.*$", "", line)
    hash_at = line.find("#")
    return line[:hash_at] if hash_at >= 0 and "`" not in line[:hash_at] else line


def _calls(path: str, text: str) -> list[tuple[Origin, str, list[str]]]:
    """Each top-level macro call with its origin; `dnl` comments dropped."""
    kept = "\n".join(_uncomment(line) for line in text.splitlines())
    out = []
    raw_lines = text.splitlines()
    pos = 0
    while (m := _CALL.search(kept, pos)) is not None:
        args, pos = _args(kept, m.end())
        n = kept.count("\n", 0, m.start())
        out.append((Origin(path, n + 1, raw_lines[n] if n < len(raw_lines) else ""),
                    m.group(1), args))
    return out


def _smarthost(spec: str, port: str = "") -> str:
    spec = spec.split(":", 1)[1] if re.match(r"^(relay|smtp|esmtp|smtp8|dsmtp):", spec) else spec
    return host_port(spec, port) if port else spec


def _macro(r: Imported, origin: Origin, name: str, args: list[str]) -> None:
    first = args[0] if args else ""
    what = first if name in ("FEATURE", "define") else name  # the name _NOTES/_SAME know
    if name == "FEATURE" and first == "msp":
        if len(args) > 1 and args[1]:
            r.set("smarthost", _smarthost(args[1], args[2] if len(args) > 2 else ""), origin)
        else:
            r.note(origin, "msp without a host relays to this host's own MTA, which relayq "
                           "replaces: set smarthost to your relay")
    elif name == "SMART_HOST":
        r.set("smarthost", _smarthost(first), origin)
    elif name == "MASQUERADE_AS":
        r.set("masquerade_as", first, origin)
    elif name == "define" and first == "confDELIVERY_MODE" and len(args) > 1:
        mode = _MODES.get(args[1][:1].lower())
        if mode:
            r.set("delivery_mode", mode, origin)
        else:
            r.note(origin, "not a delivery mode")
    elif name == "define" and first in ("confTO_QUEUERETURN", "confTO_QUEUEWARN"):
        key = "max_queue_age" if first == "confTO_QUEUERETURN" else "delay_warning"
        r.set(key, args[1] if len(args) > 1 else "", origin)
    elif name == "define" and first == "RELAY_MAILER_ARGS" and len(args) > 1:
        m = re.fullmatch(r"TCP \$h (\d+)", args[1].strip())
        if m:
            r.set("port", int(m.group(1)), origin)  # for a smarthost given without one
        else:
            r.note(origin, "relayq connects over TCP to the smarthost's port only")
    elif name == "define" and first == "confAUTH_MECHANISMS" and len(args) > 1:
        mechs = args[1].split()
        if len(mechs) == 1 and mechs[0].upper() in ("PLAIN", "LOGIN"):
            r.set("auth_mechanism", mechs[0].upper(), origin)
        else:
            r.already(origin, "relayq picks PLAIN or LOGIN as offered")
    elif name == "FEATURE" and first == "genericstable":
        _genericstable(r, origin, args[1] if len(args) > 1 else "")
    elif name == "FEATURE" and first == "authinfo":
        r.note(origin, "give /etc/mail/authinfo (its text form) to relayq import too")
    elif what in _NOTES:
        r.note(origin, _NOTES[what])
    elif what in _SAME:
        r.already(origin, _SAME[what])
    else:
        r.note(origin, "not a setting relayq knows")


# cf/README: genericstable rewrites header senders; the envelope too with masquerade_envelope
_GENERICS_SCOPE = ("Sendmail looks up senders at the names in class G (GENERICS_DOMAIN); "
                   "relayq at this host's names (local_domains)")


def _genericstable(r: Imported, origin: Origin, spec: str) -> None:
    """FEATURE(`genericstable', `hash -o /etc/mail/genericstable'): the map's text
    source (makemap's input, without .db) is relayq's generics_file."""
    words = (spec or "hash /etc/mail/genericstable").split()
    kind, path = words[0], words[-1]
    if kind not in ("hash", "btree", "dbm", "text") or not path.startswith("/"):
        r.note(origin, f"relayq reads a generics file of 'user address' lines, not a {kind} "
                       "map: write its entries as such a file and set generics_file")
        return
    r.set("generics_file", re.sub(r"\.(db|dir|pag)$", "", path), origin, _GENERICS_SCOPE)


def _cf(r: Imported, path: str, text: str) -> None:
    """A built .cf: DS (smart host), DM (masquerade), O DeliveryMode, Timeout.queue*."""
    for origin, body in lines(path, text):
        if body.startswith("DS") and body[2:].strip():
            r.set("smarthost", _smarthost(body[2:].strip()), origin)
        elif body.startswith("DM") and body[2:].strip():
            r.set("masquerade_as", body[2:].strip(), origin)
        elif m := re.match(r"O DeliveryMode=(\w)", body):
            if m.group(1) in _MODES:
                r.set("delivery_mode", _MODES[m.group(1)], origin)
        elif m := re.match(r"O Timeout\.queue(return|warn)=(\S+)", body):
            r.set("max_queue_age" if m.group(1) == "return" else "delay_warning", m.group(2),
                  origin)
        elif m := re.match(r"D\{MTAHost\}(\S+)", body):
            r.set("smarthost", _smarthost(m.group(1)), origin)
        elif m := re.match(r"Kgenerics\s+(.*)$", body):
            _genericstable(r, origin, " ".join(w for w in m.group(1).split()
                                               if not w.startswith("-")))
            r.set("generics_apply", "header", origin,
                  "Sendmail also rewrites the envelope when the .mc has "
                  "FEATURE(masquerade_envelope): then set both")
        elif body.startswith("CG") and body[2:].strip():
            r.note(origin, _NOTES["GENERICS_DOMAIN"])


def _authinfo(r: Imported, path: str, text: str) -> None:
    """`AuthInfo:host "U:user" "P:password" "M:PLAIN"`: the smarthost's, else the first."""
    entries: list[Credential] = []
    mechs: dict[int, str] = {}
    for origin, body in lines(path, text):
        m = re.match(r"AuthInfo:(\S*)\s+(.*)$", body)
        fields = dict(re.findall(r'"([A-Z]):([^"]*)"', m.group(2))) if m else {}
        if not m or not (fields.get("U") or fields.get("I")):
            r.note(Origin(path, origin.line, ""), "not an AuthInfo line with a user")
            continue
        entries.append((m.group(1), fields.get("U") or fields["I"], fields.get("P", ""),
                        Origin(path, origin.line, "")))
        mechs[origin.line] = fields.get("M", "").split()[0] if fields.get("M") else ""
    host = smarthost_of(r).strip("[]").split("]")[0].split(":")[0]
    taken = credentials(r, entries, (host,))
    if taken is not None and mechs[taken[3].line] in ("PLAIN", "LOGIN"):
        r.set("auth_mechanism", mechs[taken[3].line], taken[3])


def convert(files: list[tuple[str, str]]) -> Imported:
    r = Imported(KIND)
    auth = [(p, t) for p, t in files if os.path.basename(p).startswith("authinfo")]
    for path, text in files:
        if (path, text) in auth:
            continue
        if path.endswith(".cf") or not re.search(r"\b[A-Z_]+\(|\bdefine\(", text):
            _cf(r, path, text)
            continue
        calls = _calls(path, text)
        for origin, name, args in calls:
            _macro(r, origin, name, args)
        generics = next((o for o, n, a in calls if n == "FEATURE" and a[:1] == ["genericstable"]
                         and r.get("generics_file")), None)
        if generics is not None:  # header senders; the envelope too with masquerade_envelope
            envelope = any(n == "FEATURE" and a[:1] == ["masquerade_envelope"]
                           for _, n, a in calls)
            r.set("generics_apply", "both" if envelope else "header", generics)
    for path, text in auth:
        _authinfo(r, path, text)
    return r
