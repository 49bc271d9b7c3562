"""Issue 12 §3: "is this smarthost one of my listen addresses" (config.own_listener)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core import config


@pytest.mark.parametrize(
    ("host", "port", "listen", "expected"),
    [
        ("127.0.0.1", 25, ["127.0.0.1:25", "[::1]:25"], "127.0.0.1:25"),
        ("::1", 25, ["127.0.0.1:25", "[::1]:25"], "[::1]:25"),
        ("localhost", 2525, ["[::1]:2525"], "[::1]:2525"),
        ("LOCALHOST.", 2525, ["127.0.0.1:2525"], "127.0.0.1:2525"),
        ("mx.localhost", 25, ["127.0.0.1"], "127.0.0.1"),  # RFC 6761: loopback
        ("::ffff:127.0.0.1", 25, ["127.0.0.1:25"], "127.0.0.1:25"),
        ("127.0.0.1", 25, ["::ffff:127.0.0.1:25"], ""),  # not a listen form we accept
        ("127.0.0.2", 25, ["0.0.0.0:25"], "0.0.0.0:25"),  # the wildcard gets all of 127/8
        ("0.0.0.0", 25, ["0.0.0.0:25"], "0.0.0.0:25"),
        ("::1", 25, ["[::]:25"], "[::]:25"),
        ("127.0.0.1", 25, ["[::]:25"], ""),  # IPV6_V6ONLY: :: does not take IPv4
        ("127.0.0.2", 25, ["127.0.0.1:25"], ""),  # another address: not our socket
        ("127.0.0.1", 26, ["127.0.0.1:25"], ""),
        ("mail.example.org", 25, ["0.0.0.0:25"], ""),  # a name: only its addresses tell
        ("192.0.2.1", 25, ["0.0.0.0:25"], ""),  # not known to be ours without asking
        ("127.0.0.1", 25, [], ""),
        ("127.0.0.1", 25, ["not an address"], ""),  # check_config reports those
    ],
)
def test_own_listener(host: str, port: int, listen: list[str], expected: str) -> None:
    assert config.own_listener(host, port, listen) == expected


@given(st.integers(1, 65535), st.integers(1, 65535), st.ip_addresses(v=4))
def test_a_port_apart_is_never_a_loop(port: int, other: int, ip: object) -> None:
    listen = [f"{ip}:{port}", f"0.0.0.0:{port}", f"[::]:{port}"]
    assert bool(config.own_listener(str(ip), other, listen)) == (port == other)


def test_the_default_configuration_relays_to_its_own_listener() -> None:
    cfg = config.parse("")
    assert cfg.loop_reason() == ("smarthost [127.0.0.1]:25 is this relayq's own listener "
                                 "(listen 127.0.0.1:25)")
    assert config.parse('smarthost = "[mail.example.org]:587"').loop_reason() == ""
    assert config.parse('listen = ["127.0.0.1:2525"]').loop_reason() == ""
    assert config.parse("listen = []").loop_reason() == ""
    two = config.parse('smarthost = ["[mail.example.org]", "localhost:2525"]\n'
                       'listen = ["[::1]:2525"]')
    assert two.loop_reason() == ("smarthost localhost:2525 is this relayq's own listener "
                                 "(listen [::1]:2525)")


HEADER = (b"Received: from a.example.org\r\n\tby b.example.org; Tue, 1 Dec 2026\r\n"
          b"RECEIVED: from c.example.org\nX-Note: Received: not a field\n"
          b"received: by d.example.org\nSubject: x\n\nReceived: in the body\n")


@given(st.lists(st.integers(0, len(HEADER)), max_size=8))
def test_hop_counter_is_the_same_for_any_split(cuts: list[int]) -> None:
    from relayq.core.policy import HopCounter

    counter = HopCounter()
    edges = [0, *sorted(cuts), len(HEADER)]
    for a, b in itertools.pairwise(edges):
        counter.feed(HEADER[a:b])
    assert counter.hops == 3


def test_hop_refusal_is_the_one_rule() -> None:
    from relayq.core.policy import MAX_HOPS, hop_refusal

    assert hop_refusal(MAX_HOPS - 1) == ""
    assert hop_refusal(MAX_HOPS) == "Too many hops 25 (25 max): message refused (mail loop?)"


def test_the_transport_sees_a_loop_by_address_or_by_our_name() -> None:
    from relayq.delivery.smtp_transport import loop_reason
    from relayq.smtp.protocol import Reply

    theirs = Reply(220, ("smarthost.example.org ESMTP",))
    ours = Reply(250, ("HOST.example.org.", "PIPELINING"))
    listen = ["127.0.0.1:2525"]
    assert loop_reason("127.0.0.1", 25, listen, "host.example.org", theirs) == ""
    assert loop_reason("127.0.0.1", 2525, listen, "host.example.org", theirs) == (
        "smarthost [127.0.0.1]:2525 is this relayq's own listener (listen 127.0.0.1:2525)")
    assert loop_reason("192.0.2.1", 25, listen, "host.example.org", theirs, ours) == (
        "smarthost [192.0.2.1]:25 greets as HOST.example.org., this relayq's own name")
    # names many hosts share prove nothing
    for name in ("localhost", "localhost.localdomain", "vm"):
        same = Reply(220, (f"{name} ESMTP",))
        assert loop_reason("192.0.2.1", 25, listen, name, same) == ""
    assert loop_reason("192.0.2.1", 25, listen, "host.example.org", Reply(220, ("",))) == ""
