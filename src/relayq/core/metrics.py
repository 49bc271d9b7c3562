"""The queue and its delivery statistics in Prometheus' text format (pure).

For node_exporter's textfile collector (`relayq metrics FILE`, or the daemon's
`metrics_file`): every family has its HELP and TYPE lines, no series is
written twice, the text ends with a newline. Names follow kumina's
postfix_exporter with `relayq_` for `postfix_`, so its dashboards carry over
with one rename:

    relayq_up                                      1: these numbers were collected
    relayq_daemon_up                               1: a relayq daemon runs for this queue
    relayq_queue_messages{state}                   queued, deferred, held, quarantined, maildrop
    relayq_queue_dead_letters                      undeliverable and unreportable (quarantine/)
    relayq_queue_oldest_message_age_seconds        0 for an empty queue
    relayq_showq_message_size_bytes{queue}         histogram per state (postfix_exporter's buckets)
    relayq_showq_message_age_seconds{queue}        histogram per state
    relayq_smtp_messages_processed_total{relay,status}    sent, deferred, bounced, expired
    relayq_smtp_recipients_processed_total{relay,status}
    relayq_last_delivery_timestamp_seconds{relay}  the last message sent through it
    relayq_last_error_timestamp_seconds{relay}     its last deferral or failure

The counters come from relayq.queue.stats: they survive restarts and may
reset after a crash, which Prometheus' rate() expects of a counter.
"""

from __future__ import annotations

from typing import Any

SIZE_BUCKETS = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)  # bytes: postfix_exporter's
AGE_BUCKETS = (1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7)  # seconds: postfix_exporter's
STATUSES = ("sent", "deferred", "bounced", "expired")


def histogram(values: list[float], buckets: tuple[float, ...]) -> dict[str, Any]:
    """Cumulative bucket counts, sum and count: what a histogram's lines need."""
    counts = [0] * len(buckets)
    for v in values:
        for i, bound in enumerate(buckets):
            if v <= bound:
                counts[i] += 1
                break
    total = 0
    cumulative = []
    for c in counts:
        total += c
        cumulative.append(total)
    return {"buckets": cumulative, "sum": float(sum(values)), "count": len(values)}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        shown = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{shown}}} {_number(value)}" if shown
                          else f"{name} {_number(value)}")

    def histogram(self, name: str, hist: dict[str, Any], buckets: tuple[float, ...],
                  **labels: str) -> None:
        for bound, count in zip(buckets, hist["buckets"], strict=True):
            self.sample(f"{name}_bucket", count, **labels, le=_number(bound))
        self.sample(f"{name}_bucket", hist["count"], **labels, le="+Inf")
        self.sample(f"{name}_sum", hist["sum"], **labels)
        self.sample(f"{name}_count", hist["count"], **labels)


def render(snap: dict[str, Any], daemon_up: bool) -> str:
    """The text for one snapshot (relayq.queue.census.snapshot)."""
    t = _Text()
    t.family("relayq_up", "gauge", "Whether the queue could be read (1) for these numbers.")
    t.sample("relayq_up", 1)
    t.family("relayq_daemon_up", "gauge", "Whether a relayq daemon runs for this queue.")
    t.sample("relayq_daemon_up", int(daemon_up))
    t.family("relayq_queue_messages", "gauge", "Messages in the queue, by state.")
    for state, count in snap["states"].items():
        if count is not None:  # maildrop/ that this user may not list
            t.sample("relayq_queue_messages", count, state=state)
    t.family("relayq_queue_dead_letters", "gauge",
             "Dead letters kept in quarantine/ (undeliverable and unreportable).")
    t.sample("relayq_queue_dead_letters", snap["dead_letters"])
    t.family("relayq_queue_oldest_message_age_seconds", "gauge",
             "Age of the oldest queued message (0 when the queue is empty).")
    t.sample("relayq_queue_oldest_message_age_seconds", snap["oldest_age_seconds"] or 0)
    for name, what, buckets, key in (
            ("relayq_showq_message_size_bytes", "Size of queued messages", SIZE_BUCKETS,
             "size_histograms"),
            ("relayq_showq_message_age_seconds", "Age of queued messages", AGE_BUCKETS,
             "age_histograms")):
        t.family(name, "histogram", f"{what}, by queue state.")
        for state, hist in snap[key].items():
            t.histogram(name, hist, buckets, queue=state)
    relays = sorted(snap["stats"]["relays"].items())
    for unit in ("messages", "recipients"):
        name = f"relayq_smtp_{unit}_processed_total"
        t.family(name, "counter", f"Delivery attempts counted in {unit}, by relay and "
                 "outcome (sent, deferred, bounced, expired), since the statistics began.")
        for relay, entry in relays:
            suffix = "" if unit == "messages" else "_recipients"
            for status in STATUSES:
                t.sample(name, entry.get(status + suffix, 0), relay=relay, status=status)
    for key, name, help_text in (
            ("last_success", "relayq_last_delivery_timestamp_seconds",
             "When a message was last sent through the relay (Unix time)."),
            ("last_error_time", "relayq_last_error_timestamp_seconds",
             "When the relay last deferred or refused a message (Unix time).")):
        t.family(name, "gauge", help_text)
        for relay, entry in relays:
            if entry.get(key):
                t.sample(name, entry[key], relay=relay)
    return "\n".join(t.lines) + "\n"
