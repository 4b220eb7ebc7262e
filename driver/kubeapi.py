"""The Kubernetes API edge: build a client, and read ResourceClaims as raw JSON.

Objects are read with `_preload_content=False` and handled as JSON, so fields newer than the
installed client's models are never silently dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

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


class ClaimReader:
    """Fetches ResourceClaims (resource.k8s.io/v1) and classifies failures per claim."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = client.ResourceV1Api(api_client)

    def __call__(self, ref: ClaimRef) -> Mapping[str, Any]:
        try:
            # With _preload_content=False the client returns the raw urllib3 response.
            response: Any = self.api.read_namespaced_resource_claim(
                ref.name, ref.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
            try:
                body: Mapping[str, Any] = json.loads(response.data)
            finally:
                response.release_conn()
            return body
        except ApiException as err:
            raise classify(err, f"reading claim {ref}") from err
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
            raise RetryableError(
                f"reading claim {ref}: API server unreachable or answered garbage ({err})"
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
