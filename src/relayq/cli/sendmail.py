"""The `sendmail` command, the front door: argv -> Args (relayq.cli.flags), then the mode.

The submission mode (a message on stdin) is relayq.cli.submission's, up to the
commit point; what follows the commit (background or interactive delivery)
starts here. The other modes (-q, -bs, -bd, -bp, -bv, -bi) are dispatched to
their modules, each imported only when its mode runs: this module runs once
per message, and a queue-only submission loads only what committing needs.
Delivery code (sockets, TLS, DNS) is imported only after the commit point.
"""

from __future__ import annotations

import sys

from relayq.cli._exit import run
from relayq.cli.flags import Args, parse
from relayq.core.errors import EX_OK, EX_TEMPFAIL, RelayqError, UsageError

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.cli.submission import Committed
    from relayq.core.config import Config
    from relayq.queue.spool import Spool
    from relayq.system.configfile import Source
    from relayq.system.log import Log

__all__ = ["Args", "main", "parse"]


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
    from relayq.system import configfile

    args = parse(argv)
    # who may use which configuration, decided before any mode opens or starts
    # anything (a web application's caller may control argv, D1): 77 otherwise
    source = configfile.select(args.config)
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
    from relayq.cli.submission import chosen_mode, user_names
    from relayq.queue.spool import Spool
    from relayq.server.stdio import serve_stdio

    cfg, log = _open(args, source)
    user, uid, _ = user_names()
    Spool(cfg.queue_dir).enter(cfg)
    return serve_stdio(cfg, log, user=user, uid=uid, mode=chosen_mode(args, cfg))


def verify(cfg: Config, args: Args) -> int:
    """`sendmail -bv`: the route each recipient would take (relayq.cli.verify)."""
    from relayq.cli.verify import verify as show_routes

    return show_routes(cfg, args.recipients, sender=args.sender)


def _verbose_printer(args: Args) -> Callable[[str], None] | None:
    if not args.verbose:
        return None

    def show(line: str) -> None:
        print(line, flush=True)

    return show


def queue_run(cfg: Config, log: Log, args: Args) -> int:
    from relayq.core import selector
    from relayq.delivery import limits
    from relayq.delivery.runner import Runner
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context

    sels = [selector.parse(s) for s in args.selectors]
    spool = Spool(cfg.queue_dir)
    spool.enter(cfg)
    if not spool.writable():
        return ask_flush(spool)
    with Runner(cfg, spool, log, Context(cfg), verbose=_verbose_printer(args)) as runner:
        left = runner.run(force=True, selectors=sels,
                          workers=limits.workers(cfg, cfg.concurrency))
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
    """The submission mode (relayq.cli.submission), then the delivery its mode asks for."""
    from relayq.cli import submission

    done = submission.submit(cfg, log, args)
    if done is None:  # handed over through maildrop/
        return EX_OK
    return _after_commit(cfg, log, done, args)


def _after_commit(cfg: Config, log: Log, done: Committed, args: Args) -> int:
    """Start the delivery the mode asks for (relayq.delivery.after); the message is
    committed: any trouble now leaves it queued, and the caller hears 0 (or, when
    interactive, the attempt's status as -oe says)."""
    from relayq.core import policy

    msg = done.msg
    if policy.after_commit(done.mode) == policy.LEAVE:  # queue-only: import nothing more
        msg.release()
        return EX_OK
    from relayq.delivery.after import deliver_committed

    attempt = deliver_committed(cfg, log, done.ctx, done.spool, [msg.qid], done.mode,
                                {msg.qid: msg.detach()}, _verbose_printer(args))
    status = policy.interactive_status(attempt.codes)
    # -oep prints; -oem/-oew mail the error back (the bounce is always queued);
    # -oeq is quiet; -oee exits 0 (sendmail's ErrorMode)
    if status and args.error_mode == "p":
        for r in attempt.failed:
            print(f"sendmail: {r.address}... {r.reply}", file=sys.stderr)
    if args.error_mode == "e":
        return EX_OK
    return status


if __name__ == "__main__":
    sys.exit(main())
