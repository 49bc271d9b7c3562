"""Line-end and dot rules for message text read from `sendmail`'s stdin.

Stored messages use LF line ends. Input may use LF or CRLF; a CR that is not
part of CRLF ("stray CR") is replaced by a space, as Postfix does, so that no
bare CR can ever reach a relay and be read as a line end there (SMTP
smuggling). Without -i, a line holding a single dot ends the message and a
leading doubled dot loses one dot; sendmail keeps a single leading dot
(peers.md 6.4). The work is done on whole blocks with bytes.replace, so a
100 MB message costs a few passes of C code, not a Python loop per line.
"""

from __future__ import annotations

LONG_LINE = 1 << 20  # a partial line longer than this is passed on unfinished


class Normalizer:
    __slots__ = ("carry", "ended", "ignore_dots", "midline")

    def __init__(self, ignore_dots: bool) -> None:
        self.ignore_dots = ignore_dots
        self.carry = b""  # an unfinished line
        self.ended = False  # saw the lone "." line
        self.midline = False  # output so far does not end at a line start

    def feed(self, chunk: bytes) -> bytes:
        if self.ended:
            return b""
        data = self.carry + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) <= LONG_LINE:
                self.carry = data
                return b""
            cut = len(data) - 1 if data.endswith(b"\r") else len(data)
        self.carry = data[cut:]
        return self._block(data[:cut])

    def finish(self) -> bytes:
        """Flush the last line, adding the missing final newline."""
        if self.ended:
            return b""
        data, self.carry = self.carry, b""
        if not data:
            return b""
        return self._block(data + b"\n")

    def _block(self, block: bytes) -> bytes:
        block = block.replace(b"\r\n", b"\n")
        if b"\r" in block:
            block = block.replace(b"\r", b" ")
        if not self.ignore_dots:
            lead = b"" if self.midline else b"\n"
            work = lead + block
            end = work.find(b"\n.\n")
            if end >= 0:
                work = work[: end + 1]
                self.ended = True
            if b"\n.." in work:
                work = work.replace(b"\n..", b"\n.")
            block = work[len(lead) :]
        if block:
            self.midline = not block.endswith(b"\n")
        return block
