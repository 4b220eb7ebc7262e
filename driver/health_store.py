"""Device health that outlives the process: the board's conditions, their hold times and flap
history in `health.json` beside the checkpoint, tagged with the kernel's boot ID.

A restart, a crash or a handover to the next instance keeps every condition, so the taints stay
on the devices; a reboot (another boot ID) starts clean. Only the instance that publishes writes
the file. Times are the board's monotonic clock, which all processes of one boot share.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from driver import durable
from driver.errors import UnidraError
from driver.health import Condition, DeviceState

log = logging.getLogger(__name__)

API_VERSION = "unidra.dev/v1"
KIND = "HealthState"


class HealthStore:
    def __init__(self, path: Path, boot_id: str) -> None:
        self.path = path
        self.boot_id = boot_id

    def load(self) -> dict[str, DeviceState]:
        """The states saved during this boot; empty after a reboot or when nothing usable was saved."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as err:
            log.warning(
                "Cannot read the saved device health",
                extra={"path": str(self.path), "error": err.strerror},
            )
            return {}
        try:
            body = json.loads(data)
            if body.get("kind") != KIND or body.get("apiVersion") != API_VERSION:
                raise ValueError(f"not a {API_VERSION} {KIND}")
            saved_boot = str(body["bootID"])
            states = {str(name): _state(item) for name, item in body["devices"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning(
                "Ignoring the unreadable saved device health",
                extra={"path": str(self.path), "reason": str(err)},
            )
            return {}
        if not self.boot_id or saved_boot != self.boot_id:
            if states:
                log.info(
                    "The node rebooted since device health was saved; starting with no conditions",
                    extra={"boot_id": self.boot_id, "saved_boot_id": saved_boot},
                )
            return {}
        return states

    def save(self, states: Mapping[str, DeviceState]) -> bool:
        """Write the states durably; a refusing disk is logged, not raised (health goes on)."""
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "bootID": self.boot_id,
            "devices": {name: _json(state) for name, state in sorted(states.items())},
        }
        try:
            durable.write_bytes(self.path, json.dumps(body, indent=1).encode() + b"\n", mode=0o600)
        except UnidraError as err:
            log.warning("Cannot save device health", extra={"error": str(err)})
            return False
        return True


def _json(state: DeviceState) -> dict[str, Any]:
    return {
        "conditions": [
            {
                "kind": c.kind,
                "code": c.code,
                "message": c.message,
                "raised": c.raised,
                "clearAfter": c.clear_after,
            }
            for c in state.conditions.values()
        ],
        "lastFault": state.last_fault,
        "lastRecovery": state.last_recovery,
        "flaps": state.flaps,
        "updated": state.updated,
    }


def _state(item: Mapping[str, Any]) -> DeviceState:
    conditions = {}
    for c in item["conditions"]:
        clear_after = c["clearAfter"]
        conditions[str(c["kind"])] = Condition(
            kind=str(c["kind"]),
            code=str(c["code"]),
            message=str(c["message"]),
            effect=None,  # the loading board applies its own policy
            raised=float(c["raised"]),
            clear_after=None if clear_after is None else float(clear_after),
        )
    return DeviceState(
        conditions=conditions,
        last_fault=float(item["lastFault"]),
        last_recovery=float(item["lastRecovery"]),
        flaps=int(item["flaps"]),
        updated=float(item["updated"]),
    )
