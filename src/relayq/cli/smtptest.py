"""`relayq test [ADDRESS]`: show what each smarthost of each account answers
(delivery/probe), and send a test message only when ADDRESS is given."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config
    from relayq.delivery.probe import TestMessage

TEST_MORE = (
    "For each smarthost in order, as a queue run would connect (same TLS, AUTH and "
    "timeouts, as the delivering user): the greeting, the EHLO name and extensions, TLS "
    "version, cipher, certificate subject, issuer, expiry and verification, and AUTH "
    "(secrets masked). Without ADDRESS no message is sent (QUIT after AUTH). Exit status: "
    "0 all well; 78 configuration (an unreadable password_file, ca_file, a relay loop); "
    "69 no connection or greeting; 76 TLS (handshake, certificate, no STARTTLS when "
    "required); 77 AUTH; 65 test message refused (5xx); 75 test message deferred (4xx). "
    "With several smarthosts, the first of these in that order that any had. With "
    "[account.NAME] tables, every account's smarthosts in turn, each named (--account "
    "NAME: that one's only); an account's test message goes from an address it serves.")


def run(cfg: Config, address: str | None, verbose: bool = False, account: str = "") -> int:
    """Probe every smarthost of every account (or of `account`); print each report;
    the worst outcome's exit status."""
    from relayq.delivery import probe

    show = (lambda line: print(f"  {probe.visible(line)}", flush=True)) if verbose else None
    codes = []
    for acc in _accounts(cfg, account):
        message = _message(acc, address) if address is not None else None
        codes += _probe(acc, message, show, len(cfg.accounts()) > 1 or bool(account))
    return probe.worst(codes)


def _accounts(cfg: Config, name: str) -> list[Config]:
    """The accounts to test: all (the default first), or the one --account names."""
    from relayq.core.errors import EX_USAGE, RelayqError

    accounts = cfg.accounts()
    if not name:
        return list(accounts.values())
    if name not in accounts:
        raise RelayqError(f"test: no account {name!r} (accounts: {', '.join(accounts)})",
                          EX_USAGE)
    return [accounts[name]]


def _probe(cfg: Config, message: TestMessage | None, show: Callable[[str], None] | None,
           named: bool) -> list[int]:
    """One account's smarthosts, each named (with the account's name when there are
    several accounts), as a queue run for that account would meet them."""
    from relayq.delivery import probe

    codes = []
    for sh in cfg.smarthosts():
        print(f"smarthost {sh!r}" + (f" (account {cfg.account})" if named else ""), flush=True)
        report = probe.probe(cfg, sh, message, show)
        for label, text in report.lines:
            print(f"  {label + ':':<13}{text}", flush=True)
        print(f"  {'result:':<13}{probe.OUTCOMES[report.code]} (exit status {report.code})",
              flush=True)
        if report.code:  # and one line on stderr for cron and scripts
            problem = next(text for label, text in reversed(report.lines) if label == "problem")
            where = f"{sh!r}" + (f" (account {cfg.account})" if named else "")
            print(f"relayq: test: {where}: {problem}", file=sys.stderr, flush=True)
        codes.append(report.code)
    return codes


def _message(cfg: Config, address: str) -> TestMessage:
    from relayq.cli.submission import user_names
    from relayq.core import address as addr
    from relayq.core.errors import EX_USAGE, RelayqError
    from relayq.delivery import probe
    from relayq.queue.submit import Context, sender_addresses

    ctx = Context(cfg)
    try:
        rcpt = addr.qualify(addr.parse_mailbox(address, "address"), ctx.domain)
    except RelayqError as exc:
        raise RelayqError(f"test: {exc}", EX_USAGE) from None
    if not rcpt:
        raise RelayqError("test: the test message needs a recipient, not <>", EX_USAGE)
    user = user_names()[0]
    if cfg.senders:  # an account's test goes from an address it serves
        first = cfg.senders[0]
        sender = f"{user}{first}" if first.startswith("@") else first
        return probe.TestMessage(rcpt, sender, sender)
    _, sender, from_header = sender_addresses(ctx, user)
    if cfg.rewrite_from:  # as a queued message would go (queue/submit._own_from)
        from relayq.core.rewrite import own_address

        sender = from_header = own_address(cfg.from_address, cfg.user)
    return probe.TestMessage(rcpt, sender, from_header)
