"""`unidra fleet`: read the cluster once and print the report, or keep it current from watches,
reprinting on change (--watch) and serving it as Prometheus metrics (--serve-metrics)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prometheus_client import CollectorRegistry

from driver import kubeapi
from driver.fleet import render as fleet_render
from driver.fleet.metrics import FleetCollector, recompute_histogram
from driver.fleet.view import DEFAULT_JOB_SIZES, KINDS
from driver.fleet.watch import FleetWatcher
from driver.metrics import serve_http
from driver.supervisor import Supervisor, stop_on_signals

# Between reports: YAML documents, JSON values one after another (jq reads them), tables apart.
_WATCH_SEPARATORS = {"yaml": "---\n", "json": "", "table": "\n"}


@dataclass(frozen=True)
class FleetOptions:
    kubeconfig: Path | None = None
    output: str = "table"
    watch: bool = False
    metrics_address: str = ""
    job_sizes: tuple[int, ...] = DEFAULT_JOB_SIZES
    watch_seconds: int = 300
    # After a change, wait this long for more before reprinting (a rollout changes many objects).
    settle_seconds: float = 0.5


def run(options: FleetOptions, out: TextIO, stop: threading.Event | None = None) -> int:
    """Print once, or run until `stop` (set by SIGTERM/SIGINT when called from the main thread)."""
    watcher = FleetWatcher(
        kubeapi.build_client(options.kubeconfig),
        job_sizes=options.job_sizes,
        watch_seconds=options.watch_seconds,
        freeze=True,
    )
    if not options.watch and not options.metrics_address:
        watcher.load()
        print(fleet_render.render(watcher.report(), options.output), file=out, flush=True)
        return 0
    stop = stop or stop_on_signals()
    registry = CollectorRegistry()
    watcher.on_refresh = recompute_histogram(registry).observe
    registry.register(FleetCollector(watcher.summary))
    supervisor = Supervisor()
    server = None
    try:
        server = serve_http(
            options.metrics_address, "--serve-metrics", registry, ready=lambda: watcher.synced
        )
        for kind in KINDS:
            supervisor.spawn(f"fleet-{kind}", watcher.loop(kind), interrupt=watcher.interrupt)
        if options.watch:
            _print_changes(watcher, options, out, stop)
        else:
            stop.wait()
    finally:
        supervisor.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
    return 0


def _print_changes(
    watcher: FleetWatcher, options: FleetOptions, out: TextIO, stop: threading.Event
) -> None:
    """Reprint whenever the report changes, once every kind was listed; at most once per settle time."""
    seen = -1
    printed = ""
    while not stop.is_set():
        current = watcher.wait_for_change(seen, timeout=0.5)
        if current == seen:
            continue
        seen = current
        if not watcher.synced:
            continue  # the last list to finish bumps the version again
        if stop.wait(options.settle_seconds):
            return
        seen = watcher.version
        text = fleet_render.render(watcher.report(), options.output)
        if text != printed:
            print(_WATCH_SEPARATORS[options.output] + text, file=out, flush=True)
            printed = text
