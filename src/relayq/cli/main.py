"""`relayq`: the administrator's command (flush, run, daemon, hold/release/delete/requeue,
check-config, test, status, metrics, mailq, qshape, install, oauth2)."""

from __future__ import annotations

import sys

from relayq.cli._exit import run
from relayq.cli.args import build_parser, parse  # noqa: F401  (tests import it here)
from relayq.core.errors import EX_OK, PermissionRefused, RelayqError

TYPE_CHECKING = False

if TYPE_CHECKING:
    import argparse
    from typing import Any

    from relayq.cli.nagios import Thresholds
    from relayq.core.config import Config


def _main(argv: list[str]) -> int:
    args = parse(argv)
    limits = _thresholds(args) if args.command == "status" else None
    if limits is not None and limits.given():
        from relayq.cli import nagios

        try:
            return _command(args, limits)
        except RelayqError as exc:  # a plugin's failure is UNKNOWN, in one line
            print(f"RELAYQ UNKNOWN - {exc}")
            return nagios.UNKNOWN
    return _command(args, None)


def _command(args: argparse.Namespace, limits: Thresholds | None) -> int:
    from relayq.system import configfile

    # who may use which configuration, before any command opens anything (77)
    source = configfile.select(args.config)
    done = _without_config(args, source.path)
    if done is not None:
        return done
    if args.command == "oauth2":  # a laptop's login --output reads no relayq.toml
        from relayq.cli import oauth2

        return oauth2.run(args, source)
    if args.command == "daemon":
        from relayq.daemon import main as daemon

        return daemon.start(source=source, tag=args.tag, interval=args.interval,
                            listen=args.listen, foreground=args.foreground)
    cfg = source.load()
    if args.command == "check-config":
        return check_config(cfg, source.unread)
    if args.command == "newaliases":
        from relayq.cli.newaliases import check

        return check(cfg)
    from relayq.queue.spool import Spool
    from relayq.system.log import Log

    spool = Spool(cfg.queue_dir)
    if args.command == "test":
        from relayq.cli import smtptest

        spool.enter(cfg)  # root tests as the delivering user: its files, its secrets
        return smtptest.run(cfg, args.address, args.verbose, args.account)
    from relayq.daemon.life import find_daemon, pid_candidates

    pids = pid_candidates(cfg)  # root's answer, not the service user's it may become
    spool.enter(cfg)  # root in the service user's queue works as that user
    if args.command == "status":
        return status(cfg, args.json, pids, limits if limits and limits.given() else None)
    if args.command == "metrics":
        from relayq.cli import metrics

        return metrics.run(spool, args.file, find_daemon(pids) is not None)
    if args.command == "qshape":
        from relayq.cli import qshape

        return qshape.run(spool, args)
    if args.command in ("hold", "release", "delete", "requeue"):
        from relayq.delivery import admin

        if not spool.writable():
            raise PermissionRefused(f"{args.command}: only root may change queued mail")
        log = Log(args.tag, use_syslog=cfg.syslog, path=cfg.log_file)
        return admin.run(cfg, spool, log, args.command, args.qids, **_reroute(args))
    from relayq.cli import flush

    if not spool.writable():  # flush, run: the daemon runs the queue for users
        return flush.ask_daemon(spool, args.command != "flush" or args.quiet)
    log = Log(args.tag, use_syslog=cfg.syslog, path=cfg.log_file)
    return flush.queue_run(cfg, spool, log, command=args.command,
                           quiet=getattr(args, "quiet", False), verbose=args.verbose,
                           pids=pids)


def _reroute(args: argparse.Namespace) -> dict[str, Any]:
    """requeue's --reroute and -q selectors (cli/args checked it names messages)."""
    from relayq.core import selector

    if args.command != "requeue":
        return {}
    return {"reroute": args.reroute, "selectors": [selector.parse(s) for s in args.selectors]}


def _without_config(args: argparse.Namespace, config_path: str) -> int | None:
    """The commands that read no configuration of their own; None for the others."""
    if args.command == "version":
        from relayq import __version__

        print(f"relayq {__version__}")
        return EX_OK
    if args.command == "mailq":
        from relayq.cli.mailq import main as mailq_main

        return mailq_main((["-C", args.config] if args.config else [])
                          + (["--json"] if args.json else [])
                          + (["--json-lines"] if args.json_lines else []))
    if args.command == "install":
        from relayq.cli.install import run_install

        return run_install(args.root, args.force, args.uninstall, args.python,
                           venv=args.venv, libdir=args.libdir)
    if args.command == "import":
        from relayq.cli.peerimport import run_import

        return run_import(args.files, args.kind, args.write, config_path)
    return None


def _thresholds(args: argparse.Namespace) -> Thresholds:
    from relayq.cli.nagios import Thresholds
    from relayq.core.config import parse_duration
    from relayq.core.errors import EX_USAGE, ConfigError

    try:
        ages = [None if v is None else parse_duration(v, name) for v, name in
                ((args.age_warning, "--age-warning"), (args.age_critical, "--age-critical"))]
    except ConfigError as exc:
        raise RelayqError(str(exc), EX_USAGE) from None
    limits = Thresholds(args.warning, args.critical, ages[0], ages[1])
    if limits.problem():
        raise RelayqError(limits.problem(), EX_USAGE)
    return limits


def status(cfg: Config, as_json: bool, pids: list[str] | None = None,
           limits: Thresholds | None = None) -> int:
    """`relayq status` (relayq.cli.status)."""
    from relayq.cli.status import status as report

    return report(cfg, as_json, pids, limits)


def check_config(cfg: object, unread: str = "") -> int:
    """relayq check-config (relayq.cli.checkconfig)."""
    from relayq.cli import checkconfig
    from relayq.core.config import Config

    assert isinstance(cfg, Config)
    return checkconfig.run(cfg, unread)


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(sys.argv[1:] if argv is None else argv), "relayq")


if __name__ == "__main__":
    sys.exit(main())
