"""The Kubernetes API edge: the `kubernetes` client's ApiClient, speaking raw JSON.

Requests use what the client's ApiClient builds from a kubeconfig or the in-cluster service
account (its Configuration: host, token and its refresh; its urllib3 pool manager: TLS, client
certificates, proxy, kept-alive connections) and ApiException, but not its generated API classes:
objects stay JSON, so fields newer than the installed client's models are never dropped, and the
classes' per-call pydantic validators, which cost about 25 MiB of memory to load (CoreV1Api
alone 21 MiB), are never built. Requests skip the ApiClient's generic request building
(`param_serialize`, `call_api`): for a JSON path and query it only copies headers and walks the
body, and skipping it takes a quarter off a claim GET.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from driver.claims import ClaimRef, shown
from driver.errors import ClaimError, ConfigError, FatalError, RetryableError, UnidraError

log = logging.getLogger(__name__)

# (connect, read) seconds: well inside kubelet's 45 s call timeout, so a hung API server turns
# into a per-claim retryable error instead of a kubelet-side timeout.
REQUEST_TIMEOUT = (5.0, 15.0)
# How much of an API server's error message goes into a claim's error.
MAX_REASON = 512


def require_kubeconfig(kubeconfig: Path | None) -> None:
    """A kubeconfig that was named must exist (KUBECONFIG may list several, colon-separated)."""
    if kubeconfig is not None and not any(
        Path(part).is_file() for part in str(kubeconfig).split(":") if part
    ):
        raise ConfigError(
            "--kubeconfig",
            f"{kubeconfig} is not a file (set --kubeconfig or KUBECONFIG to a kubeconfig file, "
            "or leave both unset inside a pod)",
        )


def build_client(kubeconfig: Path | None) -> client.ApiClient:
    """A client from a kubeconfig file, or from the in-cluster service account when none is given."""
    configuration = client.Configuration()
    require_kubeconfig(kubeconfig)
    try:
        if kubeconfig is not None:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as err:
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
        raise FatalError(f"cannot configure the Kubernetes client from {where}: {err}") from err
    # kubelet may call with many claims at once; avoid urllib3 discarding pooled connections.
    configuration.connection_pool_maxsize = 32
    configuration.retries = False
    return client.ApiClient(configuration)


class Gone(RetryableError):
    """A watch asked for a resourceVersion the server no longer has; relist."""


class Forbidden(RetryableError):
    """The API server refused access (401/403): RBAC, or credentials; retrying may help after a fix."""


class Conflict(RetryableError):
    """An optimistic-concurrency write lost a race; re-read and try again."""


class NotFound(ClaimError):
    """The object does not exist (404)."""


RESOURCE = "/apis/resource.k8s.io/v1"
SLICES = f"{RESOURCE}/resourceslices"

# Every API call the kubelet plugin makes, as (API group, resource[/subresource], verb): what its
# RBAC must grant (a test checks both against the calls the daemon really makes), and what
# `unidra doctor` asks the API server about.
PERMISSIONS = (
    ("resource.k8s.io", "resourceslices", "list"),
    ("resource.k8s.io", "resourceslices", "watch"),
    ("resource.k8s.io", "resourceslices", "create"),
    ("resource.k8s.io", "resourceslices", "update"),
    ("resource.k8s.io", "resourceslices", "delete"),
    ("resource.k8s.io", "resourceclaims", "get"),
    ("resource.k8s.io", "resourceclaims/status", "update"),
    # Kubernetes 1.36 also authorizes changes to status.devices against this synthetic resource,
    # named after the driver: only its own entries, only in claims of the token's node.
    ("resource.k8s.io", "resourceclaims/driver", "associated-node:update"),
    ("", "nodes", "get"),
)
# Permissions granted for one object name only: the driver's own.
NAMED_BY_DRIVER = frozenset({"resourceclaims/driver"})


class Rest:
    """JSON requests with an ApiClient's configuration and pool; failures become per-claim or
    retryable errors."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.configuration = api_client.configuration
        self.pool: urllib3.PoolManager = api_client.rest_client.pool_manager
        self.headers = {**api_client.default_headers, "Accept": "application/json"}

    def json(
        self,
        action: str,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        missing: str = "",
        timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """The answer as JSON; `missing` says what a 404 means for this request."""
        try:
            response = self.open(method, path, query, body, timeout)
            try:
                answer: dict[str, Any] = json.loads(response.data)
            finally:
                response.release_conn()
            return answer
        except ApiException as err:
            if err.status == 409:
                raise Conflict(f"{action}: {_reason(err)}") from err
            raise classify(err, action, missing) from err
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
            raise RetryableError(
                f"{action}: API server unreachable or answered garbage ({err})"
            ) from err

    def open(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        timeout: tuple[float, float],
    ) -> Any:
        """The unread urllib3 response of a 2xx answer; ApiException otherwise."""
        headers = dict(self.headers)
        # Asked for at every request: the configuration refreshes an expiring token here.
        for auth in self.configuration.auth_settings().values():
            headers[auth["key"]] = auth["value"]
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        response: Any = self.pool.request(
            method,
            self.configuration.host + path + (f"?{urlencode(query)}" if query else ""),
            body=data,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            retries=False,
            preload_content=False,
        )
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response


class ClaimReader:
    """Fetches ResourceClaims (resource.k8s.io/v1) and classifies failures per claim."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.rest = Rest(api_client)

    def __call__(self, ref: ClaimRef, timeout: float) -> Mapping[str, Any]:
        """The claim, waiting at most about `timeout` seconds for the API server."""
        return self.rest.json(
            f"reading claim {ref}",
            "GET",
            _claim_path(ref.namespace, ref.name),
            missing=CLAIM_DELETED,
            timeout=(min(REQUEST_TIMEOUT[0], timeout), min(REQUEST_TIMEOUT[1], timeout)),
        )


def _claim_path(namespace: str, name: str) -> str:
    return (
        f"{RESOURCE}/namespaces/{quote(namespace, safe='')}/resourceclaims/{quote(name, safe='')}"
    )


CLAIM_DELETED = "the claim was deleted"


def classify(err: ApiException, action: str, missing: str = "") -> Exception:
    """Turn an API error into a per-claim error that says whether retrying can help."""
    reason = _reason(err)
    if err.status == 404:
        return NotFound(f"{action}: not found ({missing})" if missing else f"{action}: not found")
    if err.status in (401, 403):
        return Forbidden(f"{action}: access denied ({reason}); check the RBAC of these credentials")
    if err.status in (408, 409, 429) or (err.status or 0) >= 500:
        return RetryableError(f"{action}: API server answered {err.status} ({reason})")
    return ClaimError(f"{action}: API server answered {err.status} ({reason})")


def _reason(err: ApiException) -> str:
    """The server's message, cut: it may echo a name of any length back."""
    try:
        status = json.loads(err.body or "{}")
        message = str(status.get("message") or err.reason)
    except ValueError:
        message = str(err.reason)
    return shown(message, MAX_REASON)


class SliceApi:
    """ResourceSlice (resource.k8s.io/v1) reads and writes as raw JSON, plus the Node and version look-ups."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.rest = Rest(api_client)

    def server_version(self) -> tuple[str, list[str]]:
        """The server's gitVersion and the resource.k8s.io versions it serves."""
        return _server_version(self.rest)

    def node_uid(self, node: str) -> str:
        body = self.rest.json(
            f"reading node {node}",
            "GET",
            f"/api/v1/nodes/{quote(node, safe='')}",
            missing=f"no Node named {node!r}; --node-name (NODE_NAME) must be the node's name in Kubernetes",
        )
        return str(body["metadata"]["uid"])

    def list(self, driver: str, node: str) -> tuple[list[dict[str, Any]], str]:
        body = self.rest.json(
            "listing ResourceSlices",
            "GET",
            SLICES,
            {"fieldSelector": _slice_selector(driver, node)},
        )
        return list(body.get("items") or []), str(
            body.get("metadata", {}).get("resourceVersion", "")
        )

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.rest.json("creating a ResourceSlice", "POST", SLICES, body=obj)

    def replace(self, name: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.rest.json(
            f"updating ResourceSlice {name}", "PUT", f"{SLICES}/{quote(name, safe='')}", body=obj
        )

    def delete(self, name: str, uid: str, resource_version: str) -> None:
        options = {"preconditions": {"uid": uid, "resourceVersion": resource_version}}
        try:
            self.rest.json(
                f"deleting ResourceSlice {name}",
                "DELETE",
                f"{SLICES}/{quote(name, safe='')}",
                body=options,
            )
        except NotFound:  # already gone, which is what we wanted
            return

    def watch(self, driver: str, node: str, resource_version: str, timeout: int) -> WatchStream:
        """Open a watch of events after `resource_version`; the server ends it after `timeout` seconds."""
        selector = {"fieldSelector": _slice_selector(driver, node)}
        return _watch(self.rest, SLICES, selector, resource_version, timeout, "ResourceSlices")


def _watch(
    rest: Rest,
    path: str,
    selector: Mapping[str, str],
    resource_version: str,
    timeout: int,
    what: str,
) -> WatchStream:
    """A watch with bookmarks from `resource_version`; 410 (expired) raises Gone."""
    query = {
        **selector,
        "resourceVersion": resource_version,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(timeout),
        "watch": "true",
    }
    try:
        response = rest.open("GET", path, query, None, (REQUEST_TIMEOUT[0], timeout + 30))
    except ApiException as err:
        if err.status == 410:
            raise Gone(f"watching {what}: {_reason(err)}") from err
        raise classify(err, f"watching {what}") from err
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise RetryableError(f"watching {what}: {err}") from err
    return WatchStream(response, what)


class WatchStream:
    """One open watch; `close()` from another thread ends the iteration."""

    def __init__(self, response: Any, what: str = "ResourceSlices") -> None:
        self._response = response
        self._what = what

    def events(self) -> Iterator[dict[str, Any]]:
        try:
            for line in iter_resp_lines(self._response):
                if not line:
                    continue
                event: dict[str, Any] = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    if status.get("code") == 410:
                        raise Gone(f"watch expired: {status.get('message')}")
                    raise RetryableError(f"watch failed: {status.get('message')}")
                yield event
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError) as err:
            # AttributeError: urllib3 raises it when the response was closed under the reader.
            raise RetryableError(f"watch of {self._what} broke off: {err}") from err
        finally:
            with contextlib.suppress(Exception):
                self._response.close()
                self._response.release_conn()

    def close(self) -> None:
        """Unblock the reader from another thread: closing the file object would wait for the read,
        shutting the socket down makes the read return at once."""
        connection = getattr(self._response, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class NotServed(UnidraError):
    """The API server serves none of the versions a collection can be read in."""


class Collection:
    """List and watch every object of one kind, cluster-wide, as raw JSON (read-only).

    `paths` are the collection's URLs in order of preference (API versions); the first one the
    server answers is used from then on. Lists are read in pages, so a large cluster never has
    to fit in one response.
    """

    def __init__(self, api_client: client.ApiClient, what: str, paths: tuple[str, ...]) -> None:
        self.rest = Rest(api_client)
        self.what = what
        self.paths = paths
        self.path: str | None = None

    def pages(self, page_size: int = 500) -> Iterator[tuple[list[dict[str, Any]], str]]:
        """The list one page at a time (a large cluster never sits in memory as JSON at once),
        each with the list's resourceVersion."""
        token = ""
        while True:
            query = {"limit": str(page_size), **({"continue": token} if token else {})}
            body = self._read(query)
            meta = body.get("metadata") or {}
            yield body.get("items") or [], str(meta.get("resourceVersion", ""))
            token = str(meta.get("continue") or "")
            if not token:
                return

    def _read(self, query: Mapping[str, str]) -> dict[str, Any]:
        action = f"listing {self.what}"
        for path in (self.path,) if self.path else self.paths:
            try:
                response = self.rest.open("GET", path, query, None, REQUEST_TIMEOUT)
                try:
                    body: dict[str, Any] = json.loads(response.data)
                finally:
                    response.release_conn()
            except ApiException as err:
                if err.status == 404 and self.path is None:
                    continue  # this API version is not served; try the next
                if err.status == 410:
                    raise Gone(f"{action}: {_reason(err)}") from err
                raise classify(err, action) from err
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
                raise RetryableError(f"{action}: API server unreachable ({err})") from err
            self.path = path
            return body
        raise NotServed(f"the API server serves no {self.what} (tried {', '.join(self.paths)})")

    def watch(self, resource_version: str, timeout: int) -> WatchStream:
        """Events after `resource_version` (with bookmarks); the server ends it after `timeout` seconds."""
        if self.path is None:
            raise RetryableError(f"watching {self.what}: list it first")
        return _watch(self.rest, self.path, {}, resource_version, timeout, self.what)


def _server_version(rest: Rest) -> tuple[str, list[str]]:
    version = rest.json("reading the server version", "GET", "/version")
    try:
        group = rest.json("discovering resource.k8s.io", "GET", "/apis/resource.k8s.io")
    except NotFound:
        group = {}  # the group is not served at all (DRA off, or Kubernetes older than 1.26)
    served = [str(v.get("version")) for v in group.get("versions", [])]
    return str(version.get("gitVersion", "unknown")), served


class Preflight:
    """What `unidra doctor` asks the API server: versions, the node, its own access, and a dry-run write."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.rest = Rest(api_client)

    def server_version(self) -> tuple[str, list[str]]:
        return _server_version(self.rest)

    def node_exists(self, node: str) -> bool:
        try:
            self.rest.json(f"reading node {node}", "GET", f"/api/v1/nodes/{quote(node, safe='')}")
        except NotFound:
            return False
        return True

    def allowed(self, group: str, resource: str, verb: str, name: str = "") -> tuple[bool, str]:
        """Whether these credentials may do `verb` on `resource` (SelfSubjectAccessReview), and why not."""
        plural, _, subresource = resource.partition("/")
        attributes = {"group": group, "resource": plural, "subresource": subresource, "verb": verb}
        if name:
            attributes["name"] = name
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        answer = self.rest.json(
            f"asking whether it may {verb} {resource}",
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            body=review,
        )
        status = answer.get("status") or {}
        return bool(status.get("allowed")), str(status.get("reason") or "")

    def dry_run(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create a ResourceSlice with dryRun=All: the object as the server would store it, nothing stored."""
        return self.rest.json(
            "creating a ResourceSlice (dry run)", "POST", SLICES, {"dryRun": "All"}, body=obj
        )


def _slice_selector(driver: str, node: str) -> str:
    return f"spec.driver={driver},spec.nodeName={node}"


class ClaimStatusApi:
    """Read a ResourceClaim and replace its status (resourceclaims/status), with optimistic concurrency."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.rest = Rest(api_client)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.rest.json(
            f"reading claim {namespace}/{name}",
            "GET",
            _claim_path(namespace, name),
            missing=CLAIM_DELETED,
        )

    def replace_status(self, namespace: str, name: str, claim: Mapping[str, Any]) -> dict[str, Any]:
        return self.rest.json(
            f"updating the status of claim {namespace}/{name}",
            "PUT",
            f"{_claim_path(namespace, name)}/status",
            body=claim,
        )
