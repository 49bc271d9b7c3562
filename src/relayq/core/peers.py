"""Another MTA's configuration as relayq settings: what `relayq import` prints.

Each peer's format has its module (`peer_nullmailer`, `peer_ssmtp`, `peer_dma`)
turning the files' text into `Setting`s, each naming the line it came from, and
`Note`s for what cannot be carried over, so that nothing is dropped silently.
This module holds what they share: the records, which format a file is, and
the relayq.toml text. Pure: the command line reads the files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from relayq.core.config import AUTH_MECHANISMS, SCHEMA, SECRET_KEYS
from relayq.core.errors import EX_DATAERR, RelayqError
from relayq.core.tomlout import toml_value


def auth_mechanism(name: str) -> str:
    """A peer's AUTH mechanism as relayq's auth_mechanism value, or "" if relayq lacks it."""
    return name.upper() if name.upper() in AUTH_MECHANISMS and name else ""


def auth_note(name: str) -> str:
    return f"relayq does not offer AUTH {name} ({', '.join(AUTH_MECHANISMS[1:])})"


# SECRET_KEYS (core.config): shown masked unless written to a private file


@dataclass(frozen=True)
class Origin:
    """Where a setting came from: a file, its line number (0: the whole file), the line."""

    path: str
    line: int
    text: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.text.strip()}" if self.text.strip() else where


@dataclass(frozen=True)
class Setting:
    key: str
    value: object
    origin: Origin
    caveat: str = ""  # how relayq's meaning differs from the peer's, said next to it


@dataclass(frozen=True)
class Note:
    """A setting of the peer's that relayq does not take, and why."""

    origin: Origin
    why: str


@dataclass
class Imported:
    kind: str
    settings: list[Setting] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    same: list[Note] = field(default_factory=list)  # what relayq already does: nothing to set
    generics: list[tuple[Origin, str]] = field(default_factory=list)  # a generics file's lines

    def set(self, key: str, value: object, origin: Origin, caveat: str = "") -> None:
        """The first value for a key wins; a second, different one is a note."""
        for s in self.settings:
            if s.key == key:
                if s.value != value:
                    self.note(origin, f"{key} is already {render_value(s.value)} "
                                      f"(from {s.origin.path}:{s.origin.line}); kept that")
                return
        self.settings.append(Setting(key, value, origin, caveat))

    def note(self, origin: Origin, why: str) -> None:
        self.notes.append(Note(origin, why))

    def already(self, origin: Origin, why: str) -> None:
        self.same.append(Note(origin, why))

    def get(self, key: str) -> object:
        return next((s.value for s in self.settings if s.key == key), None)


# how the formats here spell a secret: --pass=X, AuthPass=X, password X, passwd: X
_SECRET = re.compile(r"((?:--)?(?:auth)?pass(?:word|wd)?\s*(?:=|:|\s)\s*)\S+", re.I)


def masked(text: str) -> str:
    """A line as it may be shown: any secret in it replaced (origins are printed)."""
    return _SECRET.sub(r"\1********", text)


Credential = tuple[str, str, str, Origin]  # (the server it is for, user, secret, origin)


def credentials(r: Imported, entries: list[Credential],
                servers: tuple[str, ...]) -> Credential | None:
    """The one rule for a credentials file of several servers (auth.conf, sasl_passwd,
    passwd.client, authinfo): the first entry for the first of `servers` that has
    one (the smarthost's spellings, then a wildcard), else the first entry; every
    other entry is a note. Returns the one taken."""
    chosen = next(([e] for s in servers if s for e in entries if e[0] == s), entries[:1])
    for _server, user, secret, origin in chosen:
        r.set("user", user, origin)
        r.set("password", secret, origin)
    for e in entries:
        if e not in chosen:
            r.note(e[3], f"credentials for {e[0]}, not the smarthost's")
    return chosen[0] if chosen else None


def smarthost_of(r: Imported) -> str:
    """The first smarthost the import found, as written ("" if none)."""
    hosts = r.get("smarthost")
    return str((hosts[0] if isinstance(hosts, list) else hosts) or "")


def lines(path: str, text: str) -> list[tuple[Origin, str]]:
    """(origin, the line without comments and surrounding space) for each line that
    says something: `#` starts a comment, as in every format here. The origin's
    text is masked(); the body is the line as written."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        body = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if body:
            out.append((Origin(path, n, masked(raw)), body))
    return out


def yes(value: str) -> bool:
    return value.strip().lower() in ("yes", "true", "on", "1")


def host_port(host: str, port: str | int | None) -> str:
    """relayq's smarthost spelling: host, host:port; an IPv6 address in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def render_value(value: object) -> str:
    """A TOML value (relayq.core.config.toml_value); a relayq setting is never a table."""
    if not isinstance(value, bool | int | float | str | list):
        raise TypeError(f"no TOML for {value!r}")
    return toml_value(value)


GENERICS_NAME = "generics"  # the generics file `relayq import --write` makes next to the toml


def generics_text(results: list[Imported]) -> str:
    """The generics file made from a peer's own map (ssmtp's revaliases): each line
    after a comment naming its origin; "" when no peer made one."""
    out = [f"{_comment(f'# from {o}')}\n{line}\n" for r in results for o, line in r.generics]
    if not out:
        return ""
    return _comment("# generics_file made by `relayq import`: local user, full address; "
                    "relayq.toml(5)") + "\n" + "".join(out)


def _generics_block(results: list[Imported], path: str) -> list[str]:
    lines_ = [line for r in results for _, line in r.generics]
    if not lines_:
        return []
    return ["", f"# Save these lines as {path} (generics_file; `relayq import --write` "
                "writes it):", *(f"#     {line}" for line in lines_)]


def render(results: list[Imported], secrets: bool, generics_at: str = "") -> str:
    """The relayq.toml text: each setting after a comment naming its origin, then
    every setting not carried over. `secrets` False: passwords are left out (the
    line says where to put them). `generics_at`: where the generics lines a peer
    made are to be saved, shown as a comment block (--write writes the file)."""
    out = ["# relayq.toml made by `relayq import` from "
           + ", ".join(r.kind for r in results) + "; every key: relayq.toml(5)"]
    order = {key: i for i, key in enumerate(SCHEMA)}
    for r in results:
        for s in sorted(r.settings, key=lambda s: order.get(s.key, len(order))):
            out.append(f"# from {s.origin}")
            if s.caveat:
                out.append(f"# differs: {s.caveat}")
            if s.key in SECRET_KEYS and not secrets:
                out.append(f"# {s.key} = ...  (left out: `relayq import --write` puts it in a "
                           "file only root can read; or use password_file)")
            else:
                out.append(f"{s.key} = {render_value(s.value)}")
    if generics_at:
        out += _generics_block(results, generics_at)
    same = [n for r in results for n in r.same]
    if same:
        out += ["", "# Nothing to set (relayq does this already):"]
        out += [f"# - {n.origin}: {n.why}" for n in same]
    notes = [n for r in results for n in r.notes]
    if notes:
        out += ["", "# Not carried over:"]
        for n in notes:
            out.append(f"# - {n.origin}: {n.why}")
    return "\n".join(_comment(line) if line.startswith("#") else line for line in out) + "\n"


def _comment(line: str) -> str:
    """A TOML comment holds no control characters: the file's own are shown as `?`."""
    return "".join("?" if (c < " " and c != "\t") or c == "\x7f" else c for c in line)


def detect(path: str, text: str, kinds: dict[str, Any]) -> str:
    """The format of one file: by its name first, then by what it says."""
    name = os.path.basename(path)
    for kind, module in kinds.items():
        if name in getattr(module, "NAMES", ()):
            return kind
    for kind, module in kinds.items():
        if module.sniff(text):
            return kind
    raise RelayqError(f"{path}: not a configuration relayq knows (give --from)", EX_DATAERR)
