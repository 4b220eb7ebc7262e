"""An embedded Kubernetes API server: real HTTP on loopback, real resourceVersion semantics.

`unidra demo` runs it in place of a cluster; the tests and benchmarks run it too. It stores
objects in memory and implements what Unidra and the `kubernetes` client use: get, list with
field and label selectors and pages (limit/continue), watch (chunked JSON events, bookmarks,
410 Gone after compaction), create with generateName and dry-run, replace with optimistic
concurrency, merge patch, the status subresource, delete with preconditions, delete-collection,
SelfSubjectAccessReview, discovery, and /version. There is no authentication: every client may
do everything, except what a test puts in `denied`.

Faults are injected per request (status codes, delays) or for the whole server (`outage()`
stops listening on the port, like an API server that disappeared).
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# (group, version, plural) -> (kind, namespaced)
RESOURCES: dict[tuple[str, str, str], tuple[str, bool]] = {
    ("", "v1", "nodes"): ("Node", False),
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "pods"): ("Pod", True),
    ("", "v1", "events"): ("Event", True),
    ("resource.k8s.io", "v1", "resourceslices"): ("ResourceSlice", False),
    ("resource.k8s.io", "v1", "resourceclaims"): ("ResourceClaim", True),
    ("resource.k8s.io", "v1", "resourceclaimtemplates"): ("ResourceClaimTemplate", True),
    ("resource.k8s.io", "v1", "deviceclasses"): ("DeviceClass", False),
    # Beta in Kubernetes 1.36 (served when resource.k8s.io/v1beta2 is enabled).
    ("resource.k8s.io", "v1beta2", "devicetaintrules"): ("DeviceTaintRule", False),
}
REVIEWS = ("authorization.k8s.io", "v1", "selfsubjectaccessreviews")
HISTORY_LIMIT = 100_000


@dataclass
class Fault:
    """Answer matching requests with `status` (or delay them) `remaining` times (None = forever)."""

    match: Callable[[str, str], bool]
    status: int | None = 500
    delay: float = 0.0
    remaining: int | None = 1
    hits: int = 0


@dataclass
class Request:
    method: str
    path: str
    query: str
    status: int

    @property
    def is_write(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class _Event:
    rv: int
    type: str
    key: tuple[str, str, str, str, str]
    obj: dict[str, Any]


@dataclass
class Store:
    rv: int = 0
    objects: dict[tuple[str, str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[_Event] = field(default_factory=list)
    compacted_rv: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)


class ApiServer:
    """Run with `with ApiServer() as api:`; `api.url` is its base URL."""

    def __init__(self, served_versions: tuple[str, ...] = ("v1",)) -> None:
        self.store = Store()
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.served_versions = served_versions
        # (API group, resource[/subresource], verb) that SelfSubjectAccessReview answers as denied.
        self.denied: set[tuple[str, str, str]] = set()
        # Called with (plural, object) before an object is stored: lets a test play an API server
        # whose feature gates drop fields.
        self.storage_hooks: list[Callable[[str, dict[str, Any]], None]] = []
        self._lock = threading.RLock()
        self._httpd: _ReusableServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"api": self})
        _ReusableServer.allow_reuse_address = True
        self._httpd = _ReusableServer(("127.0.0.1", self.port), handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-apiserver",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_all()
            self._httpd = None
        with self.store.changed:
            self.store.changed.notify_all()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The server is gone (connections refused) inside the block, then back on the same port."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "fake"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    # -- direct object access for tests ----------------------------------------------------

    def create(
        self, group: str, plural: str, obj: dict[str, Any], version: str = "v1"
    ) -> dict[str, Any]:
        namespace = obj.get("metadata", {}).get("namespace", "")
        status, body = self._create((group, version, plural), namespace, copy.deepcopy(obj))
        assert status == 201, body
        return body

    def get(
        self, group: str, plural: str, name: str, namespace: str = "", version: str = "v1"
    ) -> dict[str, Any] | None:
        with self._lock:
            found = self.store.objects.get((group, version, plural, namespace, name))
            return copy.deepcopy(found) if found else None

    def list(self, group: str, plural: str, version: str = "v1") -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(obj)
                for key, obj in sorted(self.store.objects.items())
                if key[:3] == (group, version, plural)
            ]

    def update(
        self,
        group: str,
        plural: str,
        obj: dict[str, Any],
        version: str = "v1",
        subresource: str = "",
    ) -> dict[str, Any]:
        meta = obj["metadata"]
        status, body = self._replace(
            (group, version, plural),
            meta.get("namespace", ""),
            meta["name"],
            copy.deepcopy(obj),
            subresource,
        )
        assert status == 200, body
        return body

    def delete(
        self, group: str, plural: str, name: str, namespace: str = "", version: str = "v1"
    ) -> None:
        status, body = self._delete((group, version, plural), namespace, name, {})
        assert status == 200, body

    def compact(self) -> None:
        """Forget watch history: watches from older resourceVersions get 410 Gone."""
        with self._lock:
            self.store.compacted_rv = self.store.rv
            self.store.events.clear()

    def writes(self, since: int = 0) -> builtins.list[Request]:
        with self._lock:
            return [r for r in self.requests[since:] if r.is_write]

    def slice_writes(self) -> int:
        """How many writes reached the ResourceSlices so far."""
        return sum(1 for r in self.writes() if "/resourceslices" in r.path)

    def fail(
        self,
        match: Callable[[str, str], bool],
        status: int | None = 500,
        times: int | None = 1,
        delay: float = 0.0,
    ) -> Fault:
        fault = Fault(match=match, status=status, delay=delay, remaining=times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    # -- storage operations ------------------------------------------------------------------

    def _bump(self, event: str, key: tuple[str, str, str, str, str], obj: dict[str, Any]) -> None:
        self.store.rv += 1
        # As in a real API server, a DELETED event carries the resourceVersion of the deletion.
        obj = copy.deepcopy(obj) if event == "DELETED" else obj
        obj["metadata"]["resourceVersion"] = str(self.store.rv)
        self.store.events.append(_Event(self.store.rv, event, key, copy.deepcopy(obj)))
        if len(self.store.events) > HISTORY_LIMIT:
            dropped = self.store.events.pop(0)
            self.store.compacted_rv = dropped.rv
        with self.store.changed:
            self.store.changed.notify_all()

    def _create(
        self, gvr: tuple[str, str, str], namespace: str, obj: dict[str, Any], dry_run: bool = False
    ) -> tuple[int, dict[str, Any]]:
        kind, namespaced = RESOURCES[gvr]
        meta = obj.setdefault("metadata", {})
        with self._lock:
            if not meta.get("name"):
                prefix = meta.get("generateName")
                if not prefix:
                    return _status(
                        422, "Invalid", "metadata.name or metadata.generateName is required"
                    )
                meta["name"] = prefix + uuid.uuid4().hex[:5]
            key = (*gvr, namespace if namespaced else "", meta["name"])
            if key in self.store.objects:
                return _status(409, "AlreadyExists", f'{gvr[2]} "{meta["name"]}" already exists')
            if namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            meta["generation"] = 1
            obj["apiVersion"] = f"{gvr[0]}/{gvr[1]}" if gvr[0] else gvr[1]
            obj["kind"] = kind
            for hook in self.storage_hooks:
                hook(gvr[2], obj)
            if dry_run:  # everything up to storing: the answer is the object as it would be stored
                return 201, copy.deepcopy(obj)
            self.store.objects[key] = obj
            self._bump("ADDED", key, obj)
            return 201, copy.deepcopy(obj)

    def _replace(
        self,
        gvr: tuple[str, str, str],
        namespace: str,
        name: str,
        obj: dict[str, Any],
        subresource: str,
    ) -> tuple[int, dict[str, Any]]:
        key = (*gvr, namespace, name)
        with self._lock:
            current = self.store.objects.get(key)
            if current is None:
                return _status(404, "NotFound", f'{gvr[2]} "{name}" not found')
            wanted_rv = obj.get("metadata", {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                return _status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {gvr[2]} "{name}": the object has been modified',
                )
            updated = copy.deepcopy(current)
            if subresource == "status":
                updated["status"] = obj.get("status")
            else:
                for field_name, value in obj.items():
                    if field_name not in ("metadata", "status", "apiVersion", "kind"):
                        updated[field_name] = value
                for drop in [
                    f
                    for f in updated
                    if f not in obj and f not in ("metadata", "status", "apiVersion", "kind")
                ]:
                    del updated[drop]
                meta = obj.get("metadata", {})
                for field_name in ("labels", "annotations", "ownerReferences", "finalizers"):
                    if field_name in meta:
                        updated["metadata"][field_name] = meta[field_name]
                    else:
                        updated["metadata"].pop(field_name, None)
                if updated.get("spec") != current.get("spec"):
                    updated["metadata"]["generation"] += 1
            for hook in self.storage_hooks:
                hook(gvr[2], updated)
            if updated == current:
                return 200, copy.deepcopy(current)  # no-op writes do not bump the resourceVersion
            self.store.objects[key] = updated
            self._bump("MODIFIED", key, updated)
            return 200, copy.deepcopy(updated)

    def _patch(
        self,
        gvr: tuple[str, str, str],
        namespace: str,
        name: str,
        patch: dict[str, Any],
        subresource: str,
    ) -> tuple[int, dict[str, Any]]:
        with self._lock:
            current = self.store.objects.get((*gvr, namespace, name))
            if current is None:
                return _status(404, "NotFound", f'{gvr[2]} "{name}" not found')
            merged = _merge_patch(copy.deepcopy(current), patch)
            if subresource == "status":
                merged = {**copy.deepcopy(current), "status": merged.get("status")}
            merged["metadata"]["resourceVersion"] = patch.get("metadata", {}).get(
                "resourceVersion", current["metadata"]["resourceVersion"]
            )
            return self._replace(gvr, namespace, name, merged, subresource)

    def _delete(
        self, gvr: tuple[str, str, str], namespace: str, name: str, options: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        key = (*gvr, namespace, name)
        with self._lock:
            current = self.store.objects.get(key)
            if current is None:
                return _status(404, "NotFound", f'{gvr[2]} "{name}" not found')
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != current["metadata"]["uid"]:
                return _status(
                    409, "Conflict", "Precondition failed: UID in precondition does not match"
                )
            if (
                pre.get("resourceVersion")
                and pre["resourceVersion"] != current["metadata"]["resourceVersion"]
            ):
                return _status(
                    409,
                    "Conflict",
                    "Precondition failed: resourceVersion in precondition does not match",
                )
            del self.store.objects[key]
            self._bump("DELETED", key, current)
            return 200, copy.deepcopy(current)

    def _list(
        self, gvr: tuple[str, str, str], namespace: str | None, query: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        kind, _ = RESOURCES[gvr]
        with self._lock:
            items = [
                (key, obj)
                for key, obj in sorted(self.store.objects.items())
                if key[:3] == gvr
                and (namespace is None or key[3] == namespace)
                and _selected(obj, query)
            ]
            version = self.store.rv
            token = query.get("continue")
            if token:
                # Unlike etcd, later pages are not a snapshot of the first one's time; a client
                # that then watches from the first page's version still sees every change.
                start = json.loads(bytes.fromhex(token))
                if start["rv"] < self.store.compacted_rv:
                    return _status(410, "Expired", "the provided continue parameter is too old")
                version = start["rv"]
                items = [(k, o) for k, o in items if list(k) > start["after"]]
            meta: dict[str, Any] = {"resourceVersion": str(version)}
            limit = int(query.get("limit") or 0)
            if 0 < limit < len(items):
                items = items[:limit]
                after = {"rv": version, "after": list(items[-1][0])}
                meta["continue"] = json.dumps(after).encode().hex()
            return 200, {
                "apiVersion": f"{gvr[0]}/{gvr[1]}" if gvr[0] else gvr[1],
                "kind": kind + "List",
                "metadata": meta,
                "items": [copy.deepcopy(obj) for _, obj in items],
            }

    def _watch_events(
        self,
        gvr: tuple[str, str, str],
        namespace: str | None,
        query: dict[str, str],
        deadline: float,
    ) -> Iterator[dict[str, Any] | None]:
        """Yields events after the requested resourceVersion; None means "no event yet" (keep-alive tick)."""
        start = query.get("resourceVersion", "")
        with self._lock:
            if start in ("", "0"):
                last = self.store.rv
                for key, obj in sorted(self.store.objects.items()):
                    if (
                        key[:3] == gvr
                        and (namespace is None or key[3] == namespace)
                        and _selected(obj, query)
                    ):
                        yield {"type": "ADDED", "object": copy.deepcopy(obj)}
            else:
                last = int(start)
                if last < self.store.compacted_rv:
                    yield {
                        "type": "ERROR",
                        "object": _status(
                            410,
                            "Expired",
                            f"too old resource version: {last} ({self.store.compacted_rv})",
                        )[1],
                    }
                    return
        while time.monotonic() < deadline and self._httpd is not None:
            with self._lock:
                events = self.store.events
                pending = events[bisect.bisect_right(events, last, key=lambda e: e.rv) :]
            for event in pending:
                last = event.rv
                if event.key[:3] != gvr or (namespace is not None and event.key[3] != namespace):
                    continue
                if _selected(event.obj, query):
                    yield {"type": event.type, "object": copy.deepcopy(event.obj)}
            with self.store.changed:
                if self.store.rv == last:
                    self.store.changed.wait(timeout=0.2)
            yield None
        if query.get("allowWatchBookmarks") == "true" and self._httpd is not None:
            # As kube-apiserver does before a watch times out: every event up to `last` was sent.
            kind, _ = RESOURCES[gvr]
            yield {
                "type": "BOOKMARK",
                "object": {
                    "kind": kind,
                    "apiVersion": f"{gvr[0]}/{gvr[1]}" if gvr[0] else gvr[1],
                    "metadata": {"resourceVersion": str(last)},
                },
            }


class _ReusableServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        """Drop open keep-alive and watch connections, as a vanished server would."""
        with self.connections_lock:
            open_connections = list(self.connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    api: ApiServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; like Go's net/http (TCP_NODELAY), don't let Nagle
    # hold the body back for the client's delayed ACK (a 40 ms stall per request on Linux).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        parts = parts._replace(path=parts.path.rstrip("/") or "/")
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fault = self._fault(method, parts.path)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is not None:
                self._send(
                    *_status(fault.status, "InjectedFault", f"injected fault {fault.status}"),
                    method,
                    parts,
                )
                return
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            self._send(*_status(400, "BadRequest", "body is not JSON"), method, parts)
            return
        route = _route(parts.path)
        if route is None:
            self._send(*self._discovery(parts.path), method, parts)
            return
        if route[0] == REVIEWS and method == "POST":
            self._send(*self._review(body), method, parts)
            return
        gvr, namespace, name, subresource = route
        if gvr not in RESOURCES:
            self._send(
                *_status(
                    404,
                    "NotFound",
                    f"the server could not find the requested resource {parts.path}",
                ),
                method,
                parts,
            )
            return
        _, namespaced = RESOURCES[gvr]
        ns = namespace if namespaced else ""
        # A collection path without /namespaces/<ns>/ reads every namespace.
        scope = (namespace or None) if namespaced else None
        api = self.api
        if method == "GET" and name is None and query.get("watch") in ("true", "1"):
            self._watch(gvr, scope, query, parts)
            return
        if method == "GET":
            if name is None:
                result = api._list(gvr, scope, query)
            else:
                found = api.get(gvr[0], gvr[2], name, ns, gvr[1])
                result = (
                    (200, found)
                    if found
                    else _status(404, "NotFound", f'{gvr[2]} "{name}" not found')
                )
        elif method == "POST":
            result = api._create(gvr, ns, body, dry_run=query.get("dryRun") == "All")
        elif method == "PUT" and name is not None:
            result = api._replace(gvr, ns, name, body, subresource or "")
        elif method == "PATCH" and name is not None:
            result = api._patch(gvr, ns, name, body, subresource or "")
        elif method == "DELETE" and name is not None:
            result = api._delete(gvr, ns, name, body)
        elif method == "DELETE":
            result = self._delete_collection(gvr, scope, query)
        else:
            result = _status(405, "MethodNotAllowed", f"{method} not allowed on {parts.path}")
        self._send(*result, method, parts)

    def _delete_collection(
        self, gvr: tuple[str, str, str], namespace: str | None, query: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        _, listing = self.api._list(gvr, namespace, query)
        for item in listing["items"]:
            meta = item["metadata"]
            self.api._delete(gvr, meta.get("namespace", ""), meta["name"], {})
        return 200, listing

    def _review(self, review: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A SelfSubjectAccessReview: allowed unless the test denied it."""
        attributes = review.get("spec", {}).get("resourceAttributes") or {}
        resource = attributes.get("resource", "")
        if attributes.get("subresource"):
            resource += "/" + attributes["subresource"]
        wanted = (attributes.get("group", ""), resource, attributes.get("verb", ""))
        allowed = wanted not in self.api.denied
        answer = {**review, "status": {"allowed": allowed}}
        if not allowed:
            answer["status"]["reason"] = "denied by the test's API server"
        return 201, answer

    def _fault(self, method: str, path: str) -> Fault | None:
        with self.api._lock:
            for fault in self.api.faults:
                if fault.remaining != 0 and fault.match(method, path):
                    fault.hits += 1
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    def _discovery(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/version":
            return 200, {"major": "1", "minor": "35", "gitVersion": "v1.35.0-fake"}
        if path == "/apis":
            versions = [
                {"groupVersion": f"resource.k8s.io/{v}", "version": v}
                for v in self.api.served_versions
            ]
            return 200, {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": "resource.k8s.io",
                        "versions": versions,
                        "preferredVersion": versions[0],
                    }
                ],
            }
        if path == "/apis/resource.k8s.io":
            versions = [
                {"groupVersion": f"resource.k8s.io/{v}", "version": v}
                for v in self.api.served_versions
            ]
            return 200, {
                "kind": "APIGroup",
                "apiVersion": "v1",
                "name": "resource.k8s.io",
                "versions": versions,
                "preferredVersion": versions[0],
            }
        return _status(404, "NotFound", f"the server could not find the requested resource {path}")

    def _watch(
        self, gvr: tuple[str, str, str], namespace: str | None, query: dict[str, str], parts: Any
    ) -> None:
        timeout = float(query.get("timeoutSeconds") or 300)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._record("GET", parts, 200)
        try:
            for event in self.api._watch_events(gvr, namespace, query, time.monotonic() + timeout):
                if event is None:
                    continue
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True

    def _send(self, status: int, body: dict[str, Any], method: str, parts: Any) -> None:
        data = json.dumps(body).encode()
        # Recorded before answering, so a client that saw the answer also sees the record.
        self._record(method, parts, status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            return

    def _record(self, method: str, parts: Any, status: int) -> None:
        with self.api._lock:
            self.api.requests.append(Request(method, parts.path, parts.query, status))


def _route(path: str) -> tuple[tuple[str, str, str], str, str | None, str | None] | None:
    """Split /api/v1/... and /apis/<group>/<version>/... into (gvr, namespace, name, subresource)."""
    segments = [s for s in path.split("/") if s]
    if len(segments) >= 2 and segments[0] == "api":
        group, version, rest = "", segments[1], segments[2:]
    elif len(segments) >= 3 and segments[0] == "apis":
        group, version, rest = segments[1], segments[2], segments[3:]
    else:
        return None
    namespace = ""
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return None
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    return (group, version, plural), namespace, name, subresource


def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _field(obj: dict[str, Any], dotted: str) -> str:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _selected(obj: dict[str, Any], query: dict[str, str]) -> bool:
    for selector in filter(None, query.get("fieldSelector", "").split(",")):
        negate = "!=" in selector
        key, value = selector.split("!=" if negate else "=", 1)
        if (_field(obj, key.strip()) == value.strip().lstrip("=")) == negate:
            return False
    labels = obj.get("metadata", {}).get("labels") or {}
    for selector in filter(None, query.get("labelSelector", "").split(",")):
        key, _, value = selector.partition("=")
        if labels.get(key.strip()) != value.strip().lstrip("="):
            return False
    return True


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge_patch(target.get(key), value)
    return target


def main() -> None:
    """Serve in a process of its own until stdin closes: `python -m driver.demo.apiserver KUBECONFIG`.

    Benchmarks use it so the server's work does not share an interpreter with the client they time.
    """
    import sys

    with ApiServer() as server:
        server.write_kubeconfig(Path(sys.argv[1]))
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
