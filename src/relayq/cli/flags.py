"""sendmail's command line -> Args: sendmail 8.12+ flags as programs really pass them.

Flags are parsed by hand with getopt's rules (clustering `-oi`, `-odq`,
attached or separate arguments `-fuser@x` / `-f user@x`, `--`), because
sendmail's syntax fits neither argparse nor getopt. Pure: no I/O, and
imports only the errors and the DSN rule (this runs once per message).

Flags that name files or change privileges (`-X`, `-D`, `-oQ`, `-O
QueueDirectory=`, ...) are refused with EX_NOPERM: they have been the way in
for attacks through programs that pass user input to sendmail
(CVE-2016-10033). Harmless flags we do not implement are accepted and logged.
"""

from __future__ import annotations

from relayq.core import dsnparams, policy
from relayq.core.errors import DataError, PermissionRefused, UsageError

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
DELIVERY = {**policy.MODE_NAMES, **{m: m for m in policy.MODE_NAMES.values()},
            "queueonly": policy.Mode.QUEUE}
ERROR_MODES = set("pqmwe")
# the DSN flags: (the SMTP parameter, the Args attribute)
DSN_FLAGS = {"B": ("BODY", "body"), "N": ("NOTIFY", "notify"), "R": ("RET", "ret"),
             "V": ("ENVID", "envid")}


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
    _check_argv(argv)
    args = Args()
    positional: list[str] = []
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
        i = _cluster(args, arg, argv, i)
    args.recipients = positional
    return args


def _check_argv(argv: list[str]) -> None:
    """No argument may carry a line break (header or SMTP command injection,
    CVE-2015-8476) or be a flood, whatever the flag it belongs to."""
    for n, arg in enumerate(argv, 1):
        if "\r" in arg or "\n" in arg:
            raise DataError(f"argument {n} contains a line break")
        if len(arg) > MAX_ARG:
            raise DataError(f"argument {n} is longer than {MAX_ARG} characters")


def _cluster(args: Args, arg: str, argv: list[str], i: int) -> int:
    """One `-xyz` cluster; its option's argument may be the next of argv (then taken):
    returns the index of the argument after it."""
    j = 1
    while j < len(arg):
        opt = arg[j]
        j += 1
        if opt in FLAGS:
            _flag(args, opt)
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
        _option(args, opt, value, f"-{opt}{value}")
    return i


def _flag(args: Args, opt: str) -> None:
    """An option without an argument (FLAGS)."""
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


def _option(args: Args, opt: str, value: str, shown: str) -> None:
    """An option with its argument (WITH_ARG)."""
    if opt in "fr":
        if args.sender is not None:  # any -f or -r before, even -f ""
            raise UsageError('More than one "from" person')
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
    elif opt == "C":
        args.config = value
    elif opt == "h":
        if not (value.isascii() and value.isdigit()):
            raise UsageError(f"Bad hop count ({value})")
        args.hops = int(value)
    elif opt == "L":
        if not value or len(value) > 64 or not all(c.isalnum() or c in "-_.@" for c in value):
            raise UsageError(f"Invalid syslog tag {value!r}")
        args.tag = value
    elif opt in DSN_FLAGS:  # sendmail refuses a -V that is not xtext (EX_USAGE) too
        setattr(args, DSN_FLAGS[opt][1], _dsn(DSN_FLAGS[opt][0], value, f"-{opt}"))
    elif opt == "o":
        _short_option(args, value, shown)
    elif opt == "O":
        name, _, val = value.partition("=")
        _long_option(args, name, val, shown)
    elif opt == "e":
        _short_option(args, "e" + value, shown)
    elif opt in "XD":
        raise PermissionRefused(f"-{opt}: writing to a file named by the caller is not allowed")
    else:  # -d debug, -M macro, -p protocol, -Q quarantine: harmless here
        args.ignored.append(shown)


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


def _dsn(name: str, value: str, flag: str) -> str:
    """A DSN flag's value through the one validator the SMTP client uses too."""
    try:
        return dsnparams.check(name, value)
    except dsnparams.BadParam as exc:
        raise UsageError(f"Invalid {flag} value {value!r}: {exc}") from None
