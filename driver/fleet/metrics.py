"""Prometheus metrics of the fleet view: devices by state, the largest free group, fragmentation and
taints per node, model and interconnect domain (docs/metrics.md, "The fleet")."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from driver.fleet.view import KINDS, STATES, Group, Kind, ModelSummary, Sync

GROUP_LABELS = (
    "dra_driver",
    "k8s_node_name",
    "hw_vendor",
    "hw_type",
    "hw_model",
    "interconnect",
    "interconnect_domain",
)
MODEL_LABELS = ("hw_vendor", "hw_type", "hw_model")
ALWAYS = ("free", "allocated", "tainted")  # the other states are exported only while non-zero
TAINT_LABELS = (
    "dra_driver",
    "k8s_node_name",
    "hw_id",
    "hw_vendor",
    "hw_model",
    "taint_key",
    "taint_value",
    "taint_effect",
    "taint_source",
)

Summary = tuple[Sequence[Group], Sequence[ModelSummary], Mapping[Kind, Sync]]


def recompute_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "unidra_fleet_recompute_seconds",
        "Time to bring the fleet view up to date after changes.",
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        registry=registry,
    )


class FleetCollector(Collector):
    """Fleet series at scrape time from the watcher's current view (recomputed incrementally)."""

    def __init__(self, summary: Callable[[], Summary]) -> None:
        self.summary = summary

    def describe(self) -> Iterator[Metric]:
        return iter(())  # label values are known only at scrape time

    def collect(self) -> Iterator[Metric]:
        groups, models, sync = self.summary()
        devices = GaugeMetricFamily(
            "unidra_fleet_devices",
            "Whole devices by state: free, allocated, partitioned, tainted or unavailable.",
            labels=(*GROUP_LABELS, "state"),
        )
        largest = GaugeMetricFamily(
            "unidra_fleet_largest_free_group",
            "Free devices one claim can take together: one node, model and interconnect domain.",
            labels=GROUP_LABELS,
        )
        partitions = GaugeMetricFamily(
            "unidra_fleet_partitions_in_use",
            "Allocated partitions (MIG, compute partitions) of the group's devices.",
            labels=GROUP_LABELS,
        )
        taints = GaugeMetricFamily(
            "unidra_fleet_device_taint_info",
            "A taint on a device, from its ResourceSlice or a DeviceTaintRule; value 1.",
            labels=TAINT_LABELS,
        )
        for group in groups:
            labels = [
                group.driver,
                group.node,
                group.vendor,
                group.type,
                group.model,
                group.interconnect,
                group.domain,
            ]
            for state in STATES:
                # Rare states only while they occur: 10,000 groups make every series count.
                if state in ALWAYS or group.counts[state]:
                    devices.add_metric([*labels, state], float(group.counts[state]))
            largest.add_metric(labels, float(group.largest_free_group))
            if group.partitions_in_use:
                partitions.add_metric(labels, float(group.partitions_in_use))
            for device in group.devices:
                for taint in device.taints:
                    taints.add_metric(
                        [
                            group.driver,
                            group.node,
                            device.name,
                            group.vendor,
                            group.model,
                            taint.key,
                            taint.value,
                            taint.effect,
                            taint.source,
                        ],
                        1.0,
                    )
        yield from (devices, largest, partitions, taints)
        yield from _fragmentation(models)
        yield from _sync(sync)


def _fragmentation(models: Sequence[ModelSummary]) -> Iterator[Metric]:
    ratio = GaugeMetricFamily(
        "unidra_fleet_fragmentation_ratio",
        "Share of a model's free devices that no job of job_size devices on one node and domain can use.",
        labels=(*MODEL_LABELS, "job_size"),
    )
    stranded = GaugeMetricFamily(
        "unidra_fleet_stranded_devices",
        "Free devices of a model that no job of job_size devices on one node and domain can use.",
        labels=(*MODEL_LABELS, "job_size"),
    )
    for model in models:
        for fragment in model.fragmentation:
            labels = [model.vendor, model.type, model.model, str(fragment.job_size)]
            ratio.add_metric(labels, fragment.ratio)
            stranded.add_metric(labels, float(fragment.stranded))
    yield from (ratio, stranded)


def _sync(sync: Mapping[Kind, Sync]) -> Iterator[Metric]:
    synced = GaugeMetricFamily(
        "unidra_fleet_synced", "1 once the kind was listed (or found not served).", labels=("kind",)
    )
    objects = GaugeMetricFamily(
        "unidra_fleet_objects", "Objects of the kind the view is built from.", labels=("kind",)
    )
    lists = CounterMetricFamily(
        "unidra_fleet_lists",
        "Full lists of the kind: one at start, then one per expired watch (410 Gone).",
        labels=("kind",),
    )
    failing = GaugeMetricFamily(
        "unidra_fleet_watch_failing",
        "1 while the kind's last list or watch failed: what the view shows of it may be stale.",
        labels=("kind",),
    )
    for kind in KINDS:
        state = sync.get(kind, Sync())
        synced.add_metric([kind], 1.0 if state.synced else 0.0)
        objects.add_metric([kind], float(state.objects))
        lists.add_metric([kind], float(state.lists))
        failing.add_metric([kind], 1.0 if state.served and state.error else 0.0)
    yield from (synced, objects, lists, failing)
