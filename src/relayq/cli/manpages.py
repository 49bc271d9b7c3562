"""Man pages generated from the tables the commands run on, so they cannot drift.

relayq.toml(5) is `core.config.SCHEMA` (the meaning from docs/configuration.md's
key table where it says more), sendmail(8) is `cli.flags`' tables (the prose from
docs/sendmail-compat.md's flag table; a flag with no row there is an error, not a
page without it), relayq(8) is `cli.args`' argument parser, mailq(1) is
`cli.mailq.USAGE`. `render()` is pure (texts in, roff out); `main()` is
`make man`, which writes build/man/: the pages are built, never committed
(`relayq install --root DIR` writes them into a package's staging root).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relayq import __version__
from relayq.cli import flags
from relayq.core.config import DELIVERY_MODES, SCHEMA
from relayq.core.errors import PermissionRefused, RelayqError

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable

PAGES = ("sendmail.8", "mailq.1", "newaliases.8", "relayq.8", "relayq.toml.5")
DOCS = ("configuration.md", "sendmail-compat.md")


def see_also(page: str) -> str:
    """The other pages of the set, each naming the rest."""
    refs = [f".BR {p.rsplit('.', 1)[0]} ({p.rsplit('.', 1)[1]})" for p in PAGES if p != page]
    return ".SH SEE ALSO\n" + ",\n".join(refs) + "\n"


def esc(text: str) -> str:
    """Plain text as roff: backslashes escaped, no line read as a request."""
    out = _unicode(text.replace("\\", "\\e"))
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in out.split("\n"))


def _unicode(text: str) -> str:
    """Non-ASCII as groff's \\[uXXXX]: troff warns on raw UTF-8 in its input."""
    return "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in text)


def inline(md: str) -> str:
    """One cell of a docs table: `code` and **strong** in bold, the rest escaped."""
    md = md.replace("\\|", "|")
    out, bold, i = [], False, 0
    while i < len(md):
        if md[i] == "`" or md.startswith("**", i):
            out.append("\\fR" if bold else "\\fB")
            bold = not bold
            i += 1 if md[i] == "`" else 2
            continue
        ch = md[i]
        out.append("\\e" if ch == "\\" else "\\-" if ch == "-" and bold else ch)
        i += 1
    if bold:
        out.append("\\fR")
    text = _unicode("".join(out))
    return "\\&" + text if text[:1] in (".", "'") else text


def _head(name: str, section: str, summary: str) -> list[str]:
    return [f'.TH {name.upper()} {section} "" "relayq {__version__}" "relayq"',
            ".SH NAME", f"{name} \\- {esc(summary)}"]


def md_table(text: str, header: str) -> list[tuple[str, str, str]]:
    """The rows of the markdown table under `header` (its first line), as cells:
    (first, second, rest). Cells hold unescaped `|` in prose, so only the first
    two separators split."""
    lines = text.splitlines()
    try:
        start = lines.index(header) + 2
    except ValueError:
        raise RelayqError(f"docs: no table starting {header!r}") from None
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        cells = line[2:].rstrip(" |").split(" | ", 2)
        rows.append((cells[0], cells[1] if len(cells) > 1 else "", cells[-1]))
    return rows


# relayq.toml(5)

def _duration(seconds: float) -> str:
    if not seconds:
        return "0"
    out, rest = "", int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


def toml_default(key: str) -> str:
    """A key's default as one would write it in relayq.toml."""
    default, checker, _ = SCHEMA[key]
    if key == "delivery_mode":
        default = {v: k for k, v in DELIVERY_MODES.items()}[default]
    if getattr(checker, "__name__", "") == "_duration":
        return f'"{_duration(default)}"'
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, list):
        return "[" + ", ".join(f'"{v}"' for v in default) + "]"
    return f'"{default}"' if isinstance(default, str) else str(default)


def relayq_toml(configuration_md: str) -> str:
    """relayq.toml(5): every key of SCHEMA, in its order, with its default."""
    meaning = {first.strip("`"): rest for first, _, rest in
               md_table(configuration_md, "| key | default | meaning |")}
    out = _head("relayq.toml", "5", "relayq configuration file")
    out += [".SH SYNOPSIS", "/etc/relayq/relayq.toml", ".SH DESCRIPTION",
            "A TOML file of top-level keys. It is optional: a missing key, or a missing",
            "file, takes the default below. A wrong key or value is an error naming it",
            "(exit 78). Durations are seconds or sendmail's intervals",
            "(\\fB30m\\fR, \\fB1h30m\\fR, \\fB5d\\fR).",
            "A file holding \\fBpassword\\fR must not be readable by others.",
            "\\fBrelayq check-config\\fR prints the effective configuration.",
            ".SH KEYS"]
    for key, (_, _, help_text) in SCHEMA.items():
        out += [".TP", f"\\fB{key}\\fR = {esc(toml_default(key))}",
                inline(meaning.get(key, help_text))]
    out += [".SH FILES", ".TP", "/etc/relayq/relayq.toml", "the system configuration",
            ".TP", "/usr/share/doc/relayq/configuration.md",
            "TLS, secrets, smarthosts, mail loops and local delivery in detail"]
    return "\n".join(out) + "\n" + see_also("relayq.toml.5")


# sendmail(8)

def _o_behaviour(name: str) -> str:
    """What `-O name=` does, asked of the parser itself."""
    try:
        args = flags.parse(["-O", f"{name}=", "x@example.org"])
    except PermissionRefused:
        return "refused (exit 77)"
    except RelayqError:
        return "honoured (see OPTIONS)"
    return "accepted and ignored" if args.ignored else "honoured (see OPTIONS)"


def sendmail_page(compat_md: str) -> str:
    """sendmail(8): the docs' flag table, checked against flags.py's letters."""
    rows = md_table(compat_md, "| flag | relayq |")
    letters = sorted(flags.FLAGS | flags.WITH_ARG, key=lambda c: (c.lower(), c))
    missing = [c for c in letters if not any(f"`-{c}" in first for first, _, _ in rows)]
    if missing:
        raise RelayqError(f"docs/sendmail-compat.md: no row for -{', -'.join(missing)}")
    out = _head("sendmail", "8", "send mail through relayq (a null client)")
    out += [".SH SYNOPSIS", ".B sendmail",
            "[\\fB\\-" + "".join(sorted(flags.FLAGS)) + "\\fR]",
            *(f"[\\fB\\-{c}\\fR \\fIarg\\fR]" for c in letters if c in flags.WITH_ARG),
            "[\\fIrecipient\\fR ...]",
            ".SH DESCRIPTION",
            "relayq's sendmail reads a message on standard input, commits it to the",
            "queue and relays it to the configured smarthost. Flags follow getopt's",
            "rules: clusters (\\fB\\-oi\\fR, \\fB\\-odq\\fR), attached or separate",
            "arguments, options after recipients, and \\fB\\-\\-\\fR to end options.",
            ".SH OPTIONS"]
    for first, _, rest in rows:
        out += [".TP", inline(first), inline(rest.replace(" | ", " \\| "))]
    out += [".SH SENDMAIL OPTIONS (\\-o and \\-O)",
            "\\fB\\-o\\fR\\fIX\\fR is \\fB\\-O\\fR \\fIName\\fR= of the long name below."]
    for letter, name in sorted(flags.SHORT_OPTIONS.items(), key=lambda kv: kv[1].lower()):
        out += [".TP", f"\\fB\\-o{esc(letter)}\\fR, \\fB\\-O {name}\\fR", _o_behaviour(name)]
    extra = sorted(flags.DANGEROUS - {n.lower() for n in flags.SHORT_OPTIONS.values()})
    out += [".PP", "Refused as well (exit 77), with \\fB\\-O\\fR: " + ", ".join(extra) + ".",
            ".SH EXIT STATUS", "sysexits(3): 0 queued or delivered, 64 usage, 65 data,",
            "67 no such user (\\fB\\-bv\\fR),",
            "69 unavailable, 75 temporary failure (mail left queued), 77 not permitted,",
            "78 configuration."]
    return "\n".join(out) + "\n" + _files() + see_also("sendmail.8")


def _files() -> str:
    return ".SH FILES\n.TP\n/etc/relayq/relayq.toml\nsee\n.BR relayq.toml (5)\n" \
           ".TP\n/var/spool/relayq\nthe queue\n"


# mailq(1), newaliases(8)

def mailq_page() -> str:
    from relayq.cli.mailq import USAGE

    usage, _, options = USAGE.partition("\n\n")
    out = _head("mailq", "1", "list relayq's mail queue")
    synopsis = " ".join(usage.removeprefix("usage: ").split())  # wrapped: one roff line
    out += [".SH SYNOPSIS", esc(synopsis), ".SH DESCRIPTION",
            "Lists the queue in sendmail 8.17's format (\\fBsendmail \\-bp\\fR).",
            "Members of \\fBadmin_group\\fR see every message; others their own.",
            ".SH OPTIONS"]
    entries: list[list[str]] = []
    for line in options.splitlines():
        if line.startswith("  ") and not line.startswith("    "):
            flag, _, text = line.strip().partition("  ")
            entries.append([flag, text.strip()])
        elif line.strip() and entries:
            entries[-1][1] += " " + line.strip()
    for flag, text in entries:
        out += [".TP", "\\fB" + esc(flag).replace("-", "\\-") + "\\fR", esc(text)]
    return "\n".join(out) + "\n" + _files() + see_also("mailq.1")


def newaliases_page() -> str:
    out = _head("newaliases", "8", "check relayq's aliases file")
    out += [".SH SYNOPSIS", ".B newaliases", "[\\fB\\-C\\fR \\fIconfig\\fR]",
            ".SH DESCRIPTION", "The same as \\fBsendmail \\-bi\\fR and \\fBrelayq newaliases\\fR.",
            "There is no compiled alias database: the file named by \\fBaliases_file\\fR",
            "(default " + esc(toml_default("aliases_file")) + ") is parsed at each local",
            "delivery. This proves it parses and prints its size; a missing file means",
            "no aliases."]
    return "\n".join(out) + "\n" + see_also("newaliases.8")


# relayq(8)

def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:  # argparse keeps no public list of its arguments
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        metavar = action.metavar or (action.dest.upper() if action.nargs != 0 else "")
        names = ", ".join(f"\\fB{esc(n).replace('-', chr(92) + '-')}\\fR"
                          for n in action.option_strings) or f"\\fI{metavar}\\fR ..."
        arg = f" \\fI{metavar}\\fR" if action.option_strings and action.nargs != 0 else ""
        default = "" if action.default in (None, False, argparse.SUPPRESS) else \
            f" (default: {action.default})"
        out += [".TP", names + arg, esc((action.help or "") + default)]
    return out


def relayq_page(parser: argparse.ArgumentParser) -> str:
    """relayq(8): the global options and every subcommand of the parser."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in subs._choices_actions}
    out = _head("relayq", "8", "relayq mail relay administration")
    out += [".SH SYNOPSIS", ".B relayq", "[\\fIoptions\\fR] \\fIcommand\\fR [\\fIargs\\fR]",
            ".SH DESCRIPTION", esc(parser.description or ""), ".SH OPTIONS"]
    out += _arguments(parser)
    out.append(".SH COMMANDS")
    for name, sub in subs.choices.items():
        what = sub.description or helps.get(name, "")
        out += [".TP", f"\\fBrelayq {esc(name)}\\fR", esc(what)]
        args = _arguments(sub)
        if args:
            out += [".RS", *args, ".RE"]
        for action in sub._actions:  # a command with actions of its own (relayq oauth2)
            if isinstance(action, argparse._SubParsersAction):
                for verb, each in action.choices.items():
                    out += [".TP", f"\\fBrelayq {esc(name)} {esc(verb)}\\fR",
                            esc(each.description or ""), ".RS", *_arguments(each), ".RE"]
    out += [".SH EXIT STATUS", "sysexits(3): 0 done, 64 usage (an unknown command or option,",
            "a missing argument), 66 no such message, 69 unavailable, 75 temporary failure",
            "(mail left queued), 77 not permitted, 78 configuration."]
    return "\n".join(out) + "\n" + _files() + see_also("relayq.8")


def render(page: str, docs: dict[str, str]) -> str:
    """The roff text of one of PAGES; `docs` maps DOCS names to their text."""
    from relayq.cli.args import build_parser

    makers: dict[str, Callable[[], str]] = {
        "sendmail.8": lambda: sendmail_page(docs["sendmail-compat.md"]),
        "mailq.1": mailq_page,
        "newaliases.8": newaliases_page,
        "relayq.8": lambda: relayq_page(build_parser()),
        "relayq.toml.5": lambda: relayq_toml(docs["configuration.md"]),
    }
    return makers[page]()


def has_docs(docsdir: Path) -> bool:
    """Does `docsdir` hold every one of DOCS, plain or gzipped (NAME.gz)?"""
    return all((docsdir / name).is_file() or (docsdir / f"{name}.gz").is_file()
               for name in DOCS)


def read_docs(docsdir: Path) -> dict[str, str]:
    """The DOCS texts `render` takes, from a source tree's docs/ or the Debian
    package's /usr/share/doc/relayq (where dh_installdocs gzipped them)."""
    import gzip

    def read(name: str) -> str:
        if (docsdir / name).is_file():
            return (docsdir / name).read_text(encoding="utf-8")
        with gzip.open(docsdir / f"{name}.gz", "rt", encoding="utf-8") as f:
            return f.read()

    return {name: read(name) for name in DOCS}


def main(argv: list[str] | None = None) -> int:
    """`python -m relayq.cli.manpages OUTDIR [DOCSDIR]` (make man)."""
    args = sys.argv[1:] if argv is None else argv
    outdir = Path(args[0] if args else "build/man")
    docsdir = Path(args[1] if len(args) > 1 else "docs")
    docs = read_docs(docsdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for page in PAGES:
        (outdir / page).write_text(render(page, docs))
        print(outdir / page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
