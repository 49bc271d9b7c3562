"""sendmail's queue selectors: -qI, -qR, -qS (and their negations -q!I, -q!R, -q!S).

Followed from sendmail 8.17's `gatherq()` (queue.c), not only its man page:

* Each selector is a substring test: I on the queue id, R on a recipient,
  S on the envelope sender.
* I compares case-sensitively; R and S ignore case (sendmail calls
  `strcontainedin(true, ...)` for them, `false` for the id).
* Selectors of the same kind are alternatives: the kind is satisfied when any
  one of them holds. Kinds are combined with AND: `-qSroot -qRbiff` selects
  mail from root that is also for biff.
* `!` negates one selector: it holds for a value that does *not* contain the
  substring. For R that is tested per recipient, as sendmail does: `-q!Rfoo`
  selects a message with at least one recipient not containing "foo".
* The null sender is matched as "<>" (`-qS<>` selects bounces).

Unlike sendmail, an empty substring (`-qR` followed by a space) is refused:
it would select everything, and it is nearly always a typo for `-qRaddr`.
"""

from __future__ import annotations

from relayq.core.errors import UsageError

KINDS = ("I", "R", "S")


class Selector:
    """One -q[!]Xsubstr test."""

    __slots__ = ("kind", "negate", "pattern")

    def __init__(self, kind: str, pattern: str, negate: bool = False) -> None:
        if kind not in KINDS:
            raise ValueError(f"selector kind must be one of I, R, S, not {kind!r}")
        self.kind = kind
        self.pattern = pattern
        self.negate = negate

    def __repr__(self) -> str:
        return f"Selector({self.kind!r}, {self.pattern!r}, negate={self.negate})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selector):
            return NotImplemented
        return (self.kind, self.pattern, self.negate) == (other.kind, other.pattern, other.negate)

    def __hash__(self) -> int:
        return hash((self.kind, self.pattern, self.negate))

    def test(self, value: str) -> bool:
        """Does this selector hold for one value (an id, a recipient or the sender)?"""
        if self.kind == "I":
            found = self.pattern in value
        else:
            found = self.pattern.lower() in value.lower()
        return found != self.negate


def parse(arg: str) -> Selector:
    """Parse what follows -q: "Ifoo", "R@example.org", "!Sroot"."""
    negate = arg.startswith("!")
    body = arg[1:] if negate else arg
    if not body or body[0] not in KINDS:
        raise UsageError(
            f"bad queue selector -q{arg}: expected -q[!]I, -q[!]R or -q[!]S followed by a substring"
        )
    kind, pattern = body[0], body[1:]
    if not pattern:
        raise UsageError(
            f"queue selector -q{arg} needs a substring written right after it, "
            f"e.g. -q{arg}example.org"
        )
    return Selector(kind, pattern, negate)


def matches(selectors: list[Selector], qid: str, sender: str, recipients: list[str]) -> bool:
    """Is this message selected? True when `selectors` is empty."""
    for kind in KINDS:
        group = [s for s in selectors if s.kind == kind]
        if not group:
            continue
        if kind == "I":
            values = [qid]
        elif kind == "S":
            values = [sender or "<>"]
        else:
            values = recipients
        if not any(s.test(v) for s in group for v in values):
            return False
    return True
