"""The aliases parser and expander: pure, no files (includes come from a dict)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayq.core import aliases
from relayq.core.aliases import (
    ADDRESS,
    FILE,
    INCLUDE,
    NAME,
    PIPE,
    USER,
    AliasError,
    AliasLoop,
    IncludeUnreadable,
    Leaf,
    Target,
)

LOCAL = {"", "localhost", "host.example.org"}


def local_part(addr: str) -> str | None:
    local, _, domain = addr.rpartition("@")
    return local if domain.lower() in LOCAL else None


def expand(name: str, text: str, includes: dict[str, str] | None = None,
           **kw: int) -> list[Leaf]:
    files = includes or {}

    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[path]

    leaves, _ = aliases.expand(name, aliases.parse(text, "/etc/aliases"),
                               local_part=local_part, read_include=read, **kw)
    return leaves


def test_parse_entries_continuations_comments_and_quotes() -> None:
    text = (
        "# system aliases\n"
        "postmaster: root\n"
        "Root: admin@example.org,\n"
        "   \\root,\n"
        "\tbackup@example.net\n"
        "\n"
        "logs: /var/log/mail.archive, \"|/usr/bin/logger -t mail\"\n"
        "team: :include:/etc/mail/team, Bob Smith <bob@example.org>\n"
    )
    table = aliases.parse(text)
    assert list(table.entries) == ["postmaster", "root", "logs", "team"]
    assert table.entries["root"] == [
        Target(ADDRESS, "admin@example.org", "/etc/aliases:3"),
        Target(USER, "root", "/etc/aliases:3"),
        Target(ADDRESS, "backup@example.net", "/etc/aliases:3"),
    ]
    assert table.entries["postmaster"] == [Target(NAME, "root", "/etc/aliases:2")]
    assert [(t.kind, t.value) for t in table.entries["logs"]] == [
        (FILE, "/var/log/mail.archive"), (PIPE, "/usr/bin/logger -t mail")]
    assert [(t.kind, t.value) for t in table.entries["team"]] == [
        (INCLUDE, "/etc/mail/team"), (ADDRESS, "bob@example.org")]
    assert table.lines == {"postmaster": 2, "root": 3, "logs": 7, "team": 8}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("root admin@example.org\n", "/etc/aliases:1: missing ':'"),
        ("  admin@example.org\n", "/etc/aliases:1: continuation line without an alias"),
        ("root:\n", "/etc/aliases:1: alias 'root' has no targets"),
        ("a: b\nroot: \"|cmd\n", "/etc/aliases:2: unbalanced quote"),
        ("root: |\n", "/etc/aliases:1: empty command"),
        ("root: :include:relative\n", "/etc/aliases:1: :include: needs an absolute path"),
        ("ro ot: a\n", "/etc/aliases:1: bad alias name"),
        ("root: a b\n", "/etc/aliases:1: bad address"),
        ("root: a,\n  b # a trailing comment is no comment\n", "/etc/aliases:1: bad address"),
        ("root: \\\n", "/etc/aliases:1: bad user name"),
        ("root: a\0\n", "/etc/aliases:1: NUL"),
    ],
)
def test_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(AliasError) as info:
        aliases.parse(text, "/etc/aliases")
    assert message in info.value.message


def test_duplicate_keeps_the_first_and_warns() -> None:
    table = aliases.parse("root: a\nROOT: b\n", "/etc/aliases")
    assert table.entries["root"] == [Target(NAME, "a", "/etc/aliases:1")]
    assert table.warnings == ["/etc/aliases:2: duplicate alias 'root' ignored (first at line 1)"]


def test_statistics_as_newaliases_prints_them() -> None:
    table = aliases.parse("root: admin@example.org\npostmaster: root\n")
    # sendmail counts each side with its NUL: 5 + 18, 11 + 5
    assert (len(table.entries), table.longest, table.total) == (2, 18, 39)


def test_expand_nested_remote_local_and_dedup() -> None:
    text = ("postmaster: root\nroot: ops, admin@example.org\n"
            "ops: alice, admin@example.org, bob@localhost\n")
    assert expand("postmaster", text) == [
        Leaf(USER, "alice"), Leaf(ADDRESS, "admin@example.org"), Leaf(USER, "bob")]


def test_a_name_that_is_no_alias_is_a_user() -> None:
    leaves, aliased = aliases.expand("alice", aliases.parse(""), local_part=local_part,
                                     read_include=lambda p: "")
    assert leaves == [Leaf(USER, "alice")] and aliased is False


def test_self_reference_means_the_mailbox() -> None:
    assert expand("bob", "bob: bob, bob@example.net\n") == [
        Leaf(USER, "bob"), Leaf(ADDRESS, "bob@example.net")]
    assert expand("bob", "bob: \\bob, /tmp/copy\n") == [
        Leaf(USER, "bob"), Leaf(FILE, "/tmp/copy", "bob")]


def test_loop_is_detected_and_named() -> None:
    with pytest.raises(AliasLoop, match="alias loop: a -> b -> c -> a") as info:
        expand("a", "a: b\nb: c\nc: a@localhost\n")
    assert info.value.status == "5.4.6" and not info.value.temporary


def test_depth_limit() -> None:
    text = "".join(f"n{i}: n{i + 1}\n" for i in range(30))
    assert expand("n0", text, max_depth=40) == [Leaf(USER, "n30")]
    with pytest.raises(AliasError, match="nested deeper than 20"):
        expand("n0", text)


def test_include_lists_and_their_errors() -> None:
    text = "team: :include:/lists/team, lead@example.org\n"
    files = {"/lists/team": "# members\nalice, carol@example.org\n\n\"|/bin/notify x\"\n"}
    assert expand("team", text, files) == [
        Leaf(USER, "alice"), Leaf(ADDRESS, "carol@example.org"),
        Leaf(PIPE, "/bin/notify x", "team"), Leaf(ADDRESS, "lead@example.org")]
    with pytest.raises(IncludeUnreadable, match="/etc/aliases:1: cannot read") as info:
        expand("team", text, {})
    assert info.value.temporary
    with pytest.raises(AliasLoop, match="include loop"):
        expand("team", text, {"/lists/team": ":include:/lists/team\n"})
    with pytest.raises(AliasError, match="/lists/team:2: bad address"):
        expand("team", text, {"/lists/team": "ok\nnot ok\n"})


def test_file_and_pipe_owner_is_the_alias_that_named_them() -> None:
    text = "root: ops\nops: /var/log/ops, |/bin/true\n"
    assert expand("root", text) == [Leaf(FILE, "/var/log/ops", "ops"),
                                    Leaf(PIPE, "/bin/true", "ops")]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:,|/\\\"<>@ \t\n#:include:x")), max_size=80))
def test_parse_never_raises_anything_but_alias_error(text: str) -> None:
    try:
        table = aliases.parse(text)
    except AliasError:
        return
    for name in table.entries:
        try:
            aliases.expand(name, table, local_part=local_part,
                           read_include=lambda p: text)
        except AliasError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_parser(text: str) -> None:
    try:
        aliases.parse(text)
    except AliasError:
        pass
