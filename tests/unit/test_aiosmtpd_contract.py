"""What relayq.server.aio relies on in aiosmtpd beyond its documented API.

aiosmtpd is pinned below its next minor version; within that range a release
may still rename or reshape a private member. Each test here names one member
the listener uses, so an upgrade that breaks the reliance fails here, saying
which, before a session misbehaves. The list is the one in aio.py's docstring.

They must pass on both aiosmtpd releases relayq supports: the venv's (the newest
1.4 from PyPI) and Debian 12's 1.4.3+deb12u1 (tests/system/test_debian_python.py
runs this file under /usr/bin/python3 with Debian's packages).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from email import _header_value_parser as vp
from typing import TYPE_CHECKING

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from relayq.core.config import Config
from relayq.queue.submit import Context
from relayq.server.aio import CONNECTED_CB, HTTP_VERBS, Server
from relayq.server.handler import State
from relayq.system.log import Log

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

VERSION = aiosmtpd.__version__

# (member, coroutine?, the parameter names relayq calls or overrides it with)
METHODS = [
    ("_handle_client", True, ["self"]),
    ("_timeout_cb", False, ["self"]),
    ("_reset_timeout", False, ["self", "duration"]),
    ("_getaddr", False, ["self", "arg"]),
    (CONNECTED_CB, False, ["self", "reader", "writer"]),  # its name depends on the release
    ("connection_made", False, ["self", "transport"]),
    ("connection_lost", False, ["self", "error"]),
    ("push", True, ["self", "status"]),
    ("smtp_HELO", True, ["self", "hostname"]),
    ("smtp_EHLO", True, ["self", "hostname"]),
    ("smtp_MAIL", True, ["self", "arg"]),
    ("smtp_RCPT", True, ["self", "arg"]),
    ("smtp_DATA", True, ["self", "arg"]),
]
CLASS_ATTRIBUTES = [("line_length_limit", int), ("local_part_limit", int)]
INSTANCE_ATTRIBUTES = ["_smtp_methods", "_auth_methods", "_timeout_handle", "hostname",
                       "loop", "session", "transport"]


def _where(name: str) -> str:
    return f"aiosmtpd {VERSION}: SMTP.{name}, which relayq.server.aio relies on,"


@pytest.mark.parametrize(("name", "is_coroutine", "params"), METHODS,
                         ids=[m[0] for m in METHODS])
def test_a_method_the_listener_relies_on_is_there_as_it_was(
    name: str, is_coroutine: bool, params: list[str]
) -> None:
    member = getattr(SMTP, name, None)
    assert member is not None, f"{_where(name)} is gone"
    assert inspect.iscoroutinefunction(member) == is_coroutine, (
        f"{_where(name)} is {'no longer' if is_coroutine else 'now'} a coroutine")
    got = list(inspect.signature(member).parameters)
    assert got == params, f"{_where(name)} takes {got} now, not {params}"


def test_the_constructor_hands_the_streams_to_the_connected_callback(server: Server) -> None:
    """clone() builds the stream state itself, passing the method named CONNECTED_CB
    as SMTP.__init__ does (asyncio keeps it as `_client_connected_cb`)."""
    given = getattr(server, "_client_connected_cb", None)
    assert getattr(given, "__func__", None) is getattr(SMTP, CONNECTED_CB), (
        f"{_where(CONNECTED_CB)} is no longer what SMTP() gives asyncio's reader protocol")
    assert given.__self__ is server
    clone = server.clone()
    assert clone._client_connected_cb.__self__ is clone, "a clone calls back the template"


@pytest.mark.parametrize(("name", "kind"), CLASS_ATTRIBUTES,
                         ids=[a[0] for a in CLASS_ATTRIBUTES])
def test_a_class_attribute_the_listener_sets_is_there(name: str, kind: type) -> None:
    assert isinstance(getattr(SMTP, name, None), kind), f"{_where(name)} is not a {kind}"


def test_the_constructor_takes_what_the_listener_passes() -> None:
    got = set(inspect.signature(SMTP.__init__).parameters)
    for name in ("handler", "hostname", "ident", "data_size_limit", "enable_SMTPUTF8",
                 "decode_data", "timeout", "command_call_limit", "loop"):
        assert name in got, f"aiosmtpd {VERSION}: SMTP() takes no {name}= any more"


def test_the_address_parser_aiosmtpd_uses_is_there() -> None:
    """Server._getaddr parses as aiosmtpd does, with the standard library's (private)
    address parser."""
    for name in ("get_angle_addr", "get_addr_spec"):
        assert callable(getattr(vp, name, None)), f"email._header_value_parser.{name} is gone"
    found, rest = vp.get_angle_addr("<a@example.org> SIZE=1")
    assert (found.addr_spec, rest) == ("a@example.org", "SIZE=1")


@pytest.fixture
def server() -> Iterator[Server]:
    cfg = Config({})
    loop = asyncio.new_event_loop()
    state = State(cfg, Log(use_syslog=False), Context(cfg), user="smtp", uid=0,
                  strict=True, on_commit=None)
    try:
        yield Server(state, loop=loop)
    finally:
        loop.close()


@pytest.mark.parametrize("arg", [
    "<a@example.org>", "<a@example.org> SIZE=10 BODY=8BITMIME", "a@example.org", "<>",
    '<"a b"@example.org>', "<@relay.example:a@example.org>", "<a@[127.0.0.1]>", "<a@",
    "not an address", "<a@example.org", "", "<" + "x" * 70 + "@example.org>",
    "<ü@example.org>",
])
@pytest.mark.parametrize("local_part_limit", [0, 64])
def test_our_getaddr_answers_as_aiosmtpds(server: Server, arg: str,
                                          local_part_limit: int) -> None:
    """Server._getaddr replaces aiosmtpd's (which builds a class per call): same
    answers, or a release changed how MAIL/RCPT arguments are parsed."""
    server.local_part_limit = local_part_limit

    def answer(getaddr: Callable[[SMTP, str], object]) -> object:
        try:
            return getaddr(server, arg)
        except Exception as exc:  # "<a@": both raise (the session answers 500)
            return type(exc)

    assert answer(Server._getaddr) == answer(SMTP._getaddr), (
        f"{_where('_getaddr')} parses {arg!r} differently now")


@pytest.mark.parametrize("name", INSTANCE_ATTRIBUTES)
def test_an_attribute_the_constructor_sets_is_there(server: Server, name: str) -> None:
    assert hasattr(server, name), f"{_where(name)} is no longer set by SMTP()"


def test_the_command_table_is_built_from_the_smtp_methods(server: Server) -> None:
    """clone() rebinds `_smtp_methods`; the HTTP verbs get there as smtp_* methods."""
    methods = server._smtp_methods
    assert isinstance(methods, dict), f"{_where('_smtp_methods')} is not a dict"
    for verb in (*HTTP_VERBS, "MAIL", "RCPT", "DATA", "QUIT"):
        assert verb in methods, f"{_where('_smtp_methods')} has no {verb}"
        assert methods[verb].__self__ is server, verb
    assert methods["GET"].__func__ is Server._http


def test_auth_mechanisms_are_kept_as_method_and_builtin_flag(server: Server) -> None:
    """clone() rebuilds `_auth_methods` as type(v)(method, is_builtin)."""
    assert server._auth_methods, f"{_where('_auth_methods')} is empty"
    for name, mech in server._auth_methods.items():
        assert mech._fields == ("method", "is_builtin"), f"{_where('_auth_methods')}[{name}]"
        assert type(mech)(mech.method, mech.is_builtin) == mech


def test_the_reader_is_built_with_the_line_length_limit(server: Server) -> None:
    """Server sets line_length_limit before SMTP.__init__, which builds the reader
    with it (the longest command or data line)."""
    reader = server._stream_reader
    assert isinstance(reader, asyncio.StreamReader)
    assert reader._limit == server.line_length_limit == Config({}).smtp_max_line + 1


def test_the_timer_takes_a_duration(server: Server) -> None:
    """restart_timer(d) (DATA's own time) calls _reset_timeout(d): a timer handle d
    seconds out, not the idle timeout's."""
    loop = server.loop
    before = loop.time()
    server.restart_timer(7)
    handle = server._timeout_handle
    assert isinstance(handle, asyncio.TimerHandle), f"{_where('_timeout_handle')} is no timer"
    assert before + 7 <= handle.when() < before + server._timeout_duration
    handle.cancel()


def test_a_session_reads_from_the_reader_and_sees_its_buffer() -> None:
    """A real session over a socketpair: the CONNECTED_CB method gives `_reader`,
    whose asyncio `_buffer` unread_input() reads (the -bs session's end)."""
    cfg = Config({})
    state = State(cfg, Log(use_syslog=False), Context(cfg), user="smtp", uid=0,
                  strict=False, on_commit=None)
    ours, theirs = socket.socketpair()
    theirs.settimeout(30)

    async def talk() -> tuple[bytes, bool, object]:
        loop = asyncio.get_running_loop()
        _, proto = await loop.connect_accepted_socket(
            lambda: Server(state, loop=loop), sock=ours)
        greeting = await loop.run_in_executor(None, theirs.recv, 4096)
        quiet = proto.unread_input()
        reader = proto._reader
        proto.transport.close()
        await asyncio.sleep(0)
        return greeting, quiet, reader

    loop = asyncio.new_event_loop()
    try:
        greeting, quiet, reader = loop.run_until_complete(talk())
    finally:
        loop.close()
        theirs.close()
    assert greeting.startswith(b"220 ")
    assert quiet is False
    assert isinstance(reader, asyncio.StreamReader), f"{_where('_reader')} is no StreamReader"
    assert isinstance(getattr(reader, "_buffer", None), bytearray), (
        "asyncio.StreamReader._buffer, which Server.unread_input reads, is gone")
