"""The Kubernetes API edge: the `kubernetes` client's ApiClient, speaking raw JSON.

Requests go through the client's ApiClient (kubeconfig and in-cluster auth, TLS, connection
pool, ApiException) but not through its generated API classes: objects stay JSON, so fields
newer than the installed client's models are never dropped, and the classes' per-call pydantic
validators, which cost about 25 MiB of memory to load (CoreV1Api alone 21 MiB), are never built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from driver.claims import ClaimRef, shown
from driver.errors import ClaimError, FatalError, RetryableError

log = logging.getLogger(__name__)

# (connect, read) seconds: well inside kubelet's 45 s call timeout, so a hung API server turns
# into a per-claim retryable error instead of a kubelet-side timeout.
REQUEST_TIMEOUT = (5.0, 15.0)
# How much of an API server's error message goes into a claim's error.
MAX_REASON = 512


def build_client(kubeconfig: Path | None) -> client.ApiClient:
    """A client from a kubeconfig file, or from the in-cluster service account when none is given."""
    configuration = client.Configuration()
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


class Conflict(RetryableError):
    """An optimistic-concurrency write lost a race; re-read and try again."""


RESOURCE = "/apis/resource.k8s.io/v1"
SLICES = f"{RESOURCE}/resourceslices"


class Rest:
    """JSON requests through an ApiClient; failures become per-claim or retryable errors."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    def json(
        self,
        action: str,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
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
            raise classify(err, action) from err
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
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        serialized = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response: Any = self.api_client.call_api(*serialized, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response


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
            timeout=(min(REQUEST_TIMEOUT[0], timeout), min(REQUEST_TIMEOUT[1], timeout)),
        )


def _claim_path(namespace: str, name: str) -> str:
    return (
        f"{RESOURCE}/namespaces/{quote(namespace, safe='')}/resourceclaims/{quote(name, safe='')}"
    )


def classify(err: ApiException, action: str) -> Exception:
    """Turn an API error into a per-claim error that says whether retrying can help."""
    reason = _reason(err)
    if err.status == 404:
        return ClaimError(f"{action}: not found (the claim was deleted)")
    if err.status in (401, 403):
        return RetryableError(f"{action}: access denied ({reason}); check the driver's RBAC")
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
        version = self.rest.json("reading the server version", "GET", "/version")
        group = self.rest.json("discovering resource.k8s.io", "GET", "/apis/resource.k8s.io")
        served = [str(v.get("version")) for v in group.get("versions", [])]
        return str(version.get("gitVersion", "unknown")), served

    def node_uid(self, node: str) -> str:
        body = self.rest.json(
            f"reading node {node}", "GET", f"/api/v1/nodes/{quote(node, safe='')}"
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
        except ClaimError:  # 404: already gone, which is what we wanted
            return

    def watch(self, driver: str, node: str, resource_version: str, timeout: int) -> WatchStream:
        """Open a watch of events after `resource_version`; the server ends it after `timeout` seconds."""
        query = {
            "fieldSelector": _slice_selector(driver, node),
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout),
            "watch": "true",
        }
        try:
            response = self.rest.open(
                "GET", SLICES, query, None, (REQUEST_TIMEOUT[0], timeout + 30)
            )
        except ApiException as err:
            raise classify(err, "watching ResourceSlices") from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise RetryableError(f"watching ResourceSlices: {err}") from err
        return WatchStream(response)


class WatchStream:
    """One open watch; `close()` from another thread ends the iteration."""

    def __init__(self, response: Any) -> None:
        self._response = response

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
            raise RetryableError(f"watch of ResourceSlices broke off: {err}") from err
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


def _slice_selector(driver: str, node: str) -> str:
    return f"spec.driver={driver},spec.nodeName={node}"


class ClaimStatusApi:
    """Read a ResourceClaim and replace its status (resourceclaims/status), with optimistic concurrency."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.rest = Rest(api_client)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.rest.json(
            f"reading claim {namespace}/{name}", "GET", _claim_path(namespace, name)
        )

    def replace_status(self, namespace: str, name: str, claim: Mapping[str, Any]) -> dict[str, Any]:
        return self.rest.json(
            f"updating the status of claim {namespace}/{name}",
            "PUT",
            f"{_claim_path(namespace, name)}/status",
            body=claim,
        )
