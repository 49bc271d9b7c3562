"""When to try again, when to give up, and what a result means for the caller."""

from __future__ import annotations

from relayq.errors import EX_NOUSER, EX_OK, EX_UNAVAILABLE


def next_delay(attempts: int, minimum: float, maximum: float) -> float:
    """Capped exponential backoff: min, 2*min, 4*min ... never above max."""
    if attempts <= 0:
        return 0.0
    return float(min(maximum, minimum * (2 ** min(attempts - 1, 32))))


def expired(created: float, now: float, max_age: float) -> bool:
    return max_age > 0 and now - created >= max_age


def interactive_status(failed_codes: list[str]) -> int:
    """Exit status after an interactive delivery, as sendmail measured (peers.md 5).

    A recipient refused (5.1.x) gives EX_NOUSER; any other permanent failure
    EX_UNAVAILABLE; temporary trouble leaves the message queued and exits 0.
    """
    if not failed_codes:
        return EX_OK
    if any(code.startswith("5.1.") for code in failed_codes):
        return EX_NOUSER
    return EX_UNAVAILABLE
