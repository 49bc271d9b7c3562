"""relayq check-config: the effective configuration, and what in it will not work.

The printout is valid TOML that, used as the configuration file, gives the same
effective configuration: every key of core.config.SCHEMA (a key added there
prints without a change here) with the value relayq really uses. The values a
key's default leaves to be worked out at run time (the mail domain, the EHLO
name, the smarthosts' ports, tls with a password, the local domains) are
printed worked out, with a comment saying from what. Secrets stay masked.

Then the checks (docs/configuration.md, "Checking the configuration"): a
failure is what stops mail altogether (exit 78, EX_CONFIG), a warning what
works badly or not as the file seems to mean (exit 0). Each is one line on
stderr. Files and commands are read as the user that delivers (the daemon_user
or the queue's owner), through the code delivery itself uses.
"""

from __future__ import annotations

import os
import sys

from relayq.core.config import SCHEMA, Config
from relayq.core.errors import EX_CONFIG, EX_OK, ConfigError, RelayqError
from relayq.core.tomlout import toml_key, toml_value

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable

Problem = tuple[bool, str, str]  # (fatal, key, text)


def run(cfg: Config, unread: str = "") -> int:
    """Print the effective configuration, then its problems; 78 if one stops mail.

    `unread`: an ordinary user may not read a private system file (0600 or 0640 root,
    it may hold a password), and then gets the defaults, which are not the file's:
    checking those would report problems the file does not have. That user is told
    the file is private and that their sendmail hands mail to the daemon, with exit
    0: a private file is the documented setup, not a fault (only root, or the
    service user, can check its contents).
    """
    if unread:
        print(f"# {_clean(cfg.path)}: cannot be read by uid {os.getuid()} ({unread}): not "
              "checked; this user's sendmail hands mail to the daemon, which reads it"
              " (run check-config as root to check the file)")
        return EX_OK
    sys.stdout.write(render(cfg))
    sys.stdout.flush()
    found = problems(cfg)
    for fatal, key, text in found:
        kind = "" if fatal else "warning: "
        print(f"relayq: {cfg.path}: {kind}{key}: {text}", file=sys.stderr)
    return EX_CONFIG if any(fatal for fatal, _, _ in found) else EX_OK


# --- the printout ---------------------------------------------------------------

def render(cfg: Config) -> str:
    """The effective configuration as TOML, one line per SCHEMA key."""
    values = cfg.effective()
    worked_out = derived(cfg)
    lines = [f"# {_clean(cfg.path)}: the effective configuration (relayq check-config)"]
    for key in SCHEMA:
        value, note = worked_out.get(key, (values[key], ""))
        line = f"{toml_key(key)} = {toml_value(value)}"
        lines.append(f"{line}  # {_clean(note)}" if note else line)
    for acc in list(cfg.accounts().values())[1:]:
        lines += ["", *_account_table(cfg, acc)]
    return "\n".join(lines) + "\n"


def _account_table(top: Config, acc: Config) -> list[str]:
    """One account as the table [account.NAME] that reads back to it: its senders,
    every key it owns (its value, or the default it gets: never the top level's),
    and the inherited keys its table sets. Secrets masked, as at the top level."""
    from relayq.core.accounts import INHERITED, OWN

    table = top.values.get("account", {}).get(acc.account, {})
    values = acc.effective()
    worked_out = {k: v for k, v in derived(acc).items() if k in OWN}
    lines = [f"[account.{toml_key(acc.account)}]",
             f"senders = {toml_value(acc.senders)}"]
    for key in SCHEMA:
        if key in OWN or (key in INHERITED and key in table):
            value, note = worked_out.get(key, (values[key], ""))
            line = f"{toml_key(key)} = {toml_value(value)}"
            lines.append(f"{line}  # {_clean(note)}" if note else line)
    return lines


def derived(cfg: Config) -> dict[str, tuple[object, str]]:
    """The values relayq works out at run time: key -> (value, from what)."""
    from relayq.system import hostname

    out: dict[str, tuple[object, str]] = {}
    given = cfg.values
    domain, source = hostname.mail_domain_from(cfg.domain)
    if source != "domain":
        out["domain"] = (domain, f"from {source}")
    ehlo, source = hostname.smtp_name_from(cfg.ehlo_name, cfg.domain)
    if source != "ehlo_name":
        out["ehlo_name"] = (ehlo, f"from {source}")
    hosts = cfg.smarthosts()
    port = hosts[0].port if hosts else 25
    if not cfg.port:
        why = 'tls = "implicit"' if cfg.tls == "implicit" else "the default"
        out["port"] = (465 if cfg.tls == "implicit" else 25, f"{why} (port = 0)")
    shown = [repr(h) for h in hosts]
    notes = [f"{h.host}: MX lookup" for h in hosts if h.mx]
    if shown != list(cfg.smarthost):
        notes.append(f"ports made explicit (port {port} for those without one)")
    if notes:
        out["smarthost"] = (shown, "; ".join(notes))
    if "tls" not in given and cfg.tls != SCHEMA["tls"][0]:
        out["tls"] = (cfg.tls, "a password is set")
    if "queue_dir" not in given:
        out["queue_dir"] = (cfg.queue_dir, f"the default for uid {os.getuid()} and this file")
    if not cfg.smtp_processes:
        from relayq.server.prefork import MAX_PROCESSES, wanted

        out["smtp_processes"] = (wanted(cfg), f"one per CPU ({os.cpu_count()}), at most "
                                 f"{MAX_PROCESSES} (smtp_processes = 0)")
    from relayq.core.config import PROVIDER_LIMITS

    for key in PROVIDER_LIMITS.get(cfg.oauth2_provider, {}):
        if key not in given:
            out[key] = (getattr(cfg, key), f'oauth2_provider = "{cfg.oauth2_provider}" '
                        "(the provider's own limit)")
    if not cfg.local_domains:
        out["local_domains"] = (sorted(hostname.local_domains(domain)),
                                "this host's names and the mail domain")
    return out


def _clean(text: str) -> str:
    """A comment stays on its line."""
    return "".join(c if c.isprintable() else "?" for c in text)


# --- the checks -----------------------------------------------------------------

def problems(cfg: Config) -> list[Problem]:
    """Every failure and warning, in SCHEMA's order of the keys they name."""
    found: list[Problem] = []
    for check in (_smarthost, _listen, _names, _queue, _clear_auth, _daemon_user, _timing):
        found += check(cfg)
    for acc in _accounts(cfg):  # (an account's loop: in _smarthost, cfg.loop_reason)
        found += _named(acc, _clear_auth(acc))
    found += as_delivery_user(cfg, lambda c: _files(c) + [
        p for acc in _accounts(c) for p in _named(acc, _files(acc))])
    order = list(SCHEMA)
    return sorted(found, key=lambda p: (not p[0], order.index(p[1]) if p[1] in order else 0))


def _accounts(cfg: Config) -> list[Config]:
    """The [account.NAME] tables' accounts (the default is the top level)."""
    return list(cfg.accounts().values())[1:]


def _named(acc: Config, found: list[Problem]) -> list[Problem]:
    """An account's problems, each naming the account: `account shop: password_file`."""
    return [(fatal, f"account {acc.account}: {key}", text) for fatal, key, text in found]


def _smarthost(cfg: Config) -> list[Problem]:
    out: list[Problem] = []
    reason = cfg.loop_reason()
    if reason:
        out.append((True, "smarthost", f"{reason}: mail would loop back to me; set "
                    "smarthost to your relay (or listen to other addresses)"))
    if "smarthost" not in cfg.values:
        out.append((False, "smarthost", f"not set: mail goes to {cfg.smarthost[0]} port "
                    f"{cfg.smarthosts()[0].port}; set smarthost to your relay"))
    return out


def _listen(cfg: Config) -> list[Problem]:
    """What the daemon's listener refuses (server.sockets.check_config), the loop apart."""
    if not cfg.listen:
        return []  # no listener: fine for a queue runner
    from relayq.server.sockets import check_config

    try:
        check_config(cfg)
    except ConfigError as exc:
        if not cfg.loop_reason():
            text = str(exc).removeprefix("listen: ")
            return [(True, "listen", f"{text} (the SMTP listener refuses to start)")]
    return []


def _names(cfg: Config) -> list[Problem]:
    from relayq.system import hostname

    out: list[Problem] = []
    domain, source = hostname.mail_domain_from(cfg.domain)
    if "." not in domain:
        out.append((False, "domain", f"{domain!r} (from {source}) is not a fully qualified "
                    f"domain: mail goes out from root@{domain}, which relays refuse or "
                    "cannot answer; set domain (or /etc/mailname)"))
    if cfg.local_forward and cfg.local_delivery:
        out.append((False, "local_forward", "is not used with local_delivery = true (local "
                    "delivery wins; put root: <address> in the aliases instead)"))
    ehlo, source = hostname.smtp_name_from(cfg.ehlo_name, cfg.domain)
    if "." not in ehlo:
        out.append((False, "ehlo_name", f"EHLO {ehlo} (from {source}) is not a fully "
                    "qualified name: relays that require one refuse it; set ehlo_name"))
    if cfg.masquerade_as and "." not in cfg.masquerade_as:
        out.append((False, "masquerade_as", f"{cfg.masquerade_as!r} is not a fully "
                    "qualified domain"))
    return out


def _queue(cfg: Config) -> list[Problem]:
    if os.path.isabs(cfg.queue_dir):
        return []
    return [(True, "queue_dir", f"{cfg.queue_dir!r} is relative: each program would queue "
             "in its own working directory, where no queue run finds the mail; give an "
             "absolute path")]


def _clear_auth(cfg: Config) -> list[Problem]:
    """tls = "none" with a user: AUTH is never sent in clear but to a loopback address."""
    if not cfg.user or cfg.tls != "none":
        return []
    from relayq.smtp.client import is_loopback

    def loopback(host: str) -> bool:  # a name's addresses are not known before DNS
        name = host.rstrip(".").lower()
        return name == "localhost" or name.endswith(".localhost") or is_loopback(name)

    far = [repr(h) for h in cfg.smarthosts() if not loopback(h.host)]
    if not far:
        return []
    return [(True, "tls", f'"none" with user set: relayq never sends AUTH in clear text to '
             f'{", ".join(far)}, so the relay cannot authenticate it; set tls = "required" '
             'or "implicit"')]


def _daemon_user(cfg: Config) -> list[Problem]:
    if not cfg.daemon_user:
        return []
    import pwd

    try:
        pwd.getpwnam(cfg.daemon_user)
    except KeyError:
        return [(True, "daemon_user", f"no such user {cfg.daemon_user!r}: the daemon "
                 "cannot start")]
    return []


def _timing(cfg: Config) -> list[Problem]:
    if cfg.delay_warning and cfg.max_queue_age and cfg.delay_warning >= cfg.max_queue_age:
        return [(False, "delay_warning", "not less than max_queue_age: the message is "
                 "bounced before the warning would be sent")]
    return []


def _oauth2(cfg: Config) -> list[Problem]:
    """The client secret file readable, and the token file's state (relayq oauth2 login)."""
    from relayq.core.errors import RelayqError
    from relayq.delivery.oauth2 import client_secret, token_store
    from relayq.smtp.client import AuthFailed

    out: list[Problem] = []
    try:
        client_secret(cfg)
    except AuthFailed as exc:
        out.append((True, "oauth2_client_secret_file", str(exc)))
    store = token_store(cfg)
    try:
        data = store.load()
    except RelayqError as exc:
        return [*out, (True, "oauth2_token_file", exc.message)]
    if "reauth" in data:
        out.append((True, "oauth2_provider", f"the grant was refused "
                    f"({data['reauth'].get('error', '')}): run relayq oauth2 login"))
    elif cfg.oauth2_flow == "refresh_token" and not data.get("refresh_token"):
        out.append((False, "oauth2_provider", f"no token yet in {store.path}: "
                    "run relayq oauth2 login"))
    return out


def _files(cfg: Config) -> list[Problem]:
    """The secret and the TLS files, read as delivery reads them."""
    from relayq.delivery.smtp_connect import read_secret
    from relayq.smtp.client import AuthFailed, TlsFailed, tls_context

    out: list[Problem] = []
    source = next((k for k in ("password", "password_file", "password_command")
                   if getattr(cfg, k)), "")
    if cfg.oauth2_provider:  # the secret is a token: its file, never its content, checked
        out += _oauth2(cfg)
    elif cfg.user:
        try:
            if not read_secret(cfg):
                out.append((True, source, "gives an empty password: AUTH cannot succeed"))
        except AuthFailed as exc:
            out.append((True, source or "user", f"{exc}: AUTH cannot succeed, nothing is "
                        "delivered"))
    elif source:
        out.append((False, source, "is set but user is not: relayq never authenticates"))
    if cfg.account == "default":  # the host's files, not an account's
        out += _log_file(cfg) + _generics(cfg)
    if cfg.tls == "none":
        for key in ("ca_file", "client_cert", "client_key"):
            if getattr(cfg, key):
                out.append((False, key, 'is not used with tls = "none"'))
        return out
    if cfg.client_key and not cfg.client_cert:
        out.append((False, "client_key", "is not used without client_cert"))
    try:
        tls_context(ca_file=cfg.ca_file, verify=cfg.tls_verify, client_cert=cfg.client_cert,
                    client_key=cfg.client_key)
    except TlsFailed as exc:
        key = "ca_file" if str(exc).startswith("cannot load ca_file") else "client_cert"
        out.append((True, key, f"{exc}: no TLS connection can be made"))
    return out


def _generics(cfg: Config) -> list[Problem]:
    """The generics map read as submission reads it (queue.submit.Context.generics)."""
    if not cfg.generics_file:
        return []
    from relayq.queue.submit import Context

    try:
        Context(cfg).generics()
    except ConfigError as exc:
        return [(True, "generics_file", exc.message.removeprefix("generics_file: "))]
    return []


def _log_file(cfg: Config) -> list[Problem]:
    """system.log drops a line it cannot append, without a word: say so here."""
    path = cfg.log_file
    if not path:
        return []
    import stat

    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        where = os.path.dirname(os.path.abspath(path))
        if os.access(where, os.W_OK | os.X_OK):
            return []
        why = f"cannot be created in {where}"
    except OSError as exc:
        why = f"cannot be looked at: {exc.strerror}"
    else:
        if not stat.S_ISREG(st.st_mode):
            why = "is not a regular file"
        elif os.access(path, os.W_OK):
            return []
        else:
            why = "is not writable"
    return [(False, "log_file", f"{path} {why} by uid {os.getuid()}: its log lines are "
             "lost" + ("" if cfg.syslog else " (and syslog = false)"))]


def delivery_user(cfg: Config) -> tuple[int, int] | None:
    """(uid, gid) root delivers this queue as: the daemon_user (the daemon), else the
    queue's owner (relayq flush, sendmail -q: queue.spool.enter); None for ourselves."""
    if os.geteuid() != 0:
        return None
    from relayq.daemon.life import service_owner
    from relayq.system.privilege import queue_owner

    try:
        owner = service_owner(cfg)
    except ConfigError:
        owner = None  # _daemon_user says it
    if owner is None:
        try:
            st = os.stat(cfg.queue_dir)
            owner = (st.st_uid, st.st_gid) if st.st_uid != 0 else None
        except OSError:
            owner = queue_owner(cfg.queue_dir, cfg.daemon_user)
    return owner


def _not_delivering(cfg: Config) -> bool:
    """Not root, and another account (the queue's owner) delivers this queue: this
    caller's reading of its files, or running its password_command, proves nothing."""
    if os.geteuid() == 0:
        return False
    try:
        return os.stat(cfg.queue_dir).st_uid != os.geteuid()
    except OSError:
        return False  # no queue yet: the caller's own, made at the first submission


def as_delivery_user(cfg: Config, check: Callable[[Config], list[Problem]]) -> list[Problem]:
    """check(cfg) in a child that became the delivery user (system.privilege), so a
    file only root may read, or a command that works only for root, is found out.
    Not root and not that user: not run at all, and said so (one warning)."""
    if _not_delivering(cfg):
        return [(False, "user", f"the checks as the delivering user (password, TLS and "
                 f"generics files, password_command) not run as uid {os.geteuid()}: "
                 "run check-config as root or as the queue's owner")]
    owner = delivery_user(cfg)
    if owner is None:
        return check(cfg)
    import json

    from relayq.system.privilege import become_owner

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            os.close(rfd)
            try:
                become_owner(*owner)
                found = check(cfg)
            except RelayqError as exc:
                found = [(True, "queue_dir", exc.message)]
            with os.fdopen(wfd, "w") as f:
                json.dump(found, f)
        except BaseException:  # the parent reports it (no JSON)
            code = 70
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    try:
        return [(bool(a), str(b), str(c)) for a, b, c in json.loads(text)]
    except (ValueError, TypeError):
        return [(True, "user", f"the check as uid {owner[0]} failed (status {status})")]
