"""The daemon's metrics file: `relayq metrics`' text, written every `metrics_interval`.

One thread, started when `metrics_file` is set: it writes at start, then on
its interval, through relayq.system.textfile (a temporary file beside it,
renamed: node_exporter never reads half a file). It reads the configuration
each round, so a SIGHUP that sets, moves or clears metrics_file takes effect
at the next round. A failure is logged once (until a write works again) and
never touches deliveries: the numbers wait for the next round.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relayq.daemon.host import Host

IDLE_CHECK = 5.0  # seconds: how often a daemon without metrics_file looks again (SIGHUP)


class Exporter:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.failing = ""  # the error said last (said once)
        self.writes = 0

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(max(0.0, timeout))

    def _run(self) -> None:
        while not self.stopping.is_set():
            cfg = self.host.cfg
            if cfg.metrics_file:
                self.write_once()
            wait = max(1.0, cfg.metrics_interval) if cfg.metrics_file else IDLE_CHECK
            self.stopping.wait(wait)

    def write_once(self) -> None:
        """Write the file now; any failure is logged (once) and left for the next round."""
        from relayq.core import metrics
        from relayq.queue import census
        from relayq.system.textfile import publish

        host = self.host
        path = host.cfg.metrics_file
        try:
            publish(path, metrics.render(census.snapshot(host.spool), daemon_up=True))
        except Exception as exc:  # a bug here must not end the daemon
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                f"{type(exc).__name__}: {exc}"
            if why != self.failing:
                host.log.warning(f"metrics not written to {path} ({why}); trying again "
                                 f"every {host.cfg.metrics_interval:g} s")
            self.failing = why
            return
        if self.failing:
            host.log.info(f"metrics written to {path} again")
        self.failing = ""
        self.writes += 1
