"""`relayq qshape`: the queue by domain and age, as Postfix's qshape(1) shows it.

The messages are `mailq --json-lines`' objects (postqueue -j's): read from the
queue by whoever may read it, and otherwise asked of the daemon, which, as for
mailq, answers a user with their own messages only (everyone's for root and
the admin group). The table itself is relayq.core.qshape's, pure.
"""

from __future__ import annotations

import time

from relayq.core.errors import UsageError

TYPE_CHECKING = False

if TYPE_CHECKING:
    import argparse
    from typing import Any

    from relayq.queue.spool import Spool

QUEUE_NAMES = ("incoming", "active", "deferred", "hold")


def run(spool: Spool, args: argparse.Namespace) -> int:
    """Print the table; exit 0 (77 or 69 come from reading the queue, as for mailq)."""
    from relayq.core import qshape

    unknown = [q for q in args.queues if q not in QUEUE_NAMES]
    if unknown:
        raise UsageError(f"qshape: unknown queue {unknown[0]!r} "
                         f"(one of {', '.join(QUEUE_NAMES)})")
    try:
        bounds = qshape.limits(args.buckets, args.first, linear=args.linear)
    except ValueError as exc:
        raise UsageError(f"qshape: {exc}") from None
    if args.min_subdomains < 1:
        raise UsageError("qshape: -m needs a count of at least 1")
    wanted = set(args.queues or QUEUE_NAMES)
    messages = [qshape.Message(obj["arrival_time"], obj["sender"],
                               [r["address"] for r in obj["recipients"]])
                for obj in _objects(spool) if obj["queue_name"] in wanted]
    table = qshape.shape(messages, time.time(), limits=bounds, by_sender=args.sender,
                         parents=args.parents, min_subdomains=args.min_subdomains)
    from relayq.cli.mailq import write

    write(qshape.render(table).encode("utf-8", "surrogateescape"))
    return 0


def _objects(spool: Spool) -> list[dict[str, Any]]:
    if spool.writable():
        from relayq.queue.listing import collect, postqueue_objects

        return postqueue_objects(collect(spool, []))
    import json

    from relayq.cli.mailq import ask_daemon

    text = b"".join(ask_daemon(spool, ["--json-lines"]))
    return [json.loads(line) for line in text.splitlines() if line]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """qshape(1)'s options that mean something for relayq's one queue."""
    p.add_argument("-s", dest="sender", action="store_true",
                   help="sender domains (one per message) instead of recipient domains")
    p.add_argument("-p", dest="parents", action="store_true",
                   help="also rows for parent domains (.example.org), TLDs excepted")
    p.add_argument("-m", dest="min_subdomains", type=int, default=5, metavar="N",
                   help="with -p: a parent's row needs N subdomains (default 5)")
    p.add_argument("-b", dest="buckets", type=int, default=10, metavar="N",
                   help="number of age buckets, the last without limit (default 10)")
    p.add_argument("-t", dest="first", type=int, default=5, metavar="MINUTES",
                   help="the first bucket's age limit; each next is twice (default 5)")
    p.add_argument("-l", dest="linear", action="store_true",
                   help="linear buckets: multiples of -t instead of doubling")
    p.add_argument("queues", nargs="*", metavar="QUEUE",
                   help="only these of postqueue -j's queue names (mailq --json-lines): "
                        "incoming, active, deferred, hold (default: all)")
