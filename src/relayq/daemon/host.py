"""What the daemon's parts see of the daemon (relayq.daemon.main.Daemon).

The watcher, the workers and the request handler are handed the daemon
itself, typed as this Protocol: they read its current configuration (a
reload replaces cfg, ctx, log and spool) and tell it about messages, and
none of them imports the module that assembles them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relayq.core.config import Config
    from relayq.daemon.dispatcher import Dispatcher
    from relayq.daemon.life import Wake
    from relayq.delivery.intake import Notices
    from relayq.queue.spool import Spool
    from relayq.queue.submit import Context
    from relayq.system.log import Log


class Host(Protocol):
    cfg: Config
    ctx: Context
    log: Log
    spool: Spool
    generation: int  # bumped by a reload: workers rebuild their Runner and agent
    dispatcher: Dispatcher
    wake: Wake
    drop_notices: Notices  # maildrop/: what this process said already (one per daemon)

    @property
    def wakeups(self) -> bool: ...

    def dispatch(self, qid: str, force: bool) -> None: ...

    def committed(self, qid: str) -> None: ...
