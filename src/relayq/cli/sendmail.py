"""The `sendmail` command: sendmail 8.12+ flags as programs really pass them.

Flags are parsed by hand with getopt's rules (clustering `-oi`, `-odq`,
attached or separate arguments `-fuser@x` / `-f user@x`, `--`), because
sendmail's syntax fits neither argparse nor getopt, and because this module
runs once per message: it imports only what committing a message needs.
Delivery code (sockets, TLS, DNS) is imported only after the commit point.

Flags that name files or change privileges (`-X`, `-D`, `-oQ`, `-O
QueueDirectory=`, ...) are refused with EX_NOPERM: they have been the way in
for attacks through programs that pass user input to sendmail
(CVE-2016-10033). Harmless flags we do not implement are accepted and logged.
"""

from __future__ import annotations

import os
import sys

from relayq.cli._exit import run
from relayq.core import dsnparams
from relayq.core.errors import (
    EX_OK,
    EX_TEMPFAIL,
    DataError,
    PermissionRefused,
    RelayqError,
    UsageError,
)

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from relayq.core.config import Config, Source
    from relayq.queue.spool import Claim, Spool
    from relayq.queue.submit import Context, Request
    from relayq.system.log import Log

WITH_ARG = set("ABbCDdeFfhLMNOopQqRrVX")
FLAGS = set("cGIimnsTtUv")

# sendmail's one-letter -o options and their long names
SHORT_OPTIONS = {
    "A": "AliasFile", "a": "AliasWait", "B": "BlankSub", "b": "MinFreeBlocks",
    "C": "CheckpointInterval", "c": "HoldExpensive", "D": "AutoRebuildAliases",
    "d": "DeliveryMode", "E": "ErrorHeader", "e": "ErrorMode", "F": "TempFileMode",
    "f": "SaveFromLine", "G": "MatchGECOS", "H": "HelpFile", "h": "MaxHopCount",
    "i": "IgnoreDots", "j": "SendMimeErrors", "K": "ConnectionCacheTimeout",
    "k": "ConnectionCacheSize", "L": "LogLevel", "l": "UseErrorsTo", "m": "MeToo",
    "n": "CheckAliases", "O": "DaemonPortOptions", "o": "OldStyleHeaders",
    "P": "PostmasterCopy", "p": "PrivacyOptions", "Q": "QueueDirectory", "q": "QueueFactor",
    "R": "DontPruneRoutes", "r": "Timeout", "S": "StatusFile", "s": "SuperSafe",
    "T": "QueueTimeout", "t": "TimeZoneSpec", "U": "UserDatabaseSpec", "u": "DefaultUser",
    "V": "FallbackMXhost", "v": "Verbose", "w": "TryNullMXList", "X": "RefuseLA",
    "x": "QueueLA", "Y": "ForkEachJob", "y": "RecipientFactor", "Z": "RetryFactor",
    "z": "ClassFactor", "7": "SevenBitInput", "8": "EightBitMode",
}
# options that name files, directories or users: an attacker's tools, refused
DANGEROUS = {
    "aliasfile", "errorheader", "tempfilemode", "helpfile", "queuedirectory", "statusfile",
    "defaultuser", "userdatabasespec", "daemonportoptions", "forwardpath", "runasuser",
    "trusteduser", "safefileenvironment", "dontblamesendmail", "controlsocketname",
    "hoststatusdirectory", "pidfile", "deadletterdrop", "queuefilemode", "serviceswitchfile",
    "hostsfile", "cacertfile", "cacertpath", "servercertfile", "serverkeyfile",
    "clientcertfile", "clientkeyfile", "crlfile", "dhparameters", "randfile",
    "defaultauthinfo", "mailboxdatabase", "milter", "inputmailfilters",
}
DELIVERY = {"i": "i", "interactive": "i", "b": "b", "background": "b", "q": "q",
            "queue": "q", "queueonly": "q", "d": "d", "deferred": "d"}
ERROR_MODES = set("pqmwe")


class Args:
    """Parsed sendmail command line."""

    def __init__(self) -> None:
        self.mode = "m"  # -b: m deliver, p print queue, s smtp, d daemon, i aliases, v verify
        self.queue_run = False
        self.queue_interval = ""
        self.selectors: list[str] = []
        self.sender: str | None = None
        self.full_name: str | None = None
        self.extract = False
        self.ignore_dots = False
        self.delivery: str | None = None
        self.error_mode = "p"
        self.verbose = False
        self.tag = "relayq"
        self.config: str | None = None
        self.notify = ""
        self.ret = ""
        self.envid = ""
        self.body = ""
        self.hops: int | None = None
        self.recipients: list[str] = []
        self.ignored: list[str] = []
        self.queue_group = "c"
        self.foreground = False  # -bD: the daemon stays in the foreground


def _long_option(args: Args, name: str, value: str, shown: str) -> None:
    key = name.strip().lower()
    if key in DANGEROUS:
        raise PermissionRefused(f"{shown}: option {name} is not allowed")
    if key == "deliverymode":
        mode = DELIVERY.get(value.strip().lower())
        if mode is None:
            raise UsageError(f"{shown}: unknown delivery mode {value!r}")
        args.delivery = mode
    elif key == "errormode":
        if not value or value[0] not in ERROR_MODES:
            raise UsageError(f"{shown}: unknown error mode {value!r}")
        args.error_mode = value[0]
    elif key == "ignoredots":
        args.ignore_dots = value.strip().lower() not in ("false", "f", "no", "n", "0")
    elif key == "verbose":
        args.verbose = value.strip().lower() not in ("false", "f", "no", "n", "0")
    else:
        args.ignored.append(shown)


def _short_option(args: Args, value: str, shown: str) -> None:
    if not value:
        raise UsageError("option requires an argument -- 'o'")
    letter, rest = value[0], value[1:]
    name = SHORT_OPTIONS.get(letter)
    if name is None:
        args.ignored.append(shown)
        return
    if letter == "d":
        if rest and rest[0] not in DELIVERY:
            raise UsageError(f"{shown}: unknown delivery mode {rest!r}")
        args.delivery = DELIVERY[rest[0]] if rest else "i"
    else:
        _long_option(args, name, rest.lstrip("="), shown)


MAX_ARG = 4096  # no flag, address or name is longer; a flood is an attack, not mail


def parse(argv: list[str]) -> Args:
    """argv (without the program name) -> Args; raises UsageError / PermissionRefused."""
    for n, arg in enumerate(argv, 1):
        # no argument may carry a line break (header or SMTP command injection,
        # CVE-2015-8476) or be a flood, whatever the flag it belongs to
        if "\r" in arg or "\n" in arg:
            raise DataError(f"argument {n} contains a line break")
        if len(arg) > MAX_ARG:
            raise DataError(f"argument {n} is longer than {MAX_ARG} characters")
    args = Args()
    positional: list[str] = []
    seen_sender = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)  # glibc getopt permutes: options may follow
            continue
        j = 1
        while j < len(arg):
            opt = arg[j]
            j += 1
            if opt in FLAGS:
                if opt == "t":
                    args.extract = True
                elif opt == "i":
                    args.ignore_dots = True
                elif opt == "v":
                    args.verbose = True
                elif opt == "I":
                    args.mode = "i"
                else:
                    args.ignored.append(f"-{opt}")
                continue
            if opt not in WITH_ARG:
                raise UsageError(f"illegal option -- {opt}")
            value = arg[j:]
            j = len(arg)
            if not value and opt not in "qd":
                if i >= len(argv):
                    raise UsageError(f"option requires an argument -- {opt}")
                value = argv[i]
                i += 1
            shown = f"-{opt}{value}"
            if opt in "fr":
                if seen_sender:
                    raise UsageError('More than one "from" person')
                seen_sender = True
                args.sender = value
            elif opt == "F":
                args.full_name = value
            elif opt == "b":
                if value[:1] not in set("mpsdDivthHP") or len(value) != 1:
                    raise UsageError(f"Invalid operation mode {value}")
                args.mode = "d" if value == "D" else value
                args.foreground = value == "D"
            elif opt == "q":
                _queue_option(args, value)
            elif opt == "A":
                if value not in ("c", "m"):
                    raise UsageError(f"Invalid -A argument {value!r}: use -Ac or -Am")
                args.queue_group = value
            elif opt == "B":
                args.body = _dsn(dsnparams.body, value, "-B")
            elif opt == "C":
                args.config = value
            elif opt == "h":
                if not (value.isascii() and value.isdigit()):
                    raise UsageError(f"Bad hop count ({value})")
                args.hops = int(value)
            elif opt == "L":
                if not value or len(value) > 64 or not all(
                    c.isalnum() or c in "-_.@" for c in value
                ):
                    raise UsageError(f"Invalid syslog tag {value!r}")
                args.tag = value
            elif opt == "N":
                args.notify = _dsn(dsnparams.notify, value, "-N")
            elif opt == "R":
                args.ret = _dsn(dsnparams.ret, value, "-R")
            elif opt == "V":  # sendmail refuses a -V that is not xtext (EX_USAGE) too
                args.envid = _dsn(dsnparams.envid, value, "-V")
            elif opt == "o":
                _short_option(args, value, shown)
            elif opt == "O":
                name, _, val = value.partition("=")
                _long_option(args, name, val, shown)
            elif opt == "e":
                _short_option(args, "e" + value, shown)
            elif opt in "XD":
                raise PermissionRefused(f"-{opt}: writing to a file named by the caller is not "
                                        "allowed")
            else:  # -d debug, -M macro, -p protocol, -Q quarantine: harmless here
                args.ignored.append(shown)
    args.recipients = positional
    return args


def _queue_option(args: Args, value: str) -> None:
    args.queue_run = True
    if value == "p":
        args.queue_interval = "p"
        return
    if not value or value == "f":
        return
    if value[0] in "IRS" or value[0] == "!":
        args.selectors.append(value)
    elif value[0].isdigit():
        args.queue_interval = value
    elif value[0] == "p":  # persistent runner: the daemon; -qp alone uses queue_interval
        args.queue_interval = value[1:] or "p"
    elif value[0] in "GQL":
        args.ignored.append(f"-q{value}")
    else:
        raise UsageError(f"Invalid -q value -q{value}")


def _dsn(check: Callable[[str], str], value: str, flag: str) -> str:
    """A DSN flag's value through the one validator the SMTP client uses too."""
    try:
        return check(value)
    except dsnparams.BadParam as exc:
        raise UsageError(f"Invalid {flag} value {value!r}: {exc}") from None


def _stdin_chunks() -> Iterator[bytes]:
    fd = sys.stdin.fileno() if sys.stdin is not None else 0
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        except OSError as exc:
            raise RelayqError(f"cannot read the message: {exc.strerror}", 74) from None
        if not chunk:
            return
        yield chunk


def _user() -> tuple[str, int, str]:
    """(login name, uid, full name from GECOS), sendmail's username() rules."""
    import pwd

    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
        name, gecos = pw.pw_name, pw.pw_gecos
    except KeyError:
        return str(uid), uid, ""
    if uid == 0:
        try:
            login = os.getlogin()
            name, gecos = login, pwd.getpwnam(login).pw_gecos
        except (OSError, KeyError):
            pass
    full = gecos.split(",", 1)[0].replace("&", name.capitalize()).strip()
    return name, uid, full


def _open(args: Args, source: Source) -> tuple[Config, Log]:
    from relayq.system.log import Log

    cfg = source.load()
    log = Log(args.tag, use_syslog=cfg.syslog, path=cfg.log_file)
    for flag in args.ignored:
        log.info(f"ignored flag {flag} (accepted for compatibility)")
    return cfg, log


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(sys.argv[1:] if argv is None else argv), "sendmail")


def _main(argv: list[str]) -> int:
    from relayq.core import config

    args = parse(argv)
    # who may use which configuration, decided before any mode opens or starts
    # anything (a web application's caller may control argv, D1): 77 otherwise
    source = config.select(args.config)
    if args.mode == "p":
        from relayq.cli.mailq import main as mailq_main

        extra = [f"-q{s}" for s in args.selectors] + (["-v"] if args.verbose else [])
        return mailq_main(extra + (["-C", args.config] if args.config else []))
    if args.mode == "d" or args.queue_interval:
        from relayq.daemon import main as daemon

        return daemon.start(source=source, tag=args.tag, interval=args.queue_interval or None,
                            listen=args.mode == "d", foreground=args.foreground)
    if args.mode == "s":
        return smtp_session(args, source)
    if args.mode in "thHP":
        raise UsageError(f"-b{args.mode} is not supported")
    cfg, log = _open(args, source)
    if args.mode == "i":
        from relayq.cli.newaliases import check

        return check(cfg)
    if args.queue_run:
        return queue_run(cfg, log, args)
    if args.mode == "v":
        return verify(cfg, args)
    return submit(cfg, log, args)


def smtp_session(args: Args, source: Source) -> int:
    """`sendmail -bs`: SMTP on stdin/stdout through the listener's handler."""
    from relayq.queue.spool import Spool
    from relayq.server.listener import serve_stdio

    cfg, log = _open(args, source)
    user, uid, _ = _user()
    Spool(cfg.queue_dir).enter()
    mode = args.delivery or cfg.delivery_mode
    return serve_stdio(cfg, log, user=user, uid=uid, mode=mode)


def verify(cfg: Config, args: Args) -> int:
    from relayq.core import address
    from relayq.queue.submit import Context

    if not args.recipients:
        raise UsageError("Recipient names must be specified")
    host = cfg.smarthost[0]
    domain = Context(cfg).domain
    for arg in args.recipients:
        for rcpt in address.parse_recipient_args(arg):
            rcpt = address.qualify(rcpt, domain)
            print(f"{rcpt}... deliverable: mailer relay, host {host}, user {rcpt}")
    return EX_OK


def _verbose_printer(args: Args) -> Callable[[str], None] | None:
    if not args.verbose:
        return None

    def show(line: str) -> None:
        print(line, flush=True)

    return show


def queue_run(cfg: Config, log: Log, args: Args) -> int:
    from relayq.core import selector
    from relayq.delivery.runner import Runner
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context

    sels = [selector.parse(s) for s in args.selectors]
    spool = Spool(cfg.queue_dir)
    spool.enter()
    if not spool.writable():
        return ask_flush(spool)
    with Runner(cfg, spool, log, Context(cfg), verbose=_verbose_printer(args)) as runner:
        left = runner.run(force=True, selectors=sels, workers=cfg.concurrency)
    return EX_TEMPFAIL if left else EX_OK


def ask_flush(spool: Spool) -> int:
    """`sendmail -q` by a user who may not run the queue: the daemon runs it (like
    `postqueue -f`), or, with no daemon, a clear refusal."""
    from relayq.system.control import ask

    status = ask(spool.socket_path, "flush", 60.0)
    if status is None:
        raise RelayqError("cannot flush the queue: the relayq daemon is not running "
                          "(only root may run the queue itself)", 69)
    code, text = status
    if code:
        raise RelayqError(text, code)
    return EX_OK


def submit(cfg: Config, log: Log, args: Args) -> int:
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context, Request, enqueue

    user, uid, gecos = _user()
    req = Request(user=user, uid=uid)
    req.sender = args.sender
    req.full_name = args.full_name if args.full_name is not None else (
        os.environ.get("NAME") or gecos)
    req.extract = args.extract
    req.ignore_dots = args.ignore_dots
    req.recipients = args.recipients
    req.notify, req.ret, req.envid, req.body, req.hops = (
        args.notify, args.ret, args.envid, args.body, args.hops)
    if not args.recipients and not args.extract:
        raise UsageError("Recipient names must be specified")
    spool = Spool(cfg.queue_dir)  # create() makes the directories the first time
    spool.enter()
    if not spool.writable():
        return _hand_over(cfg, spool, req, args)
    ctx = Context(cfg)
    msg, _ = enqueue(cfg, spool, req, _stdin_chunks(), log, ctx)
    mode = args.delivery or cfg.delivery_mode
    if args.verbose and mode == "b":
        mode = "i"  # sendmail: -v delivers in the foreground so the dialogue can be shown
    if mode in "qd":
        msg.release()
        return EX_OK
    if mode == "b":
        from relayq.delivery.background import deliver_detached

        deliver_detached(cfg, spool, log, ctx, [msg.qid], {msg.qid: msg.detach()})
        return EX_OK
    fd = msg.detach()
    try:
        claim = spool.adopt(msg.qid, fd)
    except RelayqError as exc:  # committed all the same: the caller must hear 0
        os.close(fd)
        log.error(f"{msg.qid}: {exc.message}; queued for the next run")
        return EX_OK
    return _interactive(cfg, log, ctx, claim, args)


def _hand_over(cfg: Config, spool: Spool, req: Request, args: Args) -> int:
    """A queue we may not write (a user's mail, a root-owned queue): via maildrop/."""
    from relayq.core import address
    from relayq.queue import maildrop

    for arg in req.recipients:  # refuse a bad address now, not after exit 0
        address.parse_recipient_args(arg)
    if req.sender:
        address.parse_mailbox(req.sender, "sender")
    name = maildrop.hand_over_request(cfg, spool, req, _stdin_chunks(), args.delivery or "")
    if args.verbose:
        if maildrop.valid_name(name):
            print(f"relayq: no daemon took the message; it waits in {spool.maildrop} "
                  "for the next queue run", flush=True)
        else:
            print(f"relayq: handed to the relayq daemon{' as ' + name if name else ''}",
                  flush=True)
    return EX_OK


def _interactive(cfg: Config, log: Log, ctx: Context, claim: Claim, args: Args) -> int:
    from relayq.core import policy
    from relayq.core.outcome import FAILED
    from relayq.delivery.runner import Runner

    with Runner(cfg, claim.spool, log, ctx, verbose=_verbose_printer(args)) as runner:
        try:
            runner.process(claim.qid, claim=claim)
        except Exception as exc:  # the message is committed: the caller must hear 0
            log.error(f"{claim.qid}: delivery attempt failed: {type(exc).__name__}: {exc}; "
                      "queued for the next run")
            return EX_OK
    codes = runner.failed_codes
    failed = [r for r in claim.envelope.recipients if r.state == FAILED]
    status = policy.interactive_status(codes)
    # -oep prints; -oem/-oew mail the error back (the bounce is always queued);
    # -oeq is quiet; -oee exits 0 (sendmail's ErrorMode)
    if status and args.error_mode == "p":
        for r in failed:
            print(f"sendmail: {r.address}... {r.reply}", file=sys.stderr)
    if args.error_mode == "e":
        return EX_OK
    return status


if __name__ == "__main__":
    sys.exit(main())
