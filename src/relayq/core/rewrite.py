"""Address rewriting a null client applies at submission: one rule per setting.

- `forward`: local_forward (nullmailer's adminaddr, ssmtp's root=): a recipient
  at this host (no domain, localhost or one of the host's names) is sent to
  one address instead, when relayq does not deliver locally.
- `generic`: the generics map (Sendmail's genericstable, Postfix's
  smtp_generic_maps, ssmtp's revaliases): a local sender becomes a full
  address; `parse_generics` reads its "key whitespace value" file.
- `all_mail_from`: one envelope sender for every message (nullmailer's
  allmailfrom); the null sender stays null (a bounce must never be answered).
- `rewrite_from`: an account's provider sends only as its own mailbox
  (Exchange Online's "5.7.1 ... not allowed to send as", Gmail's "5.7.1 header
  from does not match"): the From field's address becomes `from_address`,
  its display name kept; the original From goes to Reply-To when the message
  has none, so replies still reach the writer; a Sender field naming some
  other mailbox is dropped (it would need "send on behalf" rights).

Pure: the file's text, the local domains and the uid lookup are passed in.
"""

from __future__ import annotations

from relayq.core import address
from relayq.core.address import split
from relayq.core.errors import ConfigError, DataError

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path
if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from relayq.core.headers import Field

SYSTEM_UID_MAX = 999  # ssmtp's root=: "userids less than 1000"
SCOPES = ("all", "system")
APPLY = ("both", "envelope", "header")


def _domain(addr: str) -> str:
    return split(addr)[1].lower().rstrip(".")


def is_local(addr: str, local_domains: Collection[str]) -> bool:
    """True for a recipient at this host: no domain, or one of `local_domains`."""
    local, domain = split(addr)
    if not local:
        return False
    return not domain or domain.lower().rstrip(".") in local_domains


def valid_target(addr: str) -> bool:
    """A full address (local@domain) as it goes on the wire: what a forward address and
    a generics value must be. The rule every envelope address passes
    (relayq.core.address.parse_mailbox), and exactly its bare addr-spec: no <>, no
    display name, no list, no space or control character."""
    try:
        if address.parse_mailbox(addr, "address") != addr:
            return False
    except DataError:
        return False
    local, domain = split(addr)
    return bool(local) and bool(domain) and addr.isprintable() and all(domain.split("."))


def forward(rcpt: str, target: str, local_domains: Collection[str],
            uid_of: Callable[[str], int | None] | None = None,
            bare: bool = False) -> str | None:
    """The address `rcpt` is forwarded to, or None to relay it as it is.

    `bare`: the recipient was typed without a domain (qualified since), so it is
    local whatever the mail domain is.

    With `uid_of` (local_forward_users = "system") only system accounts are
    forwarded: a local part whose uid is at most SYSTEM_UID_MAX. The target
    itself is never forwarded again (no loop, idempotent)."""
    if not target or not (bare or is_local(rcpt, local_domains)):
        return None
    if rcpt.lower() == target.lower():
        return None
    if uid_of is not None:
        uid = uid_of(split(rcpt)[0])
        if uid is None or uid > SYSTEM_UID_MAX:
            return None
    return target


def parse_generics(text: str, path: str) -> dict[str, str]:
    """The generics map: "key value" lines, # comments; key `user`,
    `user@domain` or `@domain`, value a full address. A bad line is a
    ConfigError (exit 78) naming path:line."""
    table: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) != 2:
            raise ConfigError(f"{path}:{n}: expected 'local-user full-address', "
                              f"got {raw.strip()!r}")
        key, value = words
        if not valid_target(value):
            raise ConfigError(f"{path}:{n}: {value!r} is not a full address (user@domain)")
        local, domain = split(key)
        if (not local and not domain) or key.endswith("@") or not key.isprintable():
            raise ConfigError(f"{path}:{n}: bad key {key!r}")
        table.setdefault(key.lower(), value)  # the first line for a key wins, as in postmap
    return table


def generic(addr: str, table: dict[str, str], local_domains: Collection[str],
            qualify: str = "") -> str | None:
    """The generics map's address for a local sender, or None (not local, not mapped).

    Looked up as user@domain, then user, then @domain (Postfix's order); a sender
    without a domain as if it had `qualify`'s (Postfix's $myorigin, Sendmail's $j),
    so that a table keyed root@example.org maps a bare `root`."""
    if not table or not addr or not is_local(addr, local_domains):
        return None
    local, domain = split(addr)
    key = local.lower()
    dom = (domain or qualify).lower().rstrip(".")
    for k in ((f"{key}@{dom}", key, f"@{dom}") if dom else (key,)):
        if k in table:
            return table[k]
    return None


def all_mail_from(sender: str, fixed: str) -> str:
    """The envelope sender with all_mail_from set: `fixed`, except that <> stays <>."""
    return fixed if fixed and sender else sender


def own_address(from_address: str, user: str) -> str:
    """An account's own address: from_address, else its login when that is an address."""
    if from_address:
        return from_address
    return user if valid_target(user) else ""


def from_fields(fields: list[Field], own: str) -> list[Field]:
    """The header with rewrite_from applied (see the module's docstring): every other
    field as it was, in its place; a From already naming `own` alone is kept. (New
    fields are made as type(field): core/headers imports this module.)"""
    from relayq.core.address import parse_list

    out: list[Field] = []
    original: Field | None = None
    has_reply_to = any(f.name.lower() == "reply-to" for f in fields)
    for f in fields:
        name = f.name.lower()
        if name == "from" and original is None:
            found = parse_list(f.value)
            if len(found) == 1 and found[0].addr.lower() == own.lower():
                return fields  # already ours
            original = f
            if len(found) == 1:  # "Name <addr>": the name stays, as the providers allow
                v = f.value
                out.append(type(f)(f.name, f.head + v[:found[0].start] + own + v[found[0].end:]))
            else:  # a list or a group: one mailbox, ours
                out.append(type(f)(f.name, f"{f.head} {own}"))
        elif name == "from" or (name == "sender" and not _names_only(f, own)):
            continue  # a second From, another mailbox's Sender
        else:
            out.append(f)
    if original is not None and not has_reply_to:
        out.append(type(original)("Reply-To", "Reply-To:" + original.value))
    return out


def _names_only(f: Field, own: str) -> bool:
    from relayq.core.address import parse_list

    return all(m.addr.lower() == own.lower() for m in parse_list(f.value))
