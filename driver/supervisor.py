"""Named background loops that are restarted, never silently lost: a crash or an unexpected return is
logged, counted and followed by a restart after a capped, jittered back-off; and the stop request
(SIGTERM, SIGINT) that ends them.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

Loop = Callable[[threading.Event], None]


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets. A second signal gets the default action, so a stuck
    shutdown can still be killed. Outside the main thread (tests) no handler is installed."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signum, signal.SIG_DFL)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    return stop


@dataclass
class Backoff:
    """Capped exponential back-off with full jitter (AWS architecture blog's "full jitter")."""

    initial: float = 0.2
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * (2**self.attempt))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class Worker:
    name: str
    thread: threading.Thread
    interrupt: Callable[[], None] | None = None
    restarts: int = 0


class Supervisor:
    """Runs loops in named daemon threads until `stop()`; `on_restart(name)` observes restarts."""

    def __init__(self, on_restart: Callable[[str], None] | None = None) -> None:
        self.stopping = threading.Event()
        self.workers: dict[str, Worker] = {}
        self._on_restart = on_restart

    def spawn(self, name: str, loop: Loop, interrupt: Callable[[], None] | None = None) -> Worker:
        """Run `loop(stopping)` in a thread; `interrupt` unblocks it when stopping (closes a socket...)."""
        thread = threading.Thread(target=self._guard, args=(name, loop), name=name, daemon=True)
        worker = Worker(name, thread, interrupt)
        self.workers[name] = worker
        worker.thread.start()
        return worker

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        for worker in self.workers.values():
            if worker.interrupt is not None:
                worker.interrupt()
        for worker in self.workers.values():
            worker.thread.join(timeout)
            if worker.thread.is_alive():
                log.warning("Background loop did not stop in time", extra={"loop": worker.name})

    def _guard(self, name: str, loop: Loop) -> None:
        backoff = Backoff(initial=1.0, cap=60.0)
        while not self.stopping.is_set():
            try:
                loop(self.stopping)
            except Exception:
                log.exception("Background loop crashed; restarting", extra={"loop": name})
            else:
                if self.stopping.is_set():
                    return
                log.error("Background loop returned unexpectedly; restarting", extra={"loop": name})
            self.workers[name].restarts += 1
            if self._on_restart is not None:
                self._on_restart(name)
            self.stopping.wait(backoff.next())
