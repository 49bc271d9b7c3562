"""What a HostileRelay is told to do wrong, and what it records (relayq.testing.hostile)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Where a fault can strike. "ehlo_tls" is the EHLO after the TLS handshake;
# "message" strikes right after the n-th message's 250 (in the same write);
# "data_stream" is the message text after 354 (then="stall" stops reading).
STEPS = ("greeting", "ehlo", "helo", "starttls", "ehlo_tls", "auth", "mail", "rcpt", "data",
         "data_stream", "eod", "rset", "message", "quit")
THEN = ("", "close", "reset", "stall", "flood")


@dataclass(frozen=True)
class Fault:
    """At the `nth` `step` of a connection (and later ones with `and_after`): send `reply`.

    then: "" go on; "close" FIN; "reset" RST (SO_LINGER 0); "stall" neither read
    nor answer until the client gives up; "flood" send reply bytes without end.
    accept (at "eod"): commit the message before misbehaving, as a relay
    that took it but whose answer never arrived. In a reply, b"{echo}" becomes
    what the client sent in AUTH, decoded (a server quoting the credentials).
    """

    step: str
    reply: bytes = b""
    nth: int = 1
    and_after: bool = False
    then: str = ""
    accept: bool = False

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise ValueError(f"unknown step {self.step!r}")
        if self.then not in THEN:
            raise ValueError(f"unknown then {self.then!r}")


@dataclass
class Delivery:
    """One transaction that reached the end of data."""

    connection: int
    mail_from: str
    rcpt_tos: list[str]
    mail_params: list[str]
    data: bytes  # dot-unstuffed, CRLF line ends
    committed: bool  # the relay took responsibility (would deliver it)
    answered: bool  # ... and wrote its 250 to the client
    tls: bool


@dataclass
class Connection:
    number: int
    commands: list[tuple[bool, str]] = field(default_factory=list)  # (in TLS, line); AUTH masked
    tls: bool = False
    auth_user: str = ""
