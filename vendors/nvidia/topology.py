"""NVLink domains from NVML's per-link answers; pure functions.

GPUs joined by NVLink, directly (bridge pairs) or through NVSwitches, form one domain. When the
fabric manager reports a completed multi-node NVLink fabric, its cluster UUID and clique id name
the domain, so GPUs of one rack share it across nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SWITCH = 2  # NVML_NVLINK_DEVICE_TYPE_SWITCH
GPU = 0  # NVML_NVLINK_DEVICE_TYPE_GPU


@dataclass(frozen=True)
class Links:
    """What one GPU's active NVLinks lead to."""

    uuid: str
    bdf: str
    gpu_peers: tuple[str, ...] = ()
    switches: tuple[str, ...] = ()
    fabric: str | None = None  # "<clusterUuid>.<cliqueId>" when the fabric is up


def domains(gpus: Sequence[Links]) -> Mapping[str, tuple[str, tuple[str, ...]]]:
    """For every GPU with NVLink: (domain id, UUIDs of the other GPUs in it)."""
    by_bdf = {gpu.bdf: gpu for gpu in gpus}
    parent = {gpu.uuid: gpu.uuid for gpu in gpus}

    def find(uuid: str) -> str:
        while parent[uuid] != uuid:
            parent[uuid] = parent[parent[uuid]]
            uuid = parent[uuid]
        return uuid

    def join(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    switch_members: dict[str, list[str]] = {}
    for gpu in gpus:
        for peer_bdf in gpu.gpu_peers:
            if peer_bdf in by_bdf:
                join(gpu.uuid, by_bdf[peer_bdf].uuid)
        for switch in gpu.switches:
            switch_members.setdefault(switch, []).append(gpu.uuid)
    for attached in switch_members.values():
        for uuid in attached[1:]:
            join(attached[0], uuid)
    groups: dict[str, list[Links]] = {}
    for gpu in gpus:
        if gpu.gpu_peers or gpu.switches or gpu.fabric:
            groups.setdefault(find(gpu.uuid), []).append(gpu)
    result: dict[str, tuple[str, tuple[str, ...]]] = {}
    for group in groups.values():
        uuids = sorted(m.uuid for m in group)
        fabrics = {m.fabric for m in group if m.fabric}
        if len(fabrics) == 1:
            domain = fabrics.pop()
        else:
            domain = "nvlink-" + hashlib.sha256(",".join(uuids).encode()).hexdigest()[:16]
        for member in group:
            result[member.uuid] = (domain, tuple(u for u in uuids if u != member.uuid))
    return result
