"""contrib/bash-completion: run by bash itself, and held to the parser and mailq's usage
so that a new command or option cannot be left out (or a removed one left in)."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from relayq.cli.args import build_parser
from relayq.cli.mailq import USAGE

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "contrib" / "bash-completion"
PARSER = build_parser()
SUBS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction))


def complete(script: str, words: list[str], env: dict[str, str] | None = None) -> list[str]:
    """What bash's completion function for words[0] offers for the last word."""
    line = " ".join(shlex.quote(w) for w in words)
    program = (f"source {shlex.quote(str(SCRIPTS / script))}\n"
               f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
               f"fn=$(complete -p {shlex.quote(words[0])} | sed -E 's/.*-F ([^ ]+).*/\\1/')\n"
               '"$fn" "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" '
               '"${COMP_WORDS[COMP_CWORD-1]}"\n'
               'printf "%s\\n" "${COMPREPLY[@]}"\n')
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], env=env,
                         capture_output=True, text=True, timeout=30, check=True)
    return [w for w in out.stdout.splitlines() if w]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


@pytest.mark.parametrize("script", ["relayq", "mailq"])
def test_the_script_registers_its_command(script: str) -> None:
    out = subprocess.run(["bash", "--norc", "-c", f"source {SCRIPTS / script}; complete -p"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert re.search(rf"^complete -F \S+ {script}$", out, re.M), out


def test_relayq_completes_every_command_of_the_parser() -> None:
    assert sorted(complete("relayq", ["relayq", ""])) == sorted(SUBS.choices)
    assert complete("relayq", ["relayq", "-v", "fl"]) == ["flush"]
    assert complete("relayq", ["relayq", "-C", "/etc/relayq.toml", "ho"]) == ["hold"]


def test_relayq_completes_exactly_the_parser_options() -> None:
    assert set(complete("relayq", ["relayq", "-"])) == options(PARSER)
    for name, sub in SUBS.choices.items():
        offered = set(complete("relayq", ["relayq", "-v", name, "-"]))
        assert offered == options(sub), name


def test_relayq_completes_oauth2_actions_and_exactly_their_options() -> None:
    oauth2 = SUBS.choices["oauth2"]
    actions = next(a for a in oauth2._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(complete("relayq", ["relayq", "oauth2", ""])) == sorted(actions.choices)
    for name, sub in actions.choices.items():
        offered = set(complete("relayq", ["relayq", "oauth2", name, "--account", "x", "-"]))
        assert offered == options(sub), name
    assert complete("relayq", ["relayq", "oauth2", "login", "--provider", "g"]) == [
        "google", "generic"]


def test_relayq_completes_files_and_directories_for_their_options(tmp_path: Path) -> None:
    (tmp_path / "relayq.toml").write_text("")
    (tmp_path / "dir").mkdir()
    prefix = str(tmp_path) + "/"
    assert complete("relayq", ["relayq", "-C", prefix + "re"]) == [prefix + "relayq.toml"]
    assert complete("relayq", ["relayq", "install", "--root", prefix]) == [prefix + "dir"]
    assert complete("relayq", ["relayq", "daemon", "-q", ""]) == []


def usage_options() -> set[str]:
    """Every option mailq's usage lists, but those it accepts and ignores."""
    found: set[str] = set()
    for line in USAGE.split("\n\n", 1)[1].splitlines():
        if not line.startswith("  -") or "ignored" in line:
            continue
        column = line.strip().split("  ")[0]
        for flag in column.split(", "):
            flag = flag.split(" ")[0]
            if flag.startswith("-q[!]"):  # -q[!]I|R|S...
                found |= {f"-q{bang}{k}" for bang in ("", "!") for k in "IRS"}
            else:
                found.add(flag)
    return found


def test_mailq_completes_every_usage_option() -> None:
    offered = set(complete("mailq", ["mailq", "-"]))
    assert usage_options() <= offered
    assert offered - usage_options() <= {"--help"}
    assert complete("mailq", ["mailq", "--j"]) == ["--json", "--json-lines"]
