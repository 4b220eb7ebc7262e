"""Keep a Fleet current from the API server: one list+watch per kind, a relist only on 410 Gone.

Each kind (ResourceSlices, ResourceClaims, DeviceTaintRules, Pods, Nodes, DeviceClasses) has its
own loop under the supervisor. A watch that ends or breaks resumes from the last resourceVersion
it saw (with bookmarks), so a healthy cluster is listed once; a relist replaces that kind's
records and dirties only the pools whose objects changed. Views are recomputed on demand, under
one lock.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from driver.errors import UnidraError
from driver.fleet.view import (
    DEFAULT_JOB_SIZES,
    KINDS,
    Fleet,
    Group,
    Kind,
    ModelSummary,
    ObjectKey,
    Record,
    Report,
    Sync,
    object_key,
    parse,
    summarize_models,
)
from driver.kubeapi import Collection, Forbidden, Gone, NotServed, WatchStream
from driver.supervisor import Backoff

log = logging.getLogger(__name__)

_RESOURCE = "/apis/resource.k8s.io"
SOURCES: Mapping[Kind, tuple[str, tuple[str, ...]]] = {
    "ResourceSlice": ("ResourceSlices", (f"{_RESOURCE}/v1/resourceslices",)),
    "ResourceClaim": ("ResourceClaims", (f"{_RESOURCE}/v1/resourceclaims",)),
    # Beta (v1beta2) from Kubernetes 1.36, alpha (v1alpha3) before; v1 when it graduates.
    "DeviceTaintRule": (
        "DeviceTaintRules",
        tuple(f"{_RESOURCE}/{v}/devicetaintrules" for v in ("v1", "v1beta2", "v1alpha3")),
    ),
    "Pod": ("Pods", ("/api/v1/pods",)),
    "Node": ("Nodes", ("/api/v1/nodes",)),
    "DeviceClass": ("DeviceClasses", (f"{_RESOURCE}/v1/deviceclasses",)),
}
# Objects per page of a list. A Node carries its images and labels (10 to 40 KB): smaller pages
# keep the peak of listing 5,000 of them low (BENCHMARKS.md, "Fleet view").
PAGE_SIZES: Mapping[Kind, int] = {"Node": 100}


class FleetWatcher:
    """The Fleet behind a lock, fed by list+watch; `version` counts the changes applied."""

    def __init__(
        self,
        api_client: Any,
        job_sizes: Sequence[int] = DEFAULT_JOB_SIZES,
        watch_seconds: int = 300,
        rediscover_seconds: float = 300.0,
        on_refresh: Callable[[float], None] | None = None,
        freeze: bool = False,
    ) -> None:
        self.fleet = Fleet()
        self.job_sizes = tuple(job_sizes)
        self.watch_seconds = watch_seconds
        self.rediscover_seconds = rediscover_seconds
        self.on_refresh = on_refresh
        self.freeze = (
            freeze  # gc.freeze() after full lists: for a process that only serves the view
        )
        self.changed = threading.Condition()
        self.version = 0
        self.sync: dict[Kind, Sync] = {kind: Sync() for kind in KINDS}
        self._collections = {
            kind: Collection(api_client, what, paths) for kind, (what, paths) in SOURCES.items()
        }
        self._streams: dict[Kind, WatchStream | None] = dict.fromkeys(KINDS)

    # -- reading the API --------------------------------------------------------------------

    def load(self) -> None:
        """List every kind once (the one-shot report); a kind the server does not serve is noted."""
        for kind in KINDS:
            try:
                self._relist(kind)
            except (NotServed, Forbidden) as err:
                self._not_served(kind, err)

    def loop(self, kind: Kind) -> Callable[[threading.Event], None]:
        """The list+watch loop of one kind, for driver.supervisor."""

        def run(stop: threading.Event) -> None:
            backoff = Backoff(initial=0.5)
            version = ""
            while not stop.is_set():
                try:
                    if not version:
                        version = self._relist(kind)
                    stream = self._collections[kind].watch(version, self.watch_seconds)
                    self._streams[kind] = stream
                    self._watching(kind)
                    for event in stream.events():
                        meta = (event.get("object") or {}).get("metadata") or {}
                        version = str(meta.get("resourceVersion") or version)
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            self._apply(kind, event["type"], event["object"])
                        if stop.is_set():
                            return
                    backoff.reset()
                except Gone as err:
                    log.info("Watch expired; relisting", extra={"kind": kind, "error": str(err)})
                    version = ""
                except (NotServed, Forbidden) as err:
                    # Not served, or left out of the RBAC on purpose (Pods, Nodes): report without it.
                    self._not_served(kind, err)
                    version = ""
                    stop.wait(self.rediscover_seconds)
                except UnidraError as err:
                    if stop.is_set():
                        return  # interrupt() closed the watch
                    self._failed(kind, err)
                    stop.wait(backoff.next())
                finally:
                    self._streams[kind] = None

        return run

    def interrupt(self) -> None:
        """End the open watches (at shutdown) so the loops see the stop request."""
        for stream in list(self._streams.values()):
            if stream is not None:
                stream.close()

    def _relist(self, kind: Kind) -> str:
        records: dict[ObjectKey, Record] = {}
        version = ""
        for page, listed_at in self._collections[kind].pages(PAGE_SIZES.get(kind, 500)):
            # Parsed outside the lock and page by page: only compact records are kept.
            # Objects not kept (most pods and nodes) are left out: absent is what removes them.
            records.update(
                (object_key(o), record) for o in page if (record := parse(kind, o)) is not None
            )
            version = listed_at
        with self.changed:
            self.fleet.replace_parsed(kind, records)
            sync = self.sync[kind]
            self.sync[kind] = dataclasses.replace(
                sync,
                synced=True,
                served=True,
                lists=sync.lists + 1,
                objects=len(self.fleet.table(kind)),
                error="",
            )
            self._bump()
            if self.freeze and self._all_synced():
                # The records are acyclic and mostly long-lived: keep them out of the cyclic
                # collector's full passes, which otherwise rescan all of them (slow scrapes).
                gc.freeze()
        log.debug("Listed", extra={"kind": kind, "objects": len(records), "version": version})
        return version

    def _apply(self, kind: Kind, change: str, obj: Mapping[str, Any]) -> None:
        with self.changed:
            self.fleet.apply(kind, change, obj)
            self.sync[kind] = dataclasses.replace(
                self.sync[kind], objects=len(self.fleet.table(kind))
            )
            self._bump()

    def _not_served(self, kind: Kind, err: NotServed | Forbidden) -> None:
        with self.changed:
            self.fleet.replace(kind, ())
            self.sync[kind] = dataclasses.replace(
                self.sync[kind], synced=True, served=False, objects=0, error=str(err)
            )
            self._bump()
        log.warning(
            "Cannot read this kind; the view leaves it out", extra={"kind": kind, "error": str(err)}
        )

    def _failed(self, kind: Kind, err: UnidraError) -> None:
        """The kind's list or watch broke: the view keeps what it had, said to be stale."""
        with self.changed:
            self.sync[kind] = dataclasses.replace(self.sync[kind], error=str(err))
            self._bump()
        log.warning("Watch failed; retrying", extra={"kind": kind, "error": str(err)})

    def _watching(self, kind: Kind) -> None:
        """A watch is open again: the kind is current, whatever failed before."""
        with self.changed:
            if self.sync[kind].error and self.sync[kind].served:
                self.sync[kind] = dataclasses.replace(self.sync[kind], error="")
                self._bump()

    def _bump(self) -> None:
        self.version += 1
        self.changed.notify_all()

    # -- views ------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        with self.changed:
            return self._all_synced()

    def _all_synced(self) -> bool:
        return all(s.synced for s in self.sync.values())

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """The change counter once it moved past `seen`, or after `timeout` seconds."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != seen, timeout)
            return self.version

    def report(self) -> Report:
        with self.changed:
            self._refresh()
            report = self.fleet.report(self.job_sizes)
            return dataclasses.replace(report, sync=dict(self.sync))

    def summary(self) -> tuple[list[Group], tuple[ModelSummary, ...], dict[Kind, Sync]]:
        """Groups, model summaries and sync state, without the per-claim part of the report."""
        with self.changed:
            self._refresh()
            groups = list(self.fleet.groups())
            return groups, summarize_models(groups, self.job_sizes), dict(self.sync)

    def _refresh(self) -> None:
        started = time.perf_counter()
        if self.fleet.refresh() and self.on_refresh is not None:
            self.on_refresh(time.perf_counter() - started)
