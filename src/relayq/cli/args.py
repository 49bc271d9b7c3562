"""The `relayq` command line, apart from `cli/main` so that `cli/manpages` renders
relayq(8) from it and `relayq install` writes that page without an import cycle."""

from __future__ import annotations

import argparse

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with sysexits: a usage error is one line and exit 64 (EX_USAGE), not
    argparse's usage block and exit 2, which is no sysexits code."""

    def error(self, message: str) -> NoReturn:
        from relayq.core.errors import UsageError

        command = self.prog.partition(" ")[2]  # "relayq flush": "flush"
        raise UsageError(f"{command + ': ' if command else ''}{message} "
                         f"(see {self.prog} --help)")


FLUSH_MORE = ("Prints one line: how many messages were sent, deferred and bounced, and "
              "how many are left in the queue; on a terminal, a large queue shows "
              "progress on standard error. Exit status 0 when the queue is empty "
              "afterwards, 75 while mail is left.")

METRICS_MORE = ("For node_exporter's textfile collector: FILE (a *.prom file in its directory) "
                "is replaced atomically, mode 0644; without FILE, or with -, standard output. "
                "The daemon can write it on an interval instead (metrics_file, "
                "metrics_interval).")


def build_parser() -> argparse.ArgumentParser:
    """relayq's arguments: one table for parsing, --help, relayq(8) and the bash
    completion (contrib/bash-completion/relayq, checked against it)."""
    from relayq import __version__

    p = Parser(prog="relayq", description="relayq mail relay administration")
    p.add_argument("--version", action="version", version=f"relayq {__version__}",
                   help="print the version and exit")
    p.add_argument("-C", "--config", help="configuration file")
    p.add_argument("-v", "--verbose", action="store_true", help="show the SMTP dialogue")
    p.add_argument("-L", "--tag", default="relayq", help="syslog tag")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=Parser)

    def command(name: str, what: str, more: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=what,
                              description=f"{what[:1].upper()}{what[1:]}. {more}".strip())

    f = command("flush", "try every queued message now (sendmail -q); a running daemon "
                "is told to retry too", FLUSH_MORE)
    f.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing (no summary line, no progress)")
    d = command("daemon", "queue runs on an interval, and the SMTP listener")
    d.add_argument("--listen", action="store_true", help="also accept SMTP (listen addresses)")
    d.add_argument("--foreground", action="store_true",
                   help="do not detach (implied under systemd)")
    d.add_argument("-q", dest="interval", metavar="INTERVAL",
                   help="time between queue runs, e.g. 30m (default: queue_interval)")
    command("run", "deliver the messages whose retry time has come",
            "Silent; exit status 0 when the queue is empty afterwards, 75 while mail is left.")
    command("check-config", "print the effective configuration, secrets masked",
            "As TOML that reads back the same, derived values with where they came from; "
            "then one line on stderr for each problem: exit status 78 for one that stops "
            "mail (a relay loop, an unreadable password_file...), 0 with warnings.")
    st = command("status", "queue size by state, oldest message, each relay's last error, "
                 "daemon (-w/-c: fast at any size)")
    _status_arguments(st)
    command("metrics", "the queue and the delivery counters in Prometheus' text format",
            METRICS_MORE).add_argument("file", nargs="?", metavar="FILE",
                                       help="where to write (default: standard output)")
    command("newaliases", "check the aliases file (as newaliases)")
    for action, what in (("hold", "keep messages queued: no run delivers them"),
                         ("release", "undo hold: deliver at the next run"),
                         ("delete", "remove messages from the queue, undelivered"),
                         ("requeue", "make messages due and try them now")):
        a = command(action, what, "Exit status 66 when a queue id is not in the queue.")
        a.add_argument("qids", nargs="*" if action == "requeue" else "+", metavar="QID",
                       help="queue ids, as mailq shows them")
    _reroute_arguments(a)
    _install_arguments(command(
        "install", "put relayq's sendmail, mailq, newaliases and relayq on the system "
                   "path (or stage them for a package: --root)"))
    _queue_commands(command)
    _setup_commands(command)
    return p


def _reroute_arguments(a: argparse.ArgumentParser) -> None:
    """requeue's own: choose the account (core/accounts) again, for ids or selectors."""
    a.add_argument("--reroute", action="store_true",
                   help="choose each message's account again from the current configuration "
                        "(after an account was removed or its senders changed); without QID, "
                        "every queued message the -q selectors select")
    a.add_argument("-q", dest="selectors", action="append", default=[], metavar="SELECTOR",
                   help="with --reroute: only messages sendmail's selector selects "
                        "(-qSsender, -qRrecipient, -qIqueue-id; ! negates)")


def _queue_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    q = command("mailq", "list the queue (as mailq)")
    form = q.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="JSON, as mailq --json")
    form.add_argument("--json-lines", action="store_true",
                      help="one JSON object per message, as postqueue -j (mailq --json-lines)")
    from relayq.cli.qshape import add_arguments as qshape_arguments

    qshape_arguments(command(
        "qshape", "the queue by recipient (or sender) domain and age, as Postfix's qshape",
        "One row per domain, busiest first, under a TOTAL row; column T is the "
        "row's count, then one column per age bucket: each counts what is younger "
        "than its limit in minutes and not younger than the previous one; the last "
        "(N+) has no limit. Recipients still to be delivered are counted, or "
        "messages with -s. Users who may not read the queue see their own mail, "
        "as in mailq."))
    command("version", "print the version (as relayq --version)")


def _setup_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    from relayq.cli.smtptest import TEST_MORE

    t = command("test", "connect to each smarthost and show what it answers (greeting, "
                "extensions, TLS and its certificate, AUTH); a test message only to ADDRESS",
                TEST_MORE)
    t.add_argument("address", nargs="?", metavar="ADDRESS",
                   help="send a short test message to this address (default: send none)")
    t.add_argument("--account", default="", metavar="NAME",
                   help="test only this account's smarthosts ([account.NAME], or default; "
                        "without it, every account's, each named)")
    imp = command("import", "print a relayq.toml made from another MTA's configuration "
                            "(sendmail, nullmailer, ssmtp, dma, msmtp, postfix, exim4)",
                  "Each setting follows a comment naming the line it came from; every setting "
                  "that is not carried over is listed at the end, and counted on stderr. "
                  "Passwords are printed only into the file --write makes (mode 0600).")
    imp.add_argument("files", nargs="+", metavar="FILE",
                     help="its configuration files (submit.mc, /etc/nullmailer/*, ssmtp.conf, "
                          "dma.conf, msmtprc, main.cf, update-exim4.conf.conf, ...)")
    imp.add_argument("--from", dest="kind",
                     choices=("sendmail", "nullmailer", "ssmtp", "dma", "msmtp", "postfix",
                              "exim4"),
                     help="the format (default: found from each file's name and content)")
    imp.add_argument("--write", action="store_true",
                     help="write the configuration file (never replacing one) instead of "
                          "printing it; passwords only then")
    from relayq.cli.oauth2 import add_arguments as oauth2_arguments

    oauth2_arguments(command)  # relayq oauth2 login|import|status


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments, or a UsageError (64) naming the command whose --help to read."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if extra:
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "requeue" and not args.reroute and (args.selectors or not args.qids):
        sub.choices["requeue"].error("name the queue ids (or use --reroute, which may "
                                     "select them with -q)")
    return args


def _status_arguments(st: argparse.ArgumentParser) -> None:
    st.add_argument("--json", action="store_true", help="one JSON document")
    st.add_argument("-w", dest="warning", type=int, metavar="N",
                    help="as a monitoring plugin (one line, perfdata, exit 0/1/2/3): WARNING "
                         "at N messages waiting (queued or in maildrop/)")
    st.add_argument("-c", dest="critical", type=int, metavar="N",
                    help="CRITICAL at N messages waiting")
    st.add_argument("--age-warning", metavar="AGE",
                    help="WARNING when the oldest message is this old (e.g. 30m, 4h)")
    st.add_argument("--age-critical", metavar="AGE",
                    help="CRITICAL when the oldest message is this old")


def _install_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("--force", action="store_true",
                   help="replace another MTA's commands (they are kept aside)")
    i.add_argument("--uninstall", action="store_true", help="remove the links, restore originals")
    i.add_argument("--root", default="/", metavar="DIR",
                   help="a staging root for a package (DESTDIR): the commands, relayq's modules "
                        "and the man pages go below DIR, and what they name is where they will "
                        "be on the target, without DIR (--python, --libdir)")
    i.add_argument("--venv", action="store_true",
                   help="with --root DIR: launchers under DIR that run this installation, for "
                        "tests and benchmarks; not a staging root")
    i.add_argument("--python", metavar="PATH",
                   help="interpreter for the launchers (same Python version as relayq's; "
                        "default: the one running relayq, /usr/bin/python3 for a staging root)")
    i.add_argument("--libdir", metavar="LIBDIR",
                   help="staging root: the directory holding the relayq package on the target "
                        "(default: /usr/share/relayq); this relayq is copied there if missing")
