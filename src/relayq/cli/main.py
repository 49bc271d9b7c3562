"""`relayq`: the administrator's command (flush, run, check-config, mailq)."""

from __future__ import annotations

import argparse
import sys

from relayq.cli._exit import run
from relayq.errors import EX_OK, EX_TEMPFAIL


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayq", description="relayq mail relay administration")
    p.add_argument("-C", "--config", help="configuration file")
    p.add_argument("-v", "--verbose", action="store_true", help="show the SMTP dialogue")
    p.add_argument("-L", "--tag", default="relayq", help="syslog tag")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("flush", help="try every queued message now (sendmail -q)")
    sub.add_parser("run", help="deliver the messages whose retry time has come")
    sub.add_parser("check-config", help="print the effective configuration, secrets masked")
    q = sub.add_parser("mailq", help="list the queue (as mailq)")
    q.add_argument("--json", action="store_true")
    sub.add_parser("version", help="print the version")
    return p


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        from relayq import __version__

        print(f"relayq {__version__}")
        return EX_OK
    if args.command == "mailq":
        from relayq.cli.mailq import main as mailq_main

        return mailq_main((["-C", args.config] if args.config else [])
                          + (["--json"] if args.json else []))
    from relayq import config

    cfg = config.load(args.config, explicit=args.config is not None)
    if args.command == "check-config":
        return check_config(cfg)
    from relayq.log import Log
    from relayq.runner import Runner
    from relayq.spool import Spool
    from relayq.submit import Context

    log = Log(args.tag, use_syslog=cfg.syslog, path=cfg.log_file)
    verbose = (lambda line: print(line, flush=True)) if args.verbose else None
    runner = Runner(cfg, Spool(cfg.queue_dir), log, Context(cfg), verbose=verbose)
    try:
        left = runner.run(force=args.command == "flush")
    finally:
        runner.close()
    return EX_TEMPFAIL if left else EX_OK


def check_config(cfg: object) -> int:
    from relayq.config import Config

    assert isinstance(cfg, Config)
    print(f"# {cfg.path}")
    for key, value in cfg.effective().items():
        print(f"{key} = {_toml(value)}")
    print(f"queue_dir = {_toml(cfg.queue_dir)}  # effective")
    for host in cfg.smarthosts():
        print(f"# relay: {host!r}{' (MX lookup)' if host.mx else ''}")
    return EX_OK


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(sys.argv[1:] if argv is None else argv), "relayq")


if __name__ == "__main__":
    sys.exit(main())
