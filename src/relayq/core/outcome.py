"""What became of a recipient: the one set of words transports, envelope and runner use.

A recipient's recorded state (the queue file's `rcpt` lines) is PENDING,
SENT or FAILED; one attempt's outcome for it (what a transport returns) is
SENT, FAILED or DEFERRED (a deferred recipient stays PENDING). The strings
are the queue file format: they never change, or old queue files would not
read.

Plain str constants, not an enum: the envelope is on the sendmail
submission path, where `enum` (with functools) is not yet imported and
would cost more than the rest of this module (python -X importtime).
"""

from __future__ import annotations


class Status:
    """The words, one place (Status.SENT == "sent"); module-level aliases below."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    DEFERRED = "deferred"


PENDING = Status.PENDING
SENT = Status.SENT
FAILED = Status.FAILED
DEFERRED = Status.DEFERRED
STATES = (PENDING, SENT, FAILED)  # recorded for a recipient
OUTCOMES = (SENT, FAILED, DEFERRED)  # of one attempt


class Outcome:
    """What happened to one recipient in one attempt (a transport's answer)."""

    __slots__ = ("address", "dsn_code", "remote", "reply", "status", "unsure")

    def __init__(self, address: str, status: str, reply: str, dsn_code: str,
                 remote: bool = False, unsure: bool = False) -> None:
        self.address = address
        self.status = status  # SENT | FAILED | DEFERRED
        self.reply = reply  # the server's words, or ours for local decisions
        self.dsn_code = dsn_code
        self.remote = remote  # the reply is the server's words (Diagnostic-Code: smtp)
        self.unsure = unsure  # no reply after the final dot: the relay may have it already

    def _key(self) -> tuple[str, str, str, str, bool, bool]:
        return (self.address, self.status, self.reply, self.dsn_code, self.remote, self.unsure)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Outcome) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaces

    def __repr__(self) -> str:
        return (f"Outcome({self.address!r}, {self.status!r}, {self.reply!r}, "
                f"{self.dsn_code!r}, remote={self.remote}, unsure={self.unsure})")
