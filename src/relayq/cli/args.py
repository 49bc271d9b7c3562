"""The `relayq` command line, apart from `cli/main` so that `cli/manpages` renders
relayq(8) from it and `relayq install` writes that page without an import cycle."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    """relayq's arguments: one table for parsing, --help and relayq(8)."""
    p = argparse.ArgumentParser(prog="relayq", description="relayq mail relay administration")
    p.add_argument("-C", "--config", help="configuration file")
    p.add_argument("-v", "--verbose", action="store_true", help="show the SMTP dialogue")
    p.add_argument("-L", "--tag", default="relayq", help="syslog tag")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("flush", help="try every queued message now (sendmail -q); "
                   "a running daemon is told to retry too")
    d = sub.add_parser("daemon", help="queue runs on an interval, and the SMTP listener")
    d.add_argument("--listen", action="store_true", help="also accept SMTP (listen addresses)")
    d.add_argument("--foreground", action="store_true",
                   help="do not detach (implied under systemd)")
    d.add_argument("-q", dest="interval", metavar="INTERVAL",
                   help="time between queue runs, e.g. 30m (default: queue_interval)")
    sub.add_parser("run", help="deliver the messages whose retry time has come")
    sub.add_parser("check-config", help="print the effective configuration, secrets masked")
    st = sub.add_parser("status", help="queue size, oldest message, daemon (fast at any size)")
    st.add_argument("--json", action="store_true", help="one JSON document")
    sub.add_parser("newaliases", help="check the aliases file (as newaliases)")
    for action, what in (("hold", "keep messages queued: no run delivers them"),
                         ("release", "undo hold: deliver at the next run"),
                         ("delete", "remove messages from the queue, undelivered"),
                         ("requeue", "make messages due and try them now")):
        a = sub.add_parser(action, help=what)
        a.add_argument("qids", nargs="+", metavar="QID", help="queue ids, as mailq shows them")
    _install_arguments(sub.add_parser(
        "install", help="put relayq's sendmail, mailq, newaliases and relayq on the system "
                        "path (or stage them for a package: --root)"))
    q = sub.add_parser("mailq", help="list the queue (as mailq)")
    form = q.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="JSON, as mailq --json")
    form.add_argument("--json-lines", action="store_true",
                      help="one JSON object per message, as postqueue -j (mailq --json-lines)")
    from relayq.cli.qshape import add_arguments as qshape_arguments

    qshape_arguments(sub.add_parser(
        "qshape", help="the queue by recipient (or sender) domain and age, as Postfix's qshape",
        description="One row per domain, busiest first, under a TOTAL row; column T is the "
                    "row's count, then one column per age bucket: each counts what is younger "
                    "than its limit in minutes and not younger than the previous one; the last "
                    "(N+) has no limit. Recipients still to be delivered are counted, or "
                    "messages with -s. Users who may not read the queue see their own mail, "
                    "as in mailq."))
    sub.add_parser("version", help="print the version")
    imp = sub.add_parser("import", help="print a relayq.toml made from another MTA's "
                                        "configuration (sendmail, nullmailer, ssmtp, dma, "
                                        "msmtp, postfix, exim4)")
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
    return p


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
