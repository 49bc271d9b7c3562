"""A tiny UDP DNS responder on loopback for MX lookup tests.

Answers from a dict such as
``{"example.org": {"MX": ["10 mx1.example.org."]}, "mx1.example.org": {"A": ["127.0.0.1"]}}``:
a known name without the asked type gets an empty NOERROR answer, an
unknown name NXDOMAIN. `faults` makes a question ("example.org MX") fail the
way a broken or unreachable name server does: "SERVFAIL" (or another rcode
name) is answered with that rcode, "timeout" is never answered. It runs in a
thread; `queries` records what was asked.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

if TYPE_CHECKING:
    from types import TracebackType


class DnsResponder:
    def __init__(self, records: dict[str, dict[str, list[str]]], host: str = "127.0.0.1",
                 *, faults: dict[str, str] | None = None) -> None:
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.faults = {k.lower(): v for k, v in (faults or {}).items()}
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def server(self) -> str:
        """The `dns_servers` entry for this responder ("ip:port")."""
        return f"{self.host}:{self.port}"

    def start(self) -> DnsResponder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> DnsResponder:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                query = dns.message.from_wire(wire)
            except Exception:
                continue
            resp = self.answer(query)
            if resp is not None:
                self._sock.sendto(resp.to_wire(), peer)

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to `query`; None: leave it unanswered (a "timeout" fault)."""
        resp = dns.message.make_response(query)
        for q in query.question:
            name = q.name.to_text(omit_final_dot=True).lower()
            rtype = dns.rdatatype.to_text(q.rdtype)
            self.queries.append((name, rtype))
            fault = self.faults.get(f"{name} {rtype.lower()}")
            if fault == "timeout":
                return None
            if fault:
                resp.set_rcode(dns.rcode.from_text(fault))
                continue
            if name not in self.records:
                resp.set_rcode(dns.rcode.NXDOMAIN)
                continue
            values = self.records[name].get(rtype, [])
            if values:
                resp.answer.append(dns.rrset.from_text_list(q.name, 60, dns.rdataclass.IN,
                                                            rtype, values))
        return resp
