"""The queue's shape: messages by domain and age, as Postfix's qshape(1) prints it.

An administrator who knows qshape reads a backlog at a glance: one row per
recipient domain (or sender domain, -s), one column per age bucket, a TOTAL
row on top, the busiest domains first. Pure: the caller reads the queue
(`relayq qshape`, relayq.cli.qshape) and passes the clock, so the tests can
fix it.

The rules, where qshape's manual leaves a choice:

* Buckets grow geometrically from the first limit (5 minutes), or linearly
  (-l); a message exactly at a limit is in the next bucket (0 <= age < 5 is
  the first); a message dated in the future (clock change) is in the first;
  the last bucket has no limit and is labelled "<last limit>+".
* Recipient mode counts every recipient still to be delivered (a message to
  two domains is in both rows); sender mode counts messages.
* A domain is what follows the last "@", lower case, without a final dot;
  an address without "@" is its own row, and the null sender is
  "MAILER-DAEMON".
* Parent rows (-p) are named with a leading dot and count the recipients at
  any subdomain below the parent (not the parent itself); top level domains
  and parents with fewer than `min_subdomains` distinct subdomains get no
  row. They are never added to TOTAL.
"""

from __future__ import annotations

from typing import NamedTuple

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

Row = tuple[str, int, list[int]]  # name, count, count per bucket


class Message(NamedTuple):
    """What qshape needs of a queued message."""

    arrival: float  # seconds since the epoch
    sender: str
    recipients: Sequence[str]  # those still to be delivered


class Shape(NamedTuple):
    labels: list[str]  # "T", then each bucket's upper limit in minutes, then "N+"
    total: Row
    rows: list[Row]  # busiest first, then by name


def limits(buckets: int = 10, first: int = 5, *, linear: bool = False) -> list[int]:
    """The upper limits, in minutes, of all buckets but the last (which has none)."""
    if buckets < 1 or first < 1:
        raise ValueError("the bucket count and the first bucket's minutes must be at least 1")
    return [first * (i + 1) if linear else first << i for i in range(buckets - 1)]


def domain_of(address: str) -> str:
    """qshape's row for an address."""
    if not address:
        return "MAILER-DAEMON"
    return address.rpartition("@")[2].rstrip(".").lower() or address.lower()


def shape(messages: Iterable[Message], now: float, *, limits: Sequence[int] | None = None,
          by_sender: bool = False, parents: bool = False, min_subdomains: int = 5) -> Shape:
    """Count the messages (or their recipients) per domain and age bucket."""
    bounds = [5, 10, 20, 40, 80, 160, 320, 640, 1280] if limits is None else list(limits)
    width = len(bounds) + 1
    table: dict[str, list[int]] = {}
    total = [0] * width
    for m in messages:
        bucket = _bucket((now - m.arrival) / 60, bounds)
        for address in [m.sender] if by_sender else m.recipients:
            row = table.get(domain_of(address))
            if row is None:
                row = table[domain_of(address)] = [0] * width
            row[bucket] += 1
            total[bucket] += 1
    if parents:
        table.update(_parents(table, width, min_subdomains))
    rows = sorted(((name, sum(row), row) for name, row in table.items()),
                  key=lambda r: (-r[1], r[0]))
    labels = ["T", *(str(b) for b in bounds), f"{bounds[-1]}+" if bounds else "0+"]
    return Shape(labels, ("TOTAL", sum(total), total), rows)


def _bucket(age_minutes: float, bounds: list[int]) -> int:
    for i, bound in enumerate(bounds):
        if age_minutes < bound:
            return i
    return len(bounds)


def _parents(table: dict[str, list[int]], width: int, min_subdomains: int) -> dict[str, list[int]]:
    sums: dict[str, list[int]] = {}
    children: dict[str, set[str]] = {}
    for name, row in table.items():
        labels = name.split(".")
        for i in range(1, len(labels) - 1):  # never the domain itself, never a TLD
            parent = ".".join(labels[i:])
            acc = sums.setdefault(parent, [0] * width)
            for j, n in enumerate(row):
                acc[j] += n
            children.setdefault(parent, set()).add(name)
    return {"." + p: row for p, row in sums.items() if len(children[p]) >= min_subdomains}


def render(table: Shape) -> str:
    """qshape's layout: names right-aligned in the first column, counts right-aligned
    under each bucket's label, the header line first, then TOTAL, then the rows."""
    rows = [table.total, *table.rows]
    name_width = max(len(name) for name, _, _ in rows)
    columns = [[str(total), *map(str, buckets)] for _, total, buckets in rows]
    widths = [max(len(label), *(len(c[i]) for c in columns))
              for i, label in enumerate(table.labels)]
    lines = [" " * name_width + "".join(" " + label.rjust(w)
                                        for label, w in zip(table.labels, widths, strict=True))]
    for (name, _, _), cells in zip(rows, columns, strict=True):
        lines.append(name.rjust(name_width)
                     + "".join(" " + c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines) + "\n"
