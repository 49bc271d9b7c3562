"""Run relayq's installed commands as programs do, against a private config and queue."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from relayq.core.errors import DamagedQueueFile
from relayq.queue.spool import Spool

if TYPE_CHECKING:
    from relayq.core.envelope import Envelope

BIN = Path(sys.executable).parent


class Relayq:
    """A config file, a queue and a log in one temporary folder."""

    def __init__(self, root: Path, **settings: object) -> None:
        self.root = root
        self.queue_dir = root / "queue"
        self.log_file = root / "maillog"
        self.config = root / "relayq.toml"
        self.settings: dict[str, object] = {
            "smarthost": "[127.0.0.1]:9",
            "tls": "none",
            "queue_dir": str(self.queue_dir),
            "domain": "host.example.org",
            "log_file": str(self.log_file),
            "syslog": False,
            "delivery_mode": "queue",
            "connect_timeout": 5,
            "timeout": 10,
        }
        self.configure(**settings)

    def configure(self, **settings: object) -> None:
        self.settings.update(settings)
        lines = []
        for key, value in self.settings.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{key} = {value}")
            elif isinstance(value, list):
                lines.append(f"{key} = [{', '.join(repr(str(v)) for v in value)}]")
            else:
                lines.append(f"{key} = {str(value)!r}".replace("'", '"'))
        self.write_config("\n".join(lines) + "\n")

    def write_config(self, text: str) -> None:
        """Replace the config atomically: a running daemon may reload it at any moment."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)  # as a config holding a password must be
        os.replace(tmp, self.config)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["RELAYQ_CONFIG"] = str(self.config)
        env["RELAYQ_CACHE_DIR"] = str(self.root / "cache")
        env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env.pop("NAME", None)
        return env

    def run(self, prog: str, *args: str, input: bytes = b"",
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(BIN / prog), *args], input=input, env=self.env,
                              capture_output=True, timeout=timeout, check=False)

    def sendmail(self, *args: str, input: bytes = b"",
                 timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return self.run("sendmail", *args, input=input, timeout=timeout)

    @property
    def spool(self) -> Spool:
        return Spool(str(self.queue_dir))

    def queued(self) -> list[tuple[Envelope, bytes]]:
        spool = self.spool
        out = []
        for qid in spool.ids():
            try:  # a running daemon may finish a message between listing and reading
                env = spool.read_envelope(qid)
                with open(spool.data_path(qid), "rb") as f:
                    out.append((env, f.read()))
            except (FileNotFoundError, DamagedQueueFile):
                if os.path.exists(spool.data_path(qid)) and os.path.exists(
                        os.path.join(spool.queue, qid + ".e")):
                    raise
        return out

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


def assert_one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """A failure says one line on stderr and never shows a traceback."""
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.strip(), err
    return err
