"""The pure parts of the SMTP session (relayq.server.handler, relayq.server.sockets)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core.config import Config
from relayq.queue.submit import Context
from relayq.server.handler import DEFAULT_SIZE, State, _trace, enhance, one_line, take_params
from relayq.server.sockets import _is_loopback
from relayq.system.log import Log


@pytest.mark.parametrize(("line", "want"), [
    ("250 Ok", "250 2.0.0 Ok"),
    ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
    ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
    ("220 relay.example ESMTP relayq", "220 relay.example ESMTP relayq"),  # the greeting
    ("250-PIPELINING", "250-PIPELINING"),  # a continuation line: no space after the code
    ("599 odd", "599 5.0.0 odd"),  # a code not in the table: its class
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
])
def test_a_reply_gets_an_enhanced_code_once(line: str, want: str) -> None:
    assert enhance(line) == want
    assert enhance(want) == want


@given(st.lists(st.sampled_from(["RET=HDRS", "ENVID=aB+2C", "SIZE=10", "BODY=8BITMIME",
                                 "ret=full", "X=1"]), max_size=5))
def test_taken_parameters_leave_the_rest_in_order(words: list[str]) -> None:
    arg = " ".join(["FROM:<a@example.org>", *words])
    rest, taken = take_params(arg, ("RET", "ENVID"))
    kept = [w for w in words if w.split("=")[0].upper() not in ("RET", "ENVID")]
    assert rest == " ".join(["FROM:<a@example.org>", *kept])
    for w in words:
        key, _, _ = w.partition("=")
        if key.upper() in ("RET", "ENVID"):
            assert key.upper() in taken
    if "ENVID=aB+2C" in words:
        assert taken["ENVID"] == "aB+2C"  # xtext is case-sensitive: kept as written


def test_a_bare_address_argument_keeps_its_first_word() -> None:
    assert take_params("FROM:a@example.org RET=HDRS", ("RET",)) == (
        "FROM:a@example.org", {"RET": "HDRS"})


def test_one_line_flattens_and_bounds_a_reply_text() -> None:
    assert one_line("a\r\nb\tc  d") == "a b c d"
    assert len(one_line("x " * 500)) == 300


@pytest.mark.parametrize(("session", "user", "peer_user", "want"), [
    (SimpleNamespace(host_name="client.example.org", peer=("127.0.0.1", 4000)), "smtp", "",
     "client.example.org (localhost [127.0.0.1])"),
    (SimpleNamespace(host_name="c", peer=("::1", 4000)), "smtp", "alice",
     "c (alice@localhost [::1])"),
    (SimpleNamespace(host_name="evil\r\nX-Injected: 1 (", peer=None), "bob", "",
     "evilX-Injected:1 (bob@localhost)"),
    (SimpleNamespace(host_name=None, peer=None), "bob", "", "unknown (bob@localhost)"),
])
def test_the_received_clause_keeps_only_harmless_helo_characters(
    session: object, user: str, peer_user: str, want: str
) -> None:
    assert _trace(session, user, peer_user) == want


def test_state_counts_connections_in_its_slot_and_sums_all() -> None:
    cfg = Config({})
    state = State(cfg, Log(use_syslog=False), Context(cfg), user="smtp", uid=0,
                  strict=True, on_commit=None)
    state.counts = memoryview(bytearray(32)).cast("q")  # as prefork shares it: 4 slots
    state.counts[3] = 2  # another listener process's connections
    state.connected(1)
    assert state.active == 3
    state.connected(-1)
    assert state.active == 2
    assert state.size_limit == (cfg.max_message_size or DEFAULT_SIZE)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("fe80::1%lo", False), ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("::", False),
])
def test_which_addresses_are_loopback(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback
