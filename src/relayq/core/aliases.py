"""Aliases: parse /etc/aliases text and expand a local name into delivery targets.

Pure: no files, users or clock. The caller reads the aliases file and hands
in a callback that reads `:include:` files, so the parser is tested and
fuzzed without fixtures. Every error is an AliasError naming file and line.

Format (sendmail's aliases(5), which Postfix's postalias also reads):

    # a comment (a line whose first non-blank character is '#')
    name: target, target, ...
        continuation: a line starting with blank or tab continues the entry
    name: "target, with comma", \\user, /file, "|command args", :include:/path

Targets:

    user@domain      an address; expanded again when its domain is local
    name             a local name: expanded again, else a local user's mailbox
    \\name           the mailbox of user `name`, never expanded again
    /path            append to a file
    |command         pipe the message to a command (through /bin/sh -c)
    :include:/path   the targets listed in another file, one or more per
                     line, comma separated, '#' comments allowed

Names are case-insensitive (lower-cased). A name listed twice keeps its first
entry and earns a warning (Postfix's rule). Expansion follows names
depth-first with the chain of names it came through: a name that appears in
its own expansion directly (`bob: bob, bob@elsewhere`) means bob's mailbox, as
in sendmail; any longer cycle is an AliasLoop, and nesting deeper than
MAX_DEPTH is an error too. Duplicate targets are delivered once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relayq.core.errors import EX_DATAERR, RelayqError

if TYPE_CHECKING:
    from collections.abc import Callable


MAX_DEPTH = 20

ADDRESS = "address"  # a remote address
NAME = "name"  # a local name (expanded again)
USER = "user"  # a local user's mailbox
FILE = "file"
PIPE = "pipe"
INCLUDE = "include"


class AliasError(RelayqError):
    """A broken aliases or include file, or an expansion that cannot finish.

    A syntax error is temporary for the mail it touches: the message waits
    for the administrator's fix (and bounces after max_queue_age), as
    sendmail defers on a broken :include:.
    """

    code = EX_DATAERR
    status = "4.3.0"  # RFC 3463 status for the recipient whose expansion failed

    @property
    def temporary(self) -> bool:
        return self.status.startswith("4")


class AliasLoop(AliasError):
    """A cycle of aliases, or nesting past MAX_DEPTH: the mail bounces."""

    status = "5.4.6"


class IncludeUnreadable(AliasError):
    """An :include: file could not be read now; the recipient waits for it."""

    status = "4.3.0"


@dataclass(frozen=True)
class Target:
    kind: str  # ADDRESS | NAME | USER | FILE | PIPE | INCLUDE
    value: str
    where: str = ""  # "file:line", for messages


@dataclass(frozen=True)
class Leaf:
    """One delivery the expansion arrived at.

    `owner` is the local name whose entry named a file or pipe target; the
    caller runs it with that user's privileges when it is a real non-root
    user, else with an unprivileged default (sendmail's DefaultUser).
    """

    kind: str  # ADDRESS | USER | FILE | PIPE
    value: str
    owner: str = ""


@dataclass
class Aliases:
    path: str
    entries: dict[str, list[Target]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    longest: int = 0  # longest value in bytes (sendmail's newaliases statistics)
    total: int = 0  # names and values in bytes


# -- parsing -------------------------------------------------------------------


def _split_targets(text: str, where: str) -> list[str]:
    """Split at commas outside double quotes; quotes and escapes are kept."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        if c == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if quoted:
        raise AliasError(f"{where}: unbalanced quote")
    out.append("".join(cur))
    return [t.strip() for t in out if t.strip()]


def _unquote(text: str, where: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        out: list[str] = []
        i = 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner):
                out.append(inner[i + 1])
                i += 2
                continue
            if inner[i] == '"':
                raise AliasError(f"{where}: stray quote in {text!r}")
            out.append(inner[i])
            i += 1
        return "".join(out).strip()
    return text


def parse_target(raw: str, where: str) -> Target:
    """Classify one target as written (quotes allowed around the whole target)."""
    text = _unquote(raw.strip(), where)
    if not text:
        raise AliasError(f"{where}: empty target")
    if text[0] == "|":
        command = text[1:].strip()
        if not command:
            raise AliasError(f"{where}: empty command in {raw!r}")
        return Target(PIPE, command, where)
    if text[0] == "/":
        return Target(FILE, text, where)
    if text[:9].lower() == ":include:":
        path = text[9:].strip()
        if not path.startswith("/"):
            raise AliasError(f"{where}: :include: needs an absolute path, got {raw!r}")
        return Target(INCLUDE, path, where)
    if text[0] == "\\":
        name = text[1:].strip()
        if not name or any(c.isspace() or c in "@/" for c in name):
            raise AliasError(f"{where}: bad user name in {raw!r}")
        return Target(USER, name, where)
    if text.endswith(">") and "<" in text:  # Full Name <user@domain>
        text = text[text.rindex("<") + 1 : -1].strip()
    if not text or any(c.isspace() or c in '<>()[];"' for c in text.replace("\\", "")):
        raise AliasError(f"{where}: bad address {raw!r}")
    if text.startswith("@") or text.endswith("@"):
        raise AliasError(f"{where}: bad address {raw!r}")
    return Target(ADDRESS if "@" in text else NAME, text, where)


def _check_chars(text: str, path: str) -> None:
    for n, line in enumerate(text.split("\n"), 1):
        if "\0" in line:
            raise AliasError(f"{path}:{n}: NUL character")


def parse(text: str, path: str = "/etc/aliases") -> Aliases:
    """Parse aliases text; raises AliasError with "path:line: reason"."""
    _check_chars(text, path)
    table = Aliases(path)
    entries: list[tuple[int, str]] = []  # (first line, joined text)
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not entries:
                raise AliasError(f"{path}:{n}: continuation line without an alias above it")
            first, joined = entries[-1]
            entries[-1] = (first, f"{joined} {stripped}")
        else:
            entries.append((n, stripped))
    for n, entry in entries:
        where = f"{path}:{n}"
        name, colon, value = entry.partition(":")
        name = _unquote(name.strip(), where).lower()
        if not colon:
            raise AliasError(f"{where}: missing ':' after the alias name")
        if not name or any(c.isspace() or ord(c) < 32 or c in "@:," for c in name):
            raise AliasError(f"{where}: bad alias name {entry.partition(':')[0].strip()!r}")
        value = value.strip()
        targets = [parse_target(t, where) for t in _split_targets(value, where)]
        if not targets:
            raise AliasError(f"{where}: alias {name!r} has no targets")
        if name in table.entries:
            table.warnings.append(
                f"{where}: duplicate alias {name!r} ignored "
                f"(first at line {table.lines[name]})"
            )
            continue
        table.entries[name] = targets
        table.lines[name] = n
        lhs = len(name.encode("utf-8", "surrogatepass")) + 1
        rhs = len(value.encode("utf-8", "surrogatepass")) + 1
        table.longest = max(table.longest, rhs)
        table.total += lhs + rhs
    return table


def parse_include(text: str, path: str) -> list[Target]:
    """An :include: file: targets, one or more per line, comma separated."""
    _check_chars(text, path)
    out: list[Target] = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{n}"
        out.extend(parse_target(t, where) for t in _split_targets(line, where))
    return out


# -- expansion -----------------------------------------------------------------


def expand(
    name: str,
    table: Aliases,
    *,
    local_part: Callable[[str], str | None],
    read_include: Callable[[str], str],
    max_depth: int = MAX_DEPTH,
) -> tuple[list[Leaf], bool]:
    """Expand a local name; returns (leaves, whether name was an alias).

    `local_part(address)` gives the local part of an address in a local
    domain (None when remote); `read_include(path)` returns a file's text or
    raises OSError. A name that is no alias becomes a USER leaf: whether that
    user exists is the caller's question.
    """
    leaves: list[Leaf] = []
    seen: set[tuple[str, str]] = set()

    def add(leaf: Leaf) -> None:
        key = (leaf.kind, leaf.value.lower() if leaf.kind in (ADDRESS, USER) else leaf.value)
        if key not in seen:
            seen.add(key)
            leaves.append(leaf)

    def visit_name(local: str, chain: tuple[str, ...]) -> None:
        key = local.lower()
        if key in chain:
            if chain[-1] == key:  # bob: bob, ... -> bob's own mailbox
                add(Leaf(USER, local))
                return
            loop = " -> ".join((*chain[chain.index(key) :], key))
            raise AliasLoop(f"alias loop: {loop}")
        targets = table.entries.get(key)
        if targets is None:
            add(Leaf(USER, local))
            return
        if len(chain) >= max_depth:
            raise AliasLoop(f"aliases nested deeper than {max_depth}: {' -> '.join(chain)}")
        for t in targets:
            visit_target(t, (*chain, key), key)

    def visit_target(t: Target, chain: tuple[str, ...], owner: str) -> None:
        if t.kind == ADDRESS:
            local = local_part(t.value)
            if local is None:
                add(Leaf(ADDRESS, t.value))
            else:
                visit_name(local, chain)
        elif t.kind == NAME:
            visit_name(t.value, chain)
        elif t.kind == USER:
            add(Leaf(USER, t.value))
        elif t.kind in (FILE, PIPE):
            add(Leaf(t.kind, t.value, owner))
        else:  # INCLUDE
            marker = ":include:" + t.value
            if marker in chain:
                raise AliasLoop(f"include loop: {' -> '.join((*chain, marker))}")
            if len(chain) >= max_depth:
                raise AliasLoop(f"aliases nested deeper than {max_depth}: {' -> '.join(chain)}")
            try:
                text = read_include(t.value)
            except OSError as exc:
                raise IncludeUnreadable(
                    f"{t.where}: cannot read :include:{t.value}: {exc.strerror or exc}"
                ) from None
            for sub in parse_include(text, t.value):
                visit_target(sub, (*chain, marker), owner)

    visit_name(name, ())
    return leaves, name.lower() in table.entries


# -- newaliases ----------------------------------------------------------------
