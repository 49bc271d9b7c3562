"""The man pages are generated from the tables the commands run on: a key, flag or
subcommand missing from its page fails here, and each page renders without warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from relayq.cli import flags, manpages
from relayq.cli.main import build_parser
from relayq.core.config import SCHEMA
from relayq.core.errors import RelayqError

ROOT = Path(__file__).resolve().parents[2]
DOCS = {name: (ROOT / "docs" / name).read_text() for name in manpages.DOCS}


def page(name: str) -> str:
    return manpages.render(name, DOCS)


def test_every_config_key_is_in_relayq_toml_5_with_its_default() -> None:
    text = page("relayq.toml.5")
    missing = [key for key in SCHEMA
               if f"\\fB{key}\\fR = {manpages.esc(manpages.toml_default(key))}\n" not in text]
    assert missing == []


def test_defaults_are_written_as_in_relayq_toml() -> None:
    assert manpages.toml_default("delivery_mode") == '"background"'
    assert manpages.toml_default("max_queue_age") == '"5d"'
    assert manpages.toml_default("retry_max") == '"1h6m40s"'
    assert manpages.toml_default("tls_verify") == "true"
    assert manpages.toml_default("listen") == '["127.0.0.1:25", "[::1]:25"]'


def test_every_sendmail_flag_is_in_sendmail_8() -> None:
    text = page("sendmail.8")
    options = text.split(".SH OPTIONS")[1]
    missing = [c for c in flags.FLAGS | flags.WITH_ARG if f"\\fB\\-{c}" not in options]
    assert missing == []
    short = [f"\\fB\\-o{c}\\fR, \\fB\\-O {n}\\fR" for c, n in flags.SHORT_OPTIONS.items()]
    assert [s for s in short if s not in text] == []
    names = text.lower()
    assert [n for n in flags.DANGEROUS if n not in names] == []


def test_a_flag_without_a_docs_row_fails_the_build() -> None:
    compat = DOCS["sendmail-compat.md"].replace("`-L TAG`", "`TAG`")
    with pytest.raises(RelayqError, match="-L"):
        manpages.sendmail_page(compat)


def test_every_relayq_subcommand_and_option_is_in_relayq_8() -> None:
    import argparse

    text = page("relayq.8")
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert [n for n in subs.choices if f"\\fBrelayq {n}\\fR" not in text] == []
    options = [o for p in (parser, *subs.choices.values()) for a in p._actions
               for o in a.option_strings if o not in ("-h", "--help")]
    assert [o for o in options if f"\\fB{o.replace('-', chr(92) + '-')}\\fR" not in text] == []


def test_mailq_1_has_every_usage_option() -> None:
    text = page("mailq.1")
    for flag in ("\\-Ac", "\\-v", "\\-C", "\\-\\-json"):
        assert f"\\fB{flag}" in text
    assert "\\fB\\-\\-json\\fR" in text and "\\fB\\-\\-json\\-lines\\fR" in text


def test_mailq_1_synopsis_is_one_line_of_roff() -> None:
    """A usage wrapped over two lines must not start a roff line with spaces."""
    text = page("mailq.1")
    synopsis = text.split(".SH SYNOPSIS\n", 1)[1].split("\n.SH", 1)[0]
    assert "\n" not in synopsis and "[--json | --json-lines]" in synopsis


def test_make_man_writes_every_page(tmp_path: Path) -> None:
    assert manpages.main([str(tmp_path), str(ROOT / "docs")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(manpages.PAGES)


@pytest.mark.parametrize("name", manpages.PAGES)
def test_each_page_renders_without_warnings(name: str, tmp_path: Path) -> None:
    if shutil.which("groff") is None or shutil.which("man") is None:
        pytest.fail("groff and man are needed: make test-deps installs groff-base and man-db")
    path = tmp_path / name
    path.write_text(page(name))
    groff = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert (groff.returncode, groff.stderr) == (0, "")
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="", MANPAGER="cat", PAGER="cat")
    man = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                         text=True, timeout=60, env=env)
    assert (man.returncode, man.stderr) == (0, "")
    title = name.rsplit(".", 1)[0].upper()
    assert man.stdout.startswith(f"{title}(") and "NAME" in man.stdout


def test_the_docs_may_be_gzipped(tmp_path: Path) -> None:
    """The Debian package ships docs/ gzipped in /usr/share/doc/relayq: the same texts."""
    import gzip

    assert not manpages.has_docs(tmp_path)
    (tmp_path / "configuration.md").write_text(DOCS["configuration.md"])
    (tmp_path / "sendmail-compat.md.gz").write_bytes(
        gzip.compress(DOCS["sendmail-compat.md"].encode()))
    assert manpages.has_docs(tmp_path)
    assert manpages.read_docs(tmp_path) == DOCS
