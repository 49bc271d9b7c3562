"""When to try again, when to give up, and what a result means for the caller."""

from __future__ import annotations

from relayq.core.errors import EX_NOUSER, EX_OK, EX_UNAVAILABLE

LOOP_STATUS = "4.4.6"  # the relay is ourselves: waits for the administrator's fix
LOOP_REASON = f"{LOOP_STATUS} mail loops back to me"
# Reasons mail waits on this host's own configuration or its provider's limits,
# never on the recipient: such mail is never returned at max_queue_age (the
# fault is ours to fix, or time's). Each starts the reply relayq itself records.
REAUTH_REASON = "re-authorization needed: run relayq oauth2 login"  # invalid_grant
NO_ACCOUNT_REASON = "account no longer configured"  # queued for an account since removed
LIMIT_REASON = "sending limit reached"  # messages_per_minute, recipients_per_day
CLIENT_REASON = "OAuth2 client refused"  # invalid_client: an expired client secret
OUR_WAITS = (REAUTH_REASON, NO_ACCOUNT_REASON, LIMIT_REASON, CLIENT_REASON)
JITTER = 0.1  # each delay is stretched or shrunk by up to this fraction
MAX_HOPS = 25  # Received fields (or -h) a message may carry: more is a mail loop


def waits_on_us(reply: str, remote: bool) -> bool:
    """Is this recipient waiting on our own configuration or limits? Only a reply
    relayq wrote itself counts: remote False and one of OUR_WAITS at its very start,
    after at most a reply code and an enhanced status code ("451 4.3.5 account no
    longer configured: ..."). A relay's words recorded as remote False (its greeting,
    its AUTH refusal) start with its host's name, so they never match."""
    if remote:
        return False
    rest = reply
    for _ in range(2):  # "451 " then "4.3.5 ", each optional
        head, sep, tail = rest.partition(" ")
        if not (sep and head[:1] in "245" and head.replace(".", "").isdigit()):
            break
        rest = tail
    return rest.startswith(OUR_WAITS)


class Mode:
    """The delivery modes: sendmail's -odX letters and relayq.toml's delivery_mode
    (plain str constants: the enum module would cost the submission path ~5 ms)."""

    BACKGROUND = "b"
    INTERACTIVE = "i"
    QUEUE = "q"
    DEFERRED = "d"


# relayq.toml's names for them (sendmail's -odX also takes the letters and "queueonly")
MODE_NAMES = {"background": Mode.BACKGROUND, "interactive": Mode.INTERACTIVE,
              "queue": Mode.QUEUE, "deferred": Mode.DEFERRED}
LEAVE, CHILD, NOW = "leave", "child", "now"  # what after_commit() answers


def after_commit(mode: str) -> str:
    """The one rule for a message just committed, whoever committed it (sendmail,
    -bs, a maildrop hand-over taken by the daemon): LEAVE it for a queue run
    (queue, deferred), deliver it in a CHILD nobody waits for (background), or
    NOW, while the submitter waits (interactive, and any other letter)."""
    if mode in (Mode.QUEUE, Mode.DEFERRED):
        return LEAVE
    return CHILD if mode == Mode.BACKGROUND else NOW


def hop_refusal(hops: int) -> str:
    """The one hop-count rule (enqueue, and the hand-over client before its exit 0):
    why a message is refused, or ""."""
    if hops < MAX_HOPS:
        return ""
    return f"Too many hops {hops} ({MAX_HOPS} max): message refused (mail loop?)"


class HopCounter:
    """Received fields of a message's header, counted in its raw chunks as they stream
    past: a client that exits 0 before its taker reads the message refuses first
    what the taker would refuse (the taker counts with headers.rewrite; a field
    name is matched at the start of a line, case-insensitively)."""

    def __init__(self) -> None:
        self.hops = 0
        self._line = b""  # the start of a line split between chunks
        self._done = False

    def feed(self, chunk: bytes) -> None:
        if self._done:
            return
        lines = (self._line + chunk).split(b"\n")
        self._line = lines.pop()[:16]  # only a line's start matters
        for line in lines:
            if line in (b"", b"\r"):  # the end of the header
                self._done = True
                return
            if line[:9].lower() == b"received:":
                self.hops += 1


def next_delay(attempts: int, minimum: float, maximum: float, spread: float = 0.5) -> float:
    """Capped exponential backoff: min, 2*min, 4*min ... never above max.

    `spread` (a uniform draw in [0, 1) from the caller; 0.5 means none)
    scales the delay by 1 +/- JITTER, so that messages deferred together by
    one outage do not all come back in the same second.
    """
    if attempts <= 0:
        return 0.0
    base = min(maximum, minimum * (2 ** min(attempts - 1, 32)))
    return float(min(maximum, base * (1 - JITTER + 2 * JITTER * spread)))


def due(next_try: float, now: float, retry_max: float) -> bool:
    """Is a message due? A next try further away than the longest retry delay can
    be means the clock went back since it was set: it is due now, not in years."""
    return next_try <= now or next_try > now + retry_max * (1 + JITTER) + 1


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
