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
    relay<TAB>mail.example.org            (the relay that gave the last answers)
    reported<TAB>0,2                      (failed recipients whose report is queued)
    remote<TAB>0,1                        (recipients whose reply is the relay's words)
    notice<TAB>QID<TAB>KIND<TAB>0,2       (a report being made: see runner.settle)
    about<TAB>QID                         (on a report: the message it reports on)
    dead<TAB>reason                       (a dead letter: nowhere left to report it)
    unsure<TAB>1                          (the last attempt lost the reply to its final dot)
    drop<TAB>HEX:INODE:MTIME_NS           (only when taken from maildrop/: that file)
    account<TAB>shop                      (the account chosen at submission; none: default)
    rcpt<TAB>STATE<TAB>NOTIFY<TAB>ORCPT<TAB>ADDRESS<TAB>REPLY
    end

STATE is `pending`, `sent` or `failed`. A failed recipient not listed in
`reported` is owed a report (an older record without the key owes none: its
bounces were made before it was written). Unknown keys are ignored so an older
relayq can still list a newer queue; the trailing `end` line tells a complete
record from a truncated one. Values never hold a CR, LF or NUL: addresses
are refused with them at submission, and free text is flattened here. Nor a
tab, except a recipient ADDRESS: a local target an alias names ("|cmd<TAB>arg",
even with a CR) is recorded as written, and the columns around it are read
from both ends.
"""

from __future__ import annotations

from relayq.core.errors import DamagedQueueFile
from relayq.core.outcome import FAILED, PENDING, SENT, STATES

__all__ = ["FAILED", "PENDING", "SENT", "STATES"]  # the states, as before (core.outcome)

FORMAT_VERSION = 1
MAGIC = "relayq-envelope"

# Kinds of report (the `notice` key): to the sender about failures or a delay,
# or to the postmaster about a message that cannot be reported to its sender.
BOUNCE = "bounce"
WARNING = "warning"
DOUBLE = "double"
NOTICE_KINDS = (BOUNCE, WARNING, DOUBLE)

# A server's reply kept for mailq and reports; an SMTP reply line is at most
# 512 octets (RFC 5321 4.5.3.1.5), a multi-line one is cut here so that the
# record an attempt will write has a size known before the attempt.
MAX_REPLY = 1000


def flatten(text: str) -> str:
    """Make free text (a server's reply) safe for one record field."""
    return "".join(" " if ord(c) < 32 or c == "\x7f" else c for c in text).strip()


def _bounded(text: str) -> str:
    """Flattened and at most MAX_REPLY bytes as stored (UTF-8): the record's size
    must be known before the attempt (see spool.Claim.mark_sending)."""
    text = flatten(text)
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_REPLY:
        return text
    return raw[: MAX_REPLY - 3].decode("utf-8", "ignore") + "..."


class Notice:
    """A report being made about this message: its queue id, kind and recipients.

    Recorded before the report is committed, cleared (and its recipients
    marked reported) after: a crash in between finds the report by its id
    instead of making a second one.
    """

    __slots__ = ("indices", "kind", "qid")

    def __init__(self, qid: str, kind: str, indices: list[int]) -> None:
        self.qid = qid
        self.kind = kind
        self.indices = indices

    def dumps(self) -> str:
        return f"{self.qid}\t{self.kind}\t{','.join(map(str, self.indices))}"

    @classmethod
    def loads(cls, value: str) -> Notice:
        qid, kind, indices = value.split("\t")[:3]
        if not qid:
            raise ValueError("bad notice")
        if kind not in NOTICE_KINDS:  # a later relayq's report: not ours to finish
            raise NewerFormat(f"notice of an unknown kind {kind!r}")
        return cls(qid, kind, _indices(indices))


def _indices(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


class Recipient:
    __slots__ = ("address", "notify", "orcpt", "remote", "reply", "state")

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
        self.remote = False  # the reply is the relay's words (recorded in `remote`)

    def __repr__(self) -> str:
        return f"Recipient({self.address!r}, {self.state!r})"


class Envelope:
    __slots__ = (
        "about",
        "account",
        "attempts",
        "body",
        "created",
        "dead",
        "double_bounce",
        "drop",
        "envid",
        "error",
        "held",
        "is_dsn",
        "last_try",
        "msgid",
        "next_try",
        "notice",
        "qid",
        "recipients",
        "relay",
        "reported",
        "ret",
        "sender",
        "size",
        "smtputf8",
        "uid",
        "unsure",
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
        self.relay = ""  # the relay whose answers were recorded last (Remote-MTA)
        self.reported: set[int] = set()  # failed recipients whose report is queued
        self.notice: Notice | None = None  # a report being made (see Notice)
        self.about = ""  # on a report: the queue id of the message it is about
        self.dead = ""  # why this is a dead letter (kept in quarantine/)
        self.unsure = False  # the last attempt lost the reply after its final dot
        self.drop = ""  # the maildrop/ file this message was taken from (maildrop.identity)
        self.account = ""  # the account (core/accounts) chosen when queued; "": default

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def owed(self) -> list[int]:
        """Failed recipients whose report is neither queued nor being made."""
        making = set(self.notice.indices) if self.notice and self.notice.kind != WARNING \
            else set()
        return [i for i, r in enumerate(self.recipients)
                if r.state == FAILED and i not in self.reported and i not in making]

    def unsettled(self) -> bool:
        """Does the message still need a run: a recipient to try or a report to make?"""
        return bool(self.notice or self.pending() or self.owed())

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
            f"error\t{_bounded(self.error)}",
            f"reported\t{','.join(map(str, sorted(self.reported)))}",
        ]
        remote = [str(i) for i, r in enumerate(self.recipients) if r.remote]
        if remote:
            out.append(f"remote\t{','.join(remote)}")
        for key, on in (("held", self.held), ("warned", self.warned),
                        ("double", self.double_bounce), ("unsure", self.unsure)):
            if on:
                out.append(f"{key}\t1")
        for key, value in (("relay", flatten(self.relay)), ("about", self.about),
                           ("dead", _bounded(self.dead))):
            if value:
                out.append(f"{key}\t{value}")
        if self.notice is not None:
            out.append(f"notice\t{self.notice.dumps()}")
        if self.drop:
            out.append(f"drop\t{flatten(self.drop)}")
        if self.account:
            out.append(f"account\t{flatten(self.account)}")
        for r in self.recipients:
            out.append(f"rcpt\t{r.state}\t{r.notify}\t{r.orcpt}\t{r.address}\t{_bounded(r.reply)}")
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
        env.relay = get("relay", "").partition("\t")[0]
        env.about = get("about", "").partition("\t")[0]
        env.dead = get("dead", "").partition("\t")[0]
        env.unsure = get("unsure", "0").partition("\t")[0] == "1"
        if "reported" in fields:
            env.reported = set(_indices(fields["reported"].partition("\t")[0]))
        else:  # written before reports were recorded: its failures were reported then
            env.reported = {i for i, r in enumerate(rcpts) if r.state == FAILED}
        for i in _indices(get("remote", "").partition("\t")[0]):
            if i < len(rcpts):
                rcpts[i].remote = True
        if "notice" in fields:
            try:
                env.notice = Notice.loads(fields["notice"])
            except NewerFormat as exc:
                raise NewerFormat(f"{qid}: {exc.message}") from None
        env.drop = get("drop", "").partition("\t")[0]
        env.account = get("account", "").partition("\t")[0]
        return env


class NewerFormat(DamagedQueueFile):
    """Written by a later relayq: leave it alone rather than quarantine it."""
