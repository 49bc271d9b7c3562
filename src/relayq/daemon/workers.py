"""The daemon's workers: `concurrency` threads, each driving one delivery agent.

A worker takes queue ids from the one work queue, asks the dispatcher
(relayq.daemon.dispatcher) whether to deliver and how, has its agent process
(relayq.daemon.agent) deliver the message, and tells the dispatcher how it
went. Delivery is mostly Python: in threads it would share one GIL with the
listener, so it happens in the agents, and the worker only waits.

Without an agent (none could be started, or they keep dying: AGENT_FAILURES
in a row) the worker delivers in this process with its own Runner, until a
reload. A reload (the host's generation moves) gives every worker a fresh
agent and Runner with the new configuration.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

from relayq.core import policy
from relayq.core.errors import RelayqError
from relayq.daemon.dispatcher import AGAIN, RECHECK

if TYPE_CHECKING:
    from relayq.daemon.agent import Agent
    from relayq.daemon.host import Host
    from relayq.delivery.runner import Runner

IDLE_CLOSE = 5.0  # a worker closes its smarthost connection after this idle time
STOP_GRACE = 5.0  # how long stopping waits for deliveries in flight
AGENT_FAILURES = 3  # agents dying in a row before a worker delivers in-process


def still_due(host: Host, qid: str) -> bool:
    """Was this message, left queued by a normal run, due (so locked elsewhere)?"""
    try:
        env = host.spool.read_envelope(qid)
    except (OSError, RelayqError):
        return False
    return (not env.held and bool(env.unsettled())
            and policy.due(env.next_try, time.time(), host.cfg.retry_max))


class _Slot:
    """One worker thread's own state: its in-process Runner and its agent's luck."""

    def __init__(self) -> None:
        self.runner: Runner | None = None
        self.generation = -1  # of the configuration its agent and Runner were made with
        self.failures = 0  # agents dead in a row

    def close_runner(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def in_process(self, host: Host, qid: str, force: bool) -> int:
        from relayq.delivery.runner import Runner

        if self.runner is None:
            self.runner = Runner(host.cfg, host.spool, host.log, host.ctx)
        return self.runner.process(qid, force)


class Pool:
    """The work queue, the worker threads and their agents."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.work: queue.Queue[str | None] = queue.Queue()
        self.agents: list[Agent | None] = []
        self._closing: list[Agent] = []  # agents told to finish, reaped by stop()
        self._threads: list[threading.Thread] = []

    def put(self, qid: str) -> None:
        self.work.put(qid)

    # -- agents ----------------------------------------------------------------------

    def _spawn(self) -> Agent | None:
        from relayq.daemon.agent import Agent

        try:
            return Agent(self.host.cfg, self.host.log)
        except OSError as exc:
            self.host.log.warning(f"cannot start a delivery agent ({exc}); "
                                  "delivering in-process")
            return None

    def start_agents(self) -> None:
        """One delivery agent per worker, started ahead so the first message need not
        wait; called before dropping privileges (each agent drops them itself)."""
        self.agents = [self._spawn() for _ in range(max(1, self.host.cfg.concurrency))]

    def kill_agents(self) -> None:
        for agent in self.agents:
            if agent is not None:
                agent.kill()
                agent.reap(1.0)

    def agent_fds(self) -> list[int]:
        """Our ends of the agents' pipes: not for forked listener processes."""
        return [fd for agent in self.agents if agent is not None for fd in agent.fds()]

    def _retire(self, n: int, *, wait: bool = True) -> None:
        """Close worker n's agent; it exits after its message in hand."""
        agent, self.agents[n] = self.agents[n], None
        if agent is None:
            return
        agent.close()
        if wait and not agent.reap(STOP_GRACE):
            agent.kill()
            agent.reap(STOP_GRACE)
        if not wait:
            self._closing.append(agent)

    # -- the workers -----------------------------------------------------------------

    def start(self) -> None:
        if not self.agents:
            self.agents = [None] * max(1, self.host.cfg.concurrency)
        for n in range(len(self.agents)):
            t = threading.Thread(target=self._worker, args=(n,), name=f"relayq-worker-{n}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _worker(self, n: int) -> None:
        """Take queue ids until told to stop (None); a bug must not kill the worker."""
        slot = _Slot()
        try:
            while True:
                try:
                    qid = self.work.get(timeout=IDLE_CLOSE)
                except queue.Empty:
                    slot.close_runner()  # idle: let the smarthost go
                    continue
                if qid is None:
                    return
                force = self.host.dispatcher.claim(qid)
                if force is None:
                    continue
                left = 1
                try:
                    left = self._deliver(n, slot, qid, force)
                except Exception as exc:
                    self.host.log.error(f"{qid}: delivery failed: {type(exc).__name__}: "
                                        f"{exc}; left in the queue")
                except BaseException:  # the thread ends: its record must not stay active
                    self.host.dispatcher.finish(qid, 1, False)
                    raise
                self._finished(qid, left, force)
        finally:
            slot.close_runner()
            self._retire(n, wait=False)

    def _finished(self, qid: str, left: int, force: bool) -> None:
        due = bool(left) and not force and still_due(self.host, qid)
        answer = self.host.dispatcher.finish(qid, left, due)
        if answer == AGAIN:
            self.work.put(qid)
        elif answer == RECHECK:
            self.host.wake.raise_flag("")  # the main loop sleeps until the soonest recheck

    def _deliver(self, n: int, slot: _Slot, qid: str, force: bool) -> int:
        """One message by worker n's agent (or in-process); 1 if it is still queued."""
        from relayq.daemon.agent import AgentGone

        host = self.host
        if slot.generation != host.generation:  # started, or the config was reloaded
            slot.close_runner()
            if slot.generation >= 0 or self.agents[n] is None:
                self._retire(n)
                self.agents[n] = self._spawn()
            slot.generation, slot.failures = host.generation, 0
        agent = self.agents[n] if slot.failures < AGENT_FAILURES else None
        if agent is None:
            return slot.in_process(host, qid, force)
        try:
            left = agent.deliver(qid, force)
        except AgentGone as exc:
            slot.failures += 1
            host.log.error(f"{qid}: delivery agent {agent.proc.pid} died ({exc}); "
                           "left in the queue")
            self._retire(n)
            if host.dispatcher.stopping:
                return 1
            if slot.failures < AGENT_FAILURES:
                self.agents[n] = self._spawn()
            else:
                host.log.error("delivery agents keep dying; this worker delivers "
                               "in-process until a reload")
            return 1
        slot.failures = 0
        return left

    # -- stopping --------------------------------------------------------------------

    def stop_workers(self, deadline: float) -> None:
        """Nothing more is taken; the workers finish the message in hand until `deadline`."""
        while True:
            try:
                self.work.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self.work.put(None)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def stop_agents(self, deadline: float) -> None:
        """Agents still busy at `deadline` are killed: the kernel drops their lock and
        the message stays queued."""
        for agent in self._closing + [a for a in self.agents if a is not None]:
            agent.close()
            if not agent.reap(max(0.0, deadline - time.monotonic())):
                agent.kill()  # its lock goes with it; the message stays queued
                agent.reap(1.0)
