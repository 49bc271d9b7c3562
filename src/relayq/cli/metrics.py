"""`relayq metrics [FILE]`: the queue and the delivery statistics for Prometheus.

Writes node_exporter's textfile collector format (relayq.core.metrics) to FILE
atomically (relayq.system.textfile: a temporary file in the same directory,
then a rename; mode 0644), or to standard output without FILE or with `-`.
The daemon writes the same text every `metrics_interval` seconds when
`metrics_file` is set (relayq.daemon.exporter); this command is for cron, or
to look. Only a user who may read the queue can run it (root, the queue's
owner): the counts come from the queue itself.
"""

from __future__ import annotations

import sys

from relayq.core.errors import EX_OK, RelayqError

TYPE_CHECKING = False

if TYPE_CHECKING:
    from relayq.queue.spool import Spool


def text(spool: Spool, daemon_up: bool) -> str:
    """The metrics text for the queue now."""
    from relayq.core import metrics
    from relayq.queue import census

    try:
        snap = census.snapshot(spool)
    except PermissionError:
        raise RelayqError(f"{spool.queue}: permission denied (only root or the queue's "
                          "owner may read the queue)", 77) from None
    except OSError as exc:
        raise RelayqError(f"{spool.queue}: {exc.strerror or exc}", 74) from None
    return metrics.render(snap, daemon_up)


def run(spool: Spool, target: str | None, daemon_up: bool) -> int:
    body = text(spool, daemon_up)
    if not target or target == "-":
        sys.stdout.write(body)
        sys.stdout.flush()
        return EX_OK
    from relayq.system.textfile import publish

    try:
        publish(target, body)
    except OSError as exc:
        raise RelayqError(f"{target}: {exc.strerror or exc}", 73) from None
    return EX_OK
