"""The envelope of a queued message and its on-disk record (format version 1).

The record is plain text, one field per line, tab-separated, so that it is
read without a parser library and survives a hex editor:

    relayq-envelope<TAB>1
    id<TAB>6AQ1UaXXXX0001
    created<TAB>1764120000.123456
    sender<TAB>alice@example.org          (empty: the null sender <>)
    user<TAB>alice<TAB>1000               (who submitted it)
    size<TAB>1234
    body<TAB>8BITMIME                     (7BIT, 8BITMIME or empty)
    smtputf8<TAB>1
    envid<TAB>xtext
    ret<TAB>HDRS                          (FULL, HDRS or empty)
    msgid<TAB><...@example.org>
    dsn<TAB>1                             (this message is itself a bounce)
    attempts<TAB>3
    last_try<TAB>1764120300.0
    next_try<TAB>1764120600.0
    error<TAB>Deferred: Connection refused by [127.0.0.1]
    held<TAB>1                            (only when held by the administrator)
    warned<TAB>1                          (only once the delay warning went out)
    double<TAB>1                          (only on a postmaster copy of a failed bounce)
    drop<TAB>HEX:INODE:MTIME_NS           (only when taken from maildrop/: that file)
    rcpt<TAB>STATE<TAB>NOTIFY<TAB>ORCPT<TAB>ADDRESS<TAB>REPLY
    end

STATE is `pending`, `sent` or `failed`. Unknown keys are ignored so an older
relayq can still list a newer queue; the trailing `end` line tells a complete
record from a truncated one. Values never hold a CR, LF or NUL: addresses
are refused with them at submission, and free text is flattened here. Nor a
tab, except a recipient ADDRESS: a local target an alias names ("|cmd<TAB>arg",
even with a CR) is recorded as written, and the columns around it are read
from both ends.
"""

from __future__ import annotations

from relayq.errors import DamagedQueueFile

FORMAT_VERSION = 1
MAGIC = "relayq-envelope"

PENDING = "pending"
SENT = "sent"
FAILED = "failed"
STATES = (PENDING, SENT, FAILED)


def flatten(text: str) -> str:
    """Make free text (a server's reply) safe for one record field."""
    return "".join(" " if ord(c) < 32 or c == "\x7f" else c for c in text).strip()


class Recipient:
    __slots__ = ("address", "notify", "orcpt", "reply", "state")

    def __init__(
        self,
        address: str,
        state: str = PENDING,
        notify: str = "",
        orcpt: str = "",
        reply: str = "",
    ) -> None:
        self.address = address
        self.state = state
        self.notify = notify  # "", "NEVER" or a comma list of SUCCESS,FAILURE,DELAY
        self.orcpt = orcpt  # "rfc822;addr" (xtext) or ""
        self.reply = reply  # the relay's reply or our reason, for mailq and DSNs

    def __repr__(self) -> str:
        return f"Recipient({self.address!r}, {self.state!r})"


class Envelope:
    __slots__ = (
        "attempts",
        "body",
        "created",
        "double_bounce",
        "drop",
        "envid",
        "error",
        "held",
        "is_dsn",
        "last_try",
        "msgid",
        "next_try",
        "qid",
        "recipients",
        "ret",
        "sender",
        "size",
        "smtputf8",
        "uid",
        "user",
        "warned",
    )

    def __init__(self, qid: str, sender: str, recipients: list[Recipient], created: float) -> None:
        self.qid = qid
        self.sender = sender
        self.recipients = recipients
        self.created = created
        self.user = ""
        self.uid = -1
        self.size = 0
        self.body = ""
        self.smtputf8 = False
        self.envid = ""
        self.ret = ""
        self.msgid = ""
        self.is_dsn = False
        self.attempts = 0
        self.last_try = 0.0
        self.next_try = 0.0
        self.error = ""
        self.held = False  # by the administrator: no run delivers it (relayq hold)
        self.warned = False  # the sender has had its delay warning
        self.double_bounce = False  # a report about an undeliverable bounce (postmaster)
        self.drop = ""  # the maildrop/ file this message was taken from (maildrop.identity)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def dumps(self) -> bytes:
        out = [
            f"{MAGIC}\t{FORMAT_VERSION}",
            f"id\t{self.qid}",
            f"created\t{self.created:.6f}",
            f"sender\t{self.sender}",
            f"user\t{flatten(self.user)}\t{self.uid}",
            f"size\t{self.size}",
            f"body\t{self.body}",
            f"smtputf8\t{int(self.smtputf8)}",
            f"envid\t{self.envid}",
            f"ret\t{self.ret}",
            f"msgid\t{flatten(self.msgid)}",
            f"dsn\t{int(self.is_dsn)}",
            f"attempts\t{self.attempts}",
            f"last_try\t{self.last_try:.6f}",
            f"next_try\t{self.next_try:.6f}",
            f"error\t{flatten(self.error)}",
        ]
        for key, on in (("held", self.held), ("warned", self.warned),
                        ("double", self.double_bounce)):
            if on:
                out.append(f"{key}\t1")
        if self.drop:
            out.append(f"drop\t{flatten(self.drop)}")
        for r in self.recipients:
            out.append(f"rcpt\t{r.state}\t{r.notify}\t{r.orcpt}\t{r.address}\t{flatten(r.reply)}")
        out.append("end\n")
        return "\n".join(out).encode("utf-8", "surrogateescape")

    @classmethod
    def loads(cls, raw: bytes, qid: str) -> Envelope:
        """Parse a record; any inconsistency raises DamagedQueueFile."""
        try:
            return cls._parse(raw.decode("utf-8", "surrogateescape"), qid)
        except DamagedQueueFile:
            raise
        except (ValueError, IndexError, KeyError) as exc:
            raise DamagedQueueFile(f"{qid}: unreadable envelope ({exc})") from None

    @classmethod
    def _parse(cls, text: str, qid: str) -> Envelope:
        lines = text.split("\n")
        head = lines[0].split("\t")
        if head[0] != MAGIC or len(head) != 2:
            raise DamagedQueueFile(f"{qid}: not a relayq envelope")
        if int(head[1]) > FORMAT_VERSION:
            raise NewerFormat(f"{qid}: envelope format {head[1]} is newer than this relayq")
        try:
            end = lines.index("end", 1)
        except ValueError:
            raise DamagedQueueFile(f"{qid}: truncated envelope") from None
        fields: dict[str, str] = {}
        rcpts: list[Recipient] = []
        for line in lines[1:end]:
            key, _, rest = line.partition("\t")
            if key == "rcpt":
                # ADDRESS may hold a tab (an alias's "|command" or "/file" as written);
                # REPLY never does (flattened), and the columns before it are
                # checked tokens: so the address is whatever lies between them
                state, notify, orcpt, tail = rest.split("\t", 3)
                address, reply = tail.rsplit("\t", 1)
                if state not in STATES or not address:
                    raise DamagedQueueFile(f"{qid}: bad recipient line")
                rcpts.append(Recipient(address, state, notify, orcpt, reply))
            else:
                fields[key] = rest
        # a field's first column is its value: later formats may add columns
        get = fields.get
        if get("id", "").partition("\t")[0] != qid:
            raise DamagedQueueFile(f"{qid}: envelope names another message")
        if not rcpts:
            raise DamagedQueueFile(f"{qid}: envelope without recipients")
        env = cls(qid, fields["sender"].partition("\t")[0], rcpts,
                  float(fields["created"].partition("\t")[0]))
        user, _, uid = get("user", "\t-1").partition("\t")
        env.user, env.uid = user, int(uid.partition("\t")[0] or -1)
        env.size = int(get("size", "0").partition("\t")[0])
        env.body = get("body", "").partition("\t")[0]
        env.smtputf8 = get("smtputf8", "0").partition("\t")[0] == "1"
        env.envid = get("envid", "").partition("\t")[0]
        env.ret = get("ret", "").partition("\t")[0]
        env.msgid = get("msgid", "").partition("\t")[0]
        env.is_dsn = get("dsn", "0").partition("\t")[0] == "1"
        env.attempts = int(get("attempts", "0").partition("\t")[0])
        env.last_try = float(get("last_try", "0").partition("\t")[0])
        env.next_try = float(get("next_try", "0").partition("\t")[0])
        env.error = get("error", "").partition("\t")[0]
        env.held = get("held", "0").partition("\t")[0] == "1"
        env.warned = get("warned", "0").partition("\t")[0] == "1"
        env.double_bounce = get("double", "0").partition("\t")[0] == "1"
        env.drop = get("drop", "").partition("\t")[0]
        return env


class NewerFormat(DamagedQueueFile):
    """Written by a later relayq: leave it alone rather than quarantine it."""
