"""`relayq status -w N -c N [--age-warning D] [--age-critical D]`: the monitoring
plugin's answer (the Nagios plugin guidelines: one line, perfdata after `|`,
exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), so check_mailq's thresholds carry
over to a check that also sees the oldest message, users' waiting mail and a
relay loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


@dataclass(frozen=True)
class Thresholds:
    warning: int | None = None  # messages (queued + waiting in maildrop/)
    critical: int | None = None
    age_warning: float | None = None  # seconds, the oldest message
    age_critical: float | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.warning, self.critical, self.age_warning,
                                           self.age_critical))

    def problem(self) -> str:
        """Why these thresholds make no sense ("" when they do): a warning at or past
        its critical level would never be seen."""
        for w, c, what in ((self.warning, self.critical, "-w"),
                           (self.age_warning, self.age_critical, "--age-warning")):
            if w is not None and c is not None and w >= c:
                return f"{what} must be below its critical threshold"
        return ""


def _level(value: float, warn: float | None, crit: float | None) -> int:
    if crit is not None and value >= crit:
        return CRITICAL
    return WARNING if warn is not None and value >= warn else OK


def _short(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def check(info: dict[str, Any], t: Thresholds) -> tuple[int, str]:
    """(exit code, the line) from `relayq status --json`'s facts; pure."""
    count = info["messages"] + (info["maildrop_waiting"] or 0)
    age = info["oldest_age_seconds"] or 0
    code = max(_level(count, t.warning, t.critical), _level(age, t.age_warning, t.age_critical))
    why = [f"{count} message{'s' if count != 1 else ''} waiting"]
    if info["messages"]:
        why.append(f"oldest {_short(age)}")
    if info["maildrop_waiting"]:
        why.append(f"{info['maildrop_waiting']} not yet queued from maildrop/")
    if info["warning"]:
        code = CRITICAL
        why.append(info["warning"])
    for dead in info.get("reauth") or ():  # an OAuth2 grant refused: its mail is held
        code = CRITICAL
        why.append(f"account {dead['account']} needs relayq oauth2 login ({dead['error']})")
    if info["dead_letters"]:
        code = max(code, WARNING)
        why.append(f"{info['dead_letters']} dead letter(s)")
    why.append("daemon " + ("running" if info["daemon_pid"] or info.get("daemon_running")
                            else "not running"))

    def limit(v: float | None) -> str:
        return "" if v is None else f"{v:g}"

    perf = (f"messages={count};{limit(t.warning)};{limit(t.critical)};0 "
            f"oldest={age:g}s;{limit(t.age_warning)};{limit(t.age_critical)};0 "
            f"quarantined={info['quarantined']};;;0 dead={info['dead_letters']};;;0")
    return code, f"RELAYQ {NAMES[code]} - {', '.join(why)} | {perf}"
