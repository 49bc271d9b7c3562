"""`relayq oauth2 login|import|status`: the command line of delivery/oauth2_login and
delivery/oauth2_browser (the flows), thin: options, which account, what to print.

`login --output` with --provider, --client-id and --user needs no relayq.toml:
it runs on any machine with a browser and writes the grant to a file that
`relayq oauth2 import` installs on the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relayq.core.errors import EX_OK, ConfigError, UsageError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from relayq.core.config import Config
    from relayq.system.configfile import Source

OAUTH2_MORE = ("An account with oauth2_provider = microsoft, google or generic gets its "
               "AUTH tokens from the provider; login asks the mailbox's consent once (the "
               "device code, or --browser), import installs a grant a login made on "
               "another machine (--output), status shows each account's token file, "
               "never a token. Exit status 77 when the sign-in is declined, 75 when it "
               "timed out or the provider was unreachable, 78 for the application's "
               "configuration.")
LOGIN_MORE = ("Without --browser: the device code flow (Microsoft; a generic provider with "
              "oauth2_device_url): a URL and a code to type there on any device. With "
              "--browser: a URL to open in a browser on this machine, which comes back to "
              "127.0.0.1 (Google's way; over ssh: --port N and ssh -L N:127.0.0.1:N). "
              "--output FILE writes the grant to FILE (mode 0600) instead of the account's "
              "token file; with --provider, --client-id and --user it needs no relayq.toml.")
# the options that describe an account on a machine without relayq.toml, as its keys
LAPTOP = (("provider", "oauth2_provider"), ("client_id", "oauth2_client_id"),
          ("client_secret_file", "oauth2_client_secret_file"), ("user", "user"),
          ("tenant", "oauth2_tenant"), ("scope", "oauth2_scopes"),
          ("authorize_url", "oauth2_authorize_url"), ("token_url", "oauth2_token_url"),
          ("device_url", "oauth2_device_url"))


def add_arguments(command: Callable[..., argparse.ArgumentParser]) -> None:
    """`relayq oauth2` and its actions, in relayq's parser (cli/args)."""
    o = command("oauth2", "OAuth2 accounts: sign a mailbox in (login), install a grant "
                "made elsewhere (import), show the tokens' state (status)", OAUTH2_MORE)
    sub = o.add_subparsers(dest="oauth2_action", required=True, metavar="ACTION")
    login = sub.add_parser("login", help="get the mailbox's consent: the device code, or "
                           "--browser", description="Get the mailbox's consent and store the "
                           "grant. " + LOGIN_MORE)
    login.add_argument("--account", metavar="NAME", help="the account (default: the one "
                       "with oauth2_provider)")
    login.add_argument("--browser", action="store_true", help="authorization code with PKCE "
                       "and a redirect to 127.0.0.1 (Google needs it)")
    login.add_argument("--port", type=int, metavar="N", help="--browser: listen on this port "
                       "(default: any free one)")
    login.add_argument("--timeout", metavar="TIME", default="5m", help="--browser: how long "
                       "to wait for the browser's answer")
    login.add_argument("--output", metavar="FILE", help="write the grant to FILE (0600) for "
                       "relayq oauth2 import on the server")
    login.add_argument("--provider", choices=("microsoft", "google", "generic"),
                       help="--output without relayq.toml: the provider (with --client-id, "
                       "--user)")
    login.add_argument("--client-id", metavar="ID", help="--provider: the application's id")
    login.add_argument("--client-secret-file", metavar="FILE",
                       help="--provider: file holding the client secret (Google's Desktop "
                       "client has one)")
    login.add_argument("--user", metavar="ADDRESS", help="--provider: the mailbox")
    login.add_argument("--tenant", metavar="TENANT", help="--provider microsoft: the tenant")
    login.add_argument("--scope", action="append", metavar="SCOPE",
                       help="--provider: a scope (again for more; default: the provider's)")
    for name in ("authorize", "token", "device"):
        login.add_argument(f"--{name}-url", metavar="URL",
                           help=f"--provider generic: the {name} endpoint")
    imp = sub.add_parser("import", help="install a token file made by login --output",
                         description="Install a token file made by relayq oauth2 login "
                         "--output on another machine, as the account's grant (atomic, "
                         "mode 0600, owned by the queue's owner). The file must hold a "
                         "refresh token and name the account's client id and mailbox.")
    imp.add_argument("file", metavar="FILE", help="the token file")
    imp.add_argument("--account", metavar="NAME", help="the account (default: the one with "
                     "oauth2_provider)")
    st = sub.add_parser("status", help="each OAuth2 account's token: user, refresh token, "
                        "valid until, last refresh, login needed",
                        description="Each OAuth2 account's token file: provider, flow, user, "
                        "whether it holds a refresh token, until when its access token is "
                        "valid, the last refresh, and whether a login is needed (with the "
                        "provider's error). Never a token or a secret.")
    st.add_argument("--account", metavar="NAME", help="only this account")
    st.add_argument("--json", action="store_true", help="one JSON document")


def run(args: argparse.Namespace, source: Source) -> int:
    """The action; the configuration is loaded here (a laptop's login has none)."""
    if args.oauth2_action == "status":
        return status(args, source)
    if args.oauth2_action == "import":
        return import_grant(args, source)
    return login(args, source)


def _usage(message: str) -> UsageError:
    """64, pointing at the action's --help ("login: ..." -> relayq oauth2 login --help)."""
    action = message.partition(":")[0]
    where = f"oauth2 {action}" if action in ("login", "import", "status") else "oauth2"
    return UsageError(f"oauth2 {message} (see relayq {where} --help)")


def _login_options(args: argparse.Namespace) -> float:
    """The login's options that go together; the --timeout in seconds (64 otherwise)."""
    from relayq.core.schema import parse_duration

    if not args.browser and args.port is not None:
        raise _usage("login: --port goes with --browser")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise _usage(f"login: --port {args.port}: expected 0..65535")
    given = [f"--{o.replace('_', '-')}" for o, _ in LAPTOP if getattr(args, o)]
    if given and not args.provider:
        raise _usage(f"login: {given[0]} describes an account with --provider (and --output)")
    if args.provider and not args.output:
        raise _usage("login: --provider goes with --output; without it, the grant is the "
                     "configured account's")
    if args.provider and not (args.client_id and args.user):
        raise _usage("login: --provider needs --client-id and --user")
    try:
        return parse_duration(args.timeout, "--timeout")
    except ConfigError as exc:
        raise _usage(f"login: {exc.message}") from None


def options_account(args: argparse.Namespace) -> Config:
    """The account the options describe (no relayq.toml), checked as config.parse would."""
    from relayq.core import oauth2
    from relayq.core.config import Config
    from relayq.core.schema import SCHEMA

    values: dict[str, Any] = {}
    for option, key in LAPTOP:
        if getattr(args, option):
            try:
                values[key] = SCHEMA[key][1](getattr(args, option), key)
            except ConfigError as exc:
                raise _usage(f"login: --{option.replace('_', '-')}: {exc.message}") from None
    cfg = Config(values, "(command line)", args.account or "default")
    try:
        oauth2.check(cfg, "login")
    except ConfigError as exc:
        text = exc.message
        for option, key in LAPTOP:
            text = text.replace(key, "--" + option.replace("_", "-"))
        raise _usage(text) from None
    return cfg


def account(cfg: Config, name: str | None, action: str) -> Config:
    """The account named, or the one that uses OAuth2 (64 when unknown or ambiguous)."""
    accounts = cfg.accounts()
    if name is not None:
        if name not in accounts:
            raise _usage(f"{action}: no account {name!r} (accounts: {', '.join(accounts)})")
        found = accounts[name]
        if not found.oauth2_provider:
            raise ConfigError(f"{cfg.path}: account {name} does not use OAuth2 "
                              "(set oauth2_provider)")
        return found
    users = [a for a in accounts.values() if a.oauth2_provider]
    if not users:
        raise ConfigError(f"{cfg.path}: no account uses OAuth2 (set oauth2_provider; see "
                          "docs/configuration.md, \"OAuth2: Microsoft 365 and Gmail\")")
    if len(users) > 1:
        raise _usage(f"{action}: several accounts use OAuth2 "
                     f"({', '.join(a.account for a in users)}): name one with --account")
    return users[0]


def _enter(cfg: Config, saving: bool = False) -> None:
    """Root works in the service user's queue as that user, as the other commands do;
    a grant stored before the first mail makes the queue it is kept in."""
    import os

    from relayq.queue.spool import Spool

    spool = Spool(cfg.queue_dir)
    spool.enter(cfg)
    if saving and not os.path.isdir(spool.queue):
        spool.ensure()


def login(args: argparse.Namespace, source: Source) -> int:
    from relayq.core import oauth2
    from relayq.delivery import oauth2_login as flows
    from relayq.delivery.oauth2 import save_grant

    timeout = _login_options(args)
    if args.provider:
        cfg = options_account(args)
    else:
        top = source.load()
        cfg = account(top, args.account, "login")
        if not args.output or cfg.oauth2_flow == "client_credentials":
            _enter(top, saving=True)  # the grant goes to the queue: as its owner
    if cfg.oauth2_flow == "client_credentials":
        return _app_only(cfg)
    path = args.output or oauth2.token_file(cfg)
    flows.writable_target(path)
    answer = _browser(cfg, args.port or 0, timeout) if args.browser else _device(cfg)
    record = flows.grant_record(cfg, answer)  # a grant without a refresh token is none
    if args.output:
        flows.write_output(args.output, record)
        print(f"Signed in: the grant for {cfg.user} is in {args.output} (mode 0600). "
              f"On the server: relayq oauth2 import {args.output}"
              + (f" --account {args.account}" if args.account else "") + "; then delete the file "
              "here, it is as good as a password.")
    else:
        save_grant(cfg, answer)
        print(f"Signed in: account {cfg.account}'s grant for {cfg.user} is saved in {path}.")
    return EX_OK


def _device(cfg: Config) -> dict[str, Any]:
    from relayq.delivery import oauth2_login as flows

    dev = flows.device_start(cfg)
    print(flows.device_prompt(cfg, dev), flush=True)
    return flows.device_poll(cfg, dev)


def _browser(cfg: Config, port: int, timeout: float) -> dict[str, Any]:
    from relayq.delivery.oauth2_browser import BrowserLogin, open_browser

    with BrowserLogin(cfg, port) as flow:
        url = flow.url()
        print(f"To let relayq send as {cfg.user} (account {cfg.account}), open this URL in a "
              "browser on this machine and sign in:\n\n"
              f"    {url}\n\n"
              f"The browser comes back to {flow.redirect_uri}; waiting at most "
              f"{_duration(timeout)} (Ctrl-C stops)...", flush=True)
        open_browser(url)
        code = flow.wait(timeout)
        return flow.finish(code)


def _app_only(cfg: Config) -> int:
    """client_credentials: nobody signs in; a token proves the application's keys."""
    from relayq.delivery.oauth2_login import account_status, app_token

    app_token(cfg)
    row = account_status(cfg)
    print(f"Account {cfg.account} uses client_credentials (app-only): no login is needed. "
          f"A token was obtained, valid until {row['access_token_valid_until']}.")
    return EX_OK


def import_grant(args: argparse.Namespace, source: Source) -> int:
    from relayq.core import oauth2
    from relayq.delivery import oauth2_login as flows
    from relayq.delivery.oauth2 import save_grant

    data = flows.read_import(args.file)  # before root becomes the queue's owner
    top = source.load()
    cfg = account(top, args.account, "import")
    if cfg.oauth2_flow == "client_credentials":
        raise ConfigError(f"{top.path}: account {cfg.account} uses client_credentials: it "
                          "has no mailbox grant to import")
    _enter(top, saving=True)
    path = oauth2.token_file(cfg)
    flows.writable_target(path)
    save_grant(cfg, flows.import_answer(cfg, data, args.file))
    print(f"Imported: account {cfg.account}'s grant for {cfg.user} is saved in {path}. "
          f"Delete {args.file}: it is as good as a password.")
    return EX_OK


def status(args: argparse.Namespace, source: Source) -> int:
    import json

    from relayq.delivery.oauth2_login import account_status

    top = source.load()
    if args.account is not None:
        chosen = [account(top, args.account, "status")]
    else:
        chosen = [a for a in top.accounts().values() if a.oauth2_provider]
    _enter(top)
    rows = [account_status(a) for a in chosen]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("No account uses OAuth2 (oauth2_provider).")
    else:
        print("\n".join(_show(row) for row in rows))
    return EX_OK


def _show(row: dict[str, Any]) -> str:
    who = f" as {row['user']}" if row["user"] else ""
    lines = [f"account {row['account']}: {row['provider']}, {row['flow']}{who}",
             f"  token file     {row['token_file']}"
             + ("" if row["token_file_exists"] or row["error"] else " (none yet)")]
    if row["error"]:
        return "\n".join([*lines, f"  unreadable     {row['error']}"])
    until = row["access_token_valid_until"]
    lines += [f"  refresh token  {'yes' if row['has_refresh_token'] else 'no'}",
              "  access token   " + ("none" if until is None else
                                     f"{'valid until' if row['access_token_valid'] else 'expired'}"
                                     f" {until}"),
              f"  last refresh   {row['last_refresh'] or 'never'}"]
    if row["reauth_needed"]:
        since = f" (since {row['reauth_since']})" if row["reauth_since"] else ""
        lines.append(f"  login needed   yes: {row['reauth_error']}{since}: run relayq oauth2 "
                     f"login --account {row['account']}")
    else:
        lines.append("  login needed   no")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min" if seconds >= 120 else f"{int(seconds)} s"
