"""Context.route: the one decision of where a recipient goes, shared by enqueue() and
`sendmail -bv`; the runner's local transport must agree with it on what is local."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayq.core.config import Config, parse
from relayq.delivery.local_transport import LocalTransport
from relayq.queue.submit import FORWARD, LOCAL, RELAY, Context

locals_ = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12)
domains = st.sampled_from(["", "host.example.org", "HOST.example.org.", "localhost",
                           "example.net", "other.example.org"])


def settings(local_delivery: bool, forward: str) -> tuple[Config, Context]:
    cfg = parse(f"domain = 'host.example.org'\nlocal_delivery = {str(local_delivery).lower()}\n"
                f"local_forward = '{forward}'\n"
                "local_domains = ['host.example.org', 'localhost']\n")
    return cfg, Context(cfg)


CONTEXTS = {(d, f): settings(d, f) for d in (False, True) for f in ("", "admin@example.org")}


@pytest.mark.parametrize(("local_delivery", "forward"), list(CONTEXTS))
@given(local=locals_, domain=domains)
def test_route(local_delivery: bool, forward: str, local: str, domain: str) -> None:
    cfg, ctx = CONTEXTS[(local_delivery, forward)]
    rcpt = f"{local}@{domain}" if domain else local
    kind, where = ctx.route(rcpt)
    runner_local = LocalTransport(cfg, ctx.domain, ctx.forward_domains).is_local(rcpt)
    if local_delivery:
        assert (kind == LOCAL) == runner_local  # the runner delivers exactly these here
        assert kind != FORWARD  # local delivery wins: no forward address then
    elif forward and runner_local:
        assert (kind, where) == (FORWARD, forward)
    else:
        assert (kind, where) == (RELAY, rcpt)

