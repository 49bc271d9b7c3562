"""Fuzz the SMTP reply parser with arbitrary server bytes, fed in pieces."""

import atheris

with atheris.instrument_imports():
    from harness import run

    from relayq.smtp.protocol import ReplyParser, SmtpProtocolError


def target(data: bytes) -> None:
    parser = ReplyParser()
    step = 1 + (data[0] % 17 if data else 0)
    for i in range(0, len(data), step):
        parser.feed(data[i : i + step])
        while (reply := parser.next_reply()) is not None:
            assert 100 <= reply.code <= 599
            assert not any("\n" in line or "\r" in line for line in reply.lines)


if __name__ == "__main__":
    run(target, (SmtpProtocolError,))
