"""The one place where an exception becomes one line on stderr and a sysexits code.

It sits on every command's hot path (sendmail runs once per message), so it
imports nothing beyond sys, os and our own tiny errors module; syslog,
traceback and stat are imported only when something went wrong.
"""

from __future__ import annotations

import os
import sys

from relayq.core.errors import EX_IOERR, EX_OSERR, EX_SOFTWARE, EX_TEMPFAIL, RelayqError

TYPE_CHECKING = False  # the typing module costs ~3 ms on the submission path

if TYPE_CHECKING:
    from collections.abc import Callable


def run(main: Callable[[], int], prog: str) -> int:
    """Call `main` and turn whatever it raises into an exit code.

    RelayqError -> "prog: message" and its code; KeyboardInterrupt -> 75;
    a broken stdout pipe (`mailq | head`) -> 74 without a word; MemoryError
    -> 71; anything else is a bug: one line on the terminal, 70, and the
    traceback in syslog (mail.err) where an admin can find it, never on the
    terminal of a cron job or a PHP page.
    """
    _fill_std_fds()
    try:
        code = main()
        if sys.stdout is not None:
            sys.stdout.flush()  # a broken pipe surfaces here, not at interpreter exit
        return code
    except RelayqError as exc:
        _say(f"{prog}: {exc.message}")
        return exc.code
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return EX_TEMPFAIL
    except BrokenPipeError:
        if not _stdout_is_pipe():
            _say(f"{prog}: write error: broken pipe")
        _silence_stdout()
        return EX_IOERR
    except MemoryError:
        _say(f"{prog}: out of memory")
        return EX_OSERR
    except Exception as exc:
        _say(f"{prog}: internal error: {type(exc).__name__}: {_one_line(str(exc))} (please report)")
        _log_traceback(prog)
        return EX_SOFTWARE


def _fill_std_fds() -> None:
    """Open /dev/null on a closed 0, 1 or 2 (a caller may close them): else the first
    file we open, a queue or drop file, would be read as stdin or written as stdout."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one


def leave(code: int) -> None:
    """Exit without tearing the interpreter down (the command is finished).

    Freeing every object at exit costs ~1 ms, and after sendmail's background
    fork it writes to every shared page, copying them all (~3 ms): a cost each
    caller of sendmail waits for. Nothing is left to flush but stdio.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # Python found the descriptor closed at start
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            if code == 0:
                code = EX_IOERR
    os._exit(code)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # nowhere left to complain


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so Python's exit-time flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _stdout_is_pipe() -> bool:
    import stat

    try:
        mode = os.fstat(1).st_mode
    except OSError:
        return True
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _log_traceback(prog: str) -> None:
    try:
        import syslog
        import traceback

        syslog.openlog(prog, syslog.LOG_PID, syslog.LOG_MAIL)
        for block in traceback.format_exc().splitlines():
            if block.strip():
                syslog.syslog(syslog.LOG_ERR, block)
    except Exception:
        pass  # logging must never turn one error into two
