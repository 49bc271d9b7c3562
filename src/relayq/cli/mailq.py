"""`mailq` and `sendmail -bp`: list the queue in sendmail 8.17's format, or as JSON.

The plain listing is byte for byte what sendmail prints (see peers.md 4.1 and
`print_single_queue()` in sendmail's queue.c), so scripts and fingers that
parse sendmail's mailq keep working. Differences, all where relayq has no
sendmail equivalent:

* The -v priority column is 30000 per pending recipient plus the data size,
  which reproduces what sendmail's MSP showed in our measurements (30014 for
  one recipient, 60032 for two); relayq does not order by priority.
* -v prints no "(---controlling user---)" lines: relayq has no such record;
  in their place, a message queued for a non-default account (relayq.toml's
  [account.NAME]) shows "(account NAME)". --json-lines objects of such a message
  have an "account" member; --json names every message's account.
* A damaged entry is listed as `QID (damaged: why)` so an admin sees it; it is
  counted in "Total requests" and hidden only when an R or S selector is given
  (there is nothing to match them against).
* --json-lines is `postqueue -j`'s format (relayq.queue.listing.render_json_lines).
* --json lists every recipient with its state (sent, failed, pending) and
  reply; damaged entries go to a separate "damaged" list, and "total" counts
  both, like the text listing.

Exit status: 0, or 77 when the queue directory exists but may not be read.
Importing this module costs little: json is imported only for --json and --json-lines.
"""

from __future__ import annotations

import gc
import sys

from relayq.core.errors import EX_IOERR, RelayqError
from relayq.queue.listing import (  # noqa: F401  (prtstr: its old name)
    collect,
    parse_args,
    prtstr,
    render,
    render_json,
    render_text,
    stream_json_lines,
    stream_text,
)

TYPE_CHECKING = False  # the typing module costs ~3 ms on every listing

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.queue.spool import Spool

USAGE = """\
usage: mailq [-Ac | -Am] [-v] [-q[!]Isubstr] [-q[!]Rsubstr] [-q[!]Ssubstr] [-C config]
             [--json | --json-lines]

  -Ac, -Am       accepted for sendmail compatibility (relayq has one queue)
  -v             verbose listing (priority column)
  -q[!]I|R|S...  only messages whose queue id, a recipient or the sender
                 contains the substring (! = does not contain); several of one
                 kind: any may match; of different kinds: all must match
  -C FILE        configuration file
  --json         one JSON document with everything about every message
  --json-lines   one JSON object per message and line, with the members of
                 Postfix's `postqueue -j` (queue_name: incoming, active,
                 deferred or hold), so its jq scripts carry over
  -L, -O, -o     accepted and ignored (sendmail options)
"""


def main(argv: list[str] | None = None, *, prog: str = "mailq") -> int:
    """Console script `mailq`; `sendmail -bp` calls it with its remaining flags."""
    from relayq.cli._exit import run

    args = list(sys.argv[1:] if argv is None else argv)
    return run(lambda: _main(args), prog)


def _main(args: list[str]) -> int:
    opts = parse_args(args)
    if opts.help:
        sys.stdout.write(USAGE)
        return 0
    from relayq.queue.spool import Spool
    from relayq.system import configfile

    cfg = configfile.select(opts.config).load()  # -C is root's (77)
    spool = Spool(cfg.queue_dir)
    spool.enter()
    if not spool.writable():
        return _ask_daemon(spool, args)
    if not opts.json and not opts.selectors:
        # each entry is parsed, printed and dropped: nothing for the cycle
        # collector to find, which at 100,000 entries costs 5 % to look for
        gc.disable()
        buffered: list[bytes] = []
        size = 0
        chunks = stream_json_lines(spool) if opts.json_lines else \
            stream_text(spool, opts.verbose)
        for chunk in chunks:
            buffered.append(chunk)
            size += len(chunk)
            if size >= 1 << 16 or len(buffered) == 2:  # the header goes out at once
                write(b"".join(buffered))
                buffered, size = [], 0
        write(b"".join(buffered))
        return 0
    write(render(spool.queue, collect(spool, opts.selectors), opts))
    return 0


def _ask_daemon(spool: Spool, args: list[str]) -> int:
    """A queue we may not read: the daemon lists our own messages (relayq.system.control)."""
    for chunk in ask_daemon(spool, args):
        write(chunk)
    return 0


def ask_daemon(spool: Spool, args: list[str]) -> Iterator[bytes]:
    """The listing mailq ARGS would print, from the daemon: for a user who may not
    read the queue, their own messages only (all of them for the admin group)."""
    import json

    from relayq.system.control import Connection

    conn = Connection.open(spool.socket_path, "mailq " + json.dumps(args), 60.0)
    if conn is None:
        raise RelayqError("the queue report is unavailable: the relayq daemon is not "
                          "running (only root may read the queue itself)", 69)
    try:
        status = conn.status()
        if status is None:
            raise RelayqError("the relayq daemon went away before answering", 69)
        code, text = status
        if code:
            raise RelayqError(text, code)
        yield from conn.body()
    finally:
        conn.close()


def write(data: bytes) -> None:
    """Write the listing; a full disk or closed terminal is exit 74, not a bug."""
    try:
        _write_all(data)
    except BrokenPipeError:
        raise  # the reader went away (mailq | head): _exit.run stays quiet
    except OSError as exc:
        raise RelayqError(f"write error: {exc.strerror or exc}", code=EX_IOERR) from None


def _write_all(data: bytes) -> None:
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        sys.stdout.flush()
        view = memoryview(data)
        while view:  # a write cut short by a closing pipe must not pass as success
            view = view[buffer.write(view) or 0 :]
        buffer.flush()
    else:
        sys.stdout.write(data.decode("utf-8", "surrogateescape"))


if __name__ == "__main__":
    sys.exit(main())
