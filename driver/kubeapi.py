"""The Kubernetes API edge: build a client, and read ResourceClaims as raw JSON.

Objects are read with `_preload_content=False` and handled as JSON, so fields newer than the
installed client's models are never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from driver.claims import ClaimRef
from driver.errors import ClaimError, FatalError, RetryableError

log = logging.getLogger(__name__)

# (connect, read) seconds: well inside kubelet's 45 s call timeout, so a hung API server turns
# into a per-claim retryable error instead of a kubelet-side timeout.
REQUEST_TIMEOUT = (5.0, 15.0)


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


class ClaimReader:
    """Fetches ResourceClaims (resource.k8s.io/v1) and classifies failures per claim."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = client.ResourceV1Api(api_client)

    def __call__(self, ref: ClaimRef) -> Mapping[str, Any]:
        return call_json(
            f"reading claim {ref}", self.api.read_namespaced_resource_claim, ref.name, ref.namespace
        )


def call_json(action: str, method: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call a client method for its raw JSON body; failures become per-claim or retryable errors."""
    try:
        # With _preload_content=False the client returns the raw urllib3 response.
        response = method(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        try:
            body: dict[str, Any] = json.loads(response.data)
        finally:
            response.release_conn()
        return body
    except ApiException as err:
        if err.status == 409:
            raise Conflict(f"{action}: {_reason(err)}") from err
        raise classify(err, action) from err
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
        raise RetryableError(
            f"{action}: API server unreachable or answered garbage ({err})"
        ) from err


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
    try:
        status = json.loads(err.body or "{}")
        return str(status.get("message") or err.reason)
    except ValueError:
        return str(err.reason)


class SliceApi:
    """ResourceSlice (resource.k8s.io/v1) reads and writes as raw JSON, plus the Node and version look-ups."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.resource = client.ResourceV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def server_version(self) -> tuple[str, list[str]]:
        """The server's gitVersion and the resource.k8s.io versions it serves."""
        version = call_json(
            "reading the server version", client.VersionApi(self.api_client).get_code
        )
        group = call_json(
            "discovering resource.k8s.io", client.ResourceApi(self.api_client).get_api_group
        )
        served = [str(v.get("version")) for v in group.get("versions", [])]
        return str(version.get("gitVersion", "unknown")), served

    def node_uid(self, node: str) -> str:
        body = call_json(f"reading node {node}", self.core.read_node, node)
        return str(body["metadata"]["uid"])

    def list(self, driver: str, node: str) -> tuple[list[dict[str, Any]], str]:
        body = call_json(
            "listing ResourceSlices",
            self.resource.list_resource_slice,
            field_selector=_slice_selector(driver, node),
        )
        return list(body.get("items") or []), str(
            body.get("metadata", {}).get("resourceVersion", "")
        )

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return call_json("creating a ResourceSlice", self.resource.create_resource_slice, obj)

    def replace(self, name: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return call_json(
            f"updating ResourceSlice {name}", self.resource.replace_resource_slice, name, obj
        )

    def delete(self, name: str, uid: str, resource_version: str) -> None:
        options = {"preconditions": {"uid": uid, "resourceVersion": resource_version}}
        try:
            call_json(
                f"deleting ResourceSlice {name}",
                self.resource.delete_resource_slice,
                name,
                body=options,
            )
        except ClaimError:  # 404: already gone, which is what we wanted
            return

    def watch(self, driver: str, node: str, resource_version: str, timeout: int) -> WatchStream:
        """Open a watch of events after `resource_version`; the server ends it after `timeout` seconds."""
        try:
            response: Any = self.resource.list_resource_slice(
                field_selector=_slice_selector(driver, node),
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                watch=True,
                _preload_content=False,
                _request_timeout=(REQUEST_TIMEOUT[0], timeout + 30),
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
        self.api = client.ResourceV1Api(api_client)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return call_json(
            f"reading claim {namespace}/{name}",
            self.api.read_namespaced_resource_claim,
            name,
            namespace,
        )

    def replace_status(self, namespace: str, name: str, claim: Mapping[str, Any]) -> dict[str, Any]:
        return call_json(
            f"updating the status of claim {namespace}/{name}",
            self.api.replace_namespaced_resource_claim_status,
            name,
            namespace,
            claim,
        )
