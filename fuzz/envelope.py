"""Fuzz the envelope reader: a record parses whole or is called damaged."""

import atheris

with atheris.instrument_imports():
    from harness import run

    from relayq.core.envelope import Envelope
    from relayq.core.errors import DamagedQueueFile


def target(data: bytes) -> None:
    env = Envelope.loads(data, "kBQ4oAAAAA0001")
    assert env.recipients and Envelope.loads(env.dumps(), env.qid).recipients


if __name__ == "__main__":
    run(target, (DamagedQueueFile,))
