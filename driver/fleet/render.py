"""Render a fleet report as tables for people, or as a JSON/YAML document for programs; pure."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from driver.fleet.view import (
    STATES,
    ClaimView,
    DeviceView,
    Group,
    ModelSummary,
    Report,
    Request,
)

API_VERSION = "unidra.dev/v1alpha1"
_STATE_COLUMNS = ("FREE", "ALLOCATED", "PARTITIONED", "TAINTED", "UNAVAILABLE")


def render(report: Report, output: str) -> str:
    if output == "json":
        return json.dumps(document(report), indent=2)
    if output == "yaml":
        return yaml.safe_dump(document(report), sort_keys=False).rstrip()
    return tables(report)


# -- the document ---------------------------------------------------------------------------------


def document(report: Report) -> dict[str, Any]:
    """The report as the JSON/YAML document docs/fleet.md describes (`largestFreeGroup`, ...)."""
    nodes: dict[str, list[dict[str, Any]]] = {}
    for group in report.groups:
        nodes.setdefault(group.node, []).append(_group(group))
    closed = dict(report.unschedulable_nodes)
    return {
        "apiVersion": API_VERSION,
        "kind": "FleetReport",
        "jobSizes": list(report.job_sizes),
        "models": [_model(m) for m in report.models],
        "nodes": [
            {
                "node": node or None,
                **({"unschedulable": closed[node]} if node in closed else {}),
                "groups": groups,
            }
            for node, groups in nodes.items()
        ],
        "domains": [
            {
                "model": d.model,
                "interconnect": d.interconnect,
                "domain": d.domain,
                "nodes": list(d.nodes),
                "total": d.total,
                **_counts(d.counts),
                "largestFreeGroup": d.largest_free_group,
            }
            for d in report.domains
        ],
        "claims": [_claim(c) for c in report.claims],
        "pending": [
            {
                "namespace": p.namespace,
                "pod": p.pod,
                "claims": [
                    {"name": name, "requests": [_request(r) for r in requests]}
                    for name, requests in p.claims
                ],
                "extendedResources": [_request(r) for r in p.extended],
            }
            for p in report.pending
        ],
        "orphans": [
            {
                "namespace": o.namespace,
                "claim": o.claim,
                "driver": o.driver,
                "pool": o.pool,
                "device": o.device,
            }
            for o in report.orphans
        ],
        "ignoredDevices": [{"driver": d, "devices": n} for d, n in report.ignored],
        "incompletePools": [{"driver": d, "pool": p} for d, p in report.incomplete_pools],
        "sources": {
            kind: {
                "synced": s.synced,
                "served": s.served,
                "lists": s.lists,
                "objects": s.objects,
                **({"error": s.error} if s.error else {}),
            }
            for kind, s in report.sync.items()
        },
    }


def _counts(counts: Mapping[str, int]) -> dict[str, int]:
    return {state: counts[state] for state in STATES}


def _model(model: ModelSummary) -> dict[str, Any]:
    return {
        "model": model.model,
        "vendor": model.vendor,
        "type": model.type,
        "total": model.total,
        **_counts(model.counts),
        "partitionsInUse": model.partitions_in_use,
        "largestFreeGroup": model.largest_free_group,
        "fragmentation": [
            {"jobSize": f.job_size, "stranded": f.stranded, "ratio": f.ratio}
            for f in model.fragmentation
        ],
    }


def _group(group: Group) -> dict[str, Any]:
    return {
        "driver": group.driver,
        "pool": group.pool,
        "model": group.model,
        "vendor": group.vendor,
        "type": group.type,
        "interconnect": group.interconnect or None,
        "domain": group.domain or None,
        "total": group.total,
        **_counts(group.counts),
        "partitionsInUse": group.partitions_in_use,
        **({"freePartitions": dict(group.free_partitions)} if group.free_partitions else {}),
        "largestFreeGroup": group.largest_free_group,
        "devices": [_device(d) for d in group.devices],
    }


def _device(device: DeviceView) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": device.name, "state": device.state}
    if device.taints:
        entry["taints"] = [
            {"key": t.key, "value": t.value, "effect": t.effect, "source": t.source}
            for t in device.taints
        ]
    if device.holders:
        entry["holders"] = [
            {
                "namespace": h.namespace,
                "claim": h.claim,
                "request": h.request,
                **({"partition": h.device} if h.device != device.name else {}),
                **({"adminAccess": True} if h.admin else {}),
            }
            for h in device.holders
        ]
    return entry


def _claim(claim: ClaimView) -> dict[str, Any]:
    return {
        "namespace": claim.namespace,
        "name": claim.name,
        "extendedResource": claim.extended_resource,
        "pods": [
            {"name": p.name, "phase": p.phase or None, "node": p.node or None} for p in claim.pods
        ],
        "devices": [
            {
                "driver": d.driver,
                "pool": d.pool,
                "node": d.node or None,
                "device": d.device,
                "model": d.model or None,
                "partition": d.partition,
            }
            for d in claim.devices
        ],
    }


def _request(request: Request) -> dict[str, Any]:
    return {
        "name": request.name,
        "deviceClassNames": list(request.device_classes),
        "count": "All" if request.count is None else request.count,
    }


# -- tables ---------------------------------------------------------------------------------------


def tables(report: Report) -> str:
    if not report.groups:
        slices = report.sync.get("ResourceSlice")
        read = f" in {slices.objects} ResourceSlices" if slices else ""
        return "\n".join(
            ["No devices with Unidra's attribute vocabulary found" + read + ".", *_notes(report)]
        )
    sections = [_models_table(report), _nodes_table(report)]
    multi_node = [d for d in report.domains if len(d.nodes) > 1]
    if multi_node:
        sections.append(
            _section(
                "INTERCONNECT DOMAINS ACROSS NODES",
                ("MODEL", "DOMAIN", "NODES", "TOTAL", *_STATE_COLUMNS, "LARGEST FREE GROUP"),
                [
                    (
                        d.model,
                        f"{d.interconnect}:{d.domain}",
                        str(len(d.nodes)),
                        str(d.total),
                        *(str(d.counts[s]) for s in STATES),
                        str(d.largest_free_group),
                    )
                    for d in multi_node
                ],
            )
        )
    tainted = [(g, d, t) for g in report.groups for d in g.devices for t in d.taints]
    if tainted:
        sections.append(
            _section(
                "TAINTED OR UNHEALTHY DEVICES",
                ("NODE", "DEVICE", "MODEL", "STATE", "TAINT", "SOURCE", "HELD BY"),
                [
                    (g.node or "-", d.name, g.model, d.state, t.text, t.source, _held_by(d))
                    for g, d, t in tainted
                ],
            )
        )
    if report.claims:
        sections.append(
            _section(
                "CLAIMS",
                ("NAMESPACE", "CLAIM", "PODS", "NODE", "DEVICES"),
                [
                    (
                        c.namespace,
                        c.name,
                        ", ".join(f"{p.name} ({p.phase or 'unknown'})" for p in c.pods) or "-",
                        ", ".join(sorted({d.node or "-" for d in c.devices})),
                        ", ".join(d.device for d in c.devices),
                    )
                    for c in report.claims
                ],
            )
        )
    if report.pending:
        sections.append(
            _section(
                "PENDING PODS WAITING FOR DEVICES",
                ("NAMESPACE", "POD", "CLAIM", "WANTS"),
                [
                    row
                    for p in report.pending
                    for row in [
                        *(
                            (p.namespace, p.pod, name, _wants(requests))
                            for name, requests in p.claims
                        ),
                        *((p.namespace, p.pod, f"({r.name})", _wants([r])) for r in p.extended),
                    ]
                ],
            )
        )
    if report.orphans:
        sections.append(
            _section(
                "ALLOCATED DEVICES NO SLICE PUBLISHES (node drained, lost or its driver stopped)",
                ("NAMESPACE", "CLAIM", "DRIVER", "POOL", "DEVICE"),
                [(o.namespace, o.claim, o.driver, o.pool, o.device) for o in report.orphans],
            )
        )
    notes = _notes(report)
    return "\n\n".join(sections) + ("\n\n" + "\n".join(notes) if notes else "")


def _models_table(report: Report) -> str:
    return _section(
        "MODELS",
        (
            "MODEL",
            "VENDOR",
            "TOTAL",
            *_STATE_COLUMNS,
            "PARTITIONS",
            "LARGEST FREE GROUP",
            *(f"STRANDED@{n}" for n in report.job_sizes),
        ),
        [
            (
                m.model,
                m.vendor,
                str(m.total),
                *(str(m.counts[s]) for s in STATES),
                str(m.partitions_in_use),
                str(m.largest_free_group),
                *(str(f.stranded) for f in m.fragmentation),
            )
            for m in report.models
        ],
    )


def _nodes_table(report: Report) -> str:
    several_drivers = len({g.driver for g in report.groups}) > 1
    return _section(
        "NODES",
        (
            "NODE",
            *(("DRIVER",) if several_drivers else ()),
            "MODEL",
            "DOMAIN",
            "TOTAL",
            *_STATE_COLUMNS,
            "PARTITIONS",
            "LARGEST FREE GROUP",
        ),
        [
            (
                g.node or f"(pool {g.pool})",
                *((g.driver,) if several_drivers else ()),
                g.model,
                f"{g.interconnect}:{g.domain}" if g.domain else "-",
                str(g.total),
                *(str(g.counts[s]) for s in STATES),
                str(g.partitions_in_use),
                str(g.largest_free_group),
            )
            for g in report.groups
        ],
    )


def _held_by(device: DeviceView) -> str:
    return ", ".join(sorted({f"{h.namespace}/{h.claim}" for h in device.holders})) or "-"


def _wants(requests: Sequence[Request]) -> str:
    return ", ".join(
        f"{'all' if r.count is None else r.count} x {' or '.join(r.device_classes)}"
        for r in requests
    )


# What makes a kind readable that the API server does not serve.
_REMEDIES = {
    "DeviceTaintRule": " (where the API server does not serve them, Kubernetes 1.36 needs "
    "resource.k8s.io/v1beta2 served and the DRADeviceTaintRules feature gate)",
}


def _notes(report: Report) -> list[str]:
    notes = [
        f"note: {kind} not read: {s.error}{_REMEDIES.get(kind, '') if not s.served else ''}"
        if not s.served or not s.synced
        else f"note: {kind} may be stale, its watch failed (retrying): {s.error}"
        for kind, s in report.sync.items()
        if not s.served or s.error
    ]
    notes += [
        f"note: pool {pool} of {driver} is incomplete (being republished); its free devices are unavailable"
        for driver, pool in report.incomplete_pools
    ]
    notes += [
        f"note: node {node} is {reason} and takes no new pods; its free devices are unavailable"
        for node, reason in report.unschedulable_nodes
    ]
    notes += [
        f"note: {count} devices of {driver} do not use Unidra's vocabulary and are left out"
        for driver, count in report.ignored
    ]
    return notes


def _section(title: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    body = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    return "\n".join([title, *body])
