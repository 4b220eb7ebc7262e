"""The real scheduler allocating from Unidra's slices: examples, fabric constraints, partitions, taints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.plugin import (
    PluginProcess,
    apply,
    claim_template,
    delete,
    device_request,
    ensure_namespace,
    pod,
    pod_claims,
    scheduling_message,
    simulated_device_count,
    wait_pod_gone,
    wait_pod_ready,
    wait_published,
)

from driver.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.yaml"))
TWO_FABRICS = Path(__file__).parent / "profiles" / "two-fabrics.yaml"
NS = "e2e-scheduler"


@pytest.fixture(scope="module")
def namespace(cluster: LocalCluster, installed: str) -> str:
    ensure_namespace(cluster, NS)
    return NS


def _devices(claim: dict[str, Any]) -> list[str]:
    return [r["device"] for r in claim["status"]["allocation"]["devices"]["results"]]


def _run(cluster: LocalCluster, name: str, templates: dict[str, str]) -> list[dict[str, Any]]:
    apply(cluster, pod(name, NS, templates=templates))
    wait_pod_ready(cluster, NS, name)
    return pod_claims(cluster, NS, name)


def _remove(cluster: LocalCluster, *names: str) -> None:
    for name in names:
        delete(cluster, "pod", name, NS)
    for name in names:
        wait_pod_gone(cluster, NS, name)


def _try_it_on(example: Path) -> tuple[str, ...]:
    """The simulated node an example names in its `# Try it on ...` line, as plugin flags."""
    marker = "# Try it on a simulated node: unidra kubelet-plugin "
    for line in example.read_text().splitlines():
        if line.startswith(marker):
            return tuple(line.removeprefix(marker).split())
    raise AssertionError(f"{example.name} does not say which simulated node it runs on")


NODES = sorted({_try_it_on(e) for e in EXAMPLES})


@pytest.mark.parametrize("flags", NODES, ids=[" ".join(f) for f in NODES])
def test_every_documented_example_allocates_on_the_node_it_names(
    cluster: LocalCluster, namespace: str, flags: tuple[str, ...]
) -> None:
    profile = flags[flags.index("--simulate") + 1]
    partitions = "--partitions" in flags
    examples = [e for e in EXAMPLES if _try_it_on(e) == flags]
    rest = [f for f in flags if f not in ("--simulate", profile)]
    with PluginProcess(cluster, simulate=profile, args=rest):
        devices = wait_published(cluster, simulated_device_count(profile, partitions))
        for example in examples:
            template = yaml.safe_load(example.read_text())
            template["metadata"]["namespace"] = NS
            apply(cluster, template)
            name = f"example-{example.stem}"
            (claim,) = _run(cluster, name, {"claim": template["metadata"]["name"]})
            results = claim["status"]["allocation"]["devices"]["results"]
            assert results, example.name
            assert all(r["driver"] == "unidra.dev" and r["device"] in devices for r in results)
            _remove(cluster, name)
        if not partitions:
            _an_impossible_claim_stays_pending_with_the_schedulers_reason(cluster)


def _an_impossible_claim_stays_pending_with_the_schedulers_reason(cluster: LocalCluster) -> None:
    huge = 'device.capacity["unidra.dev"].memory.compareTo(quantity("1Ti")) >= 0'
    apply(
        cluster,
        claim_template(
            "huge-gpu", NS, {"devices": {"requests": [device_request(selectors=[huge])]}}
        ),
        pod("wants-huge-gpu", NS, templates={"gpu": "huge-gpu"}),
    )
    assert "cannot allocate all claims" in scheduling_message(cluster, NS, "wants-huge-gpu")
    _remove(cluster, "wants-huge-gpu")


def test_match_attribute_keeps_a_four_gpu_claim_on_one_fabric(
    cluster: LocalCluster, namespace: str
) -> None:
    with PluginProcess(cluster, simulate=str(TWO_FABRICS)):
        devices = wait_published(cluster, 8)
        domain = {
            name: d["attributes"]["interconnectDomain"]["string"] for name, d in devices.items()
        }
        # Take one GPU of board a, so that the first four free GPUs span both boards.
        pinned = 'device.attributes["resource.kubernetes.io"].pciBusID == "0000:1b:00.0"'
        apply(
            cluster,
            claim_template(
                "pinned", NS, {"devices": {"requests": [device_request(selectors=[pinned])]}}
            ),
            claim_template(
                "four-on-one-fabric",
                NS,
                {
                    "devices": {
                        "requests": [device_request(count=4)],
                        "constraints": [{"matchAttribute": "unidra.dev/interconnectDomain"}],
                    }
                },
            ),
        )
        _run(cluster, "holds-one", {"gpu": "pinned"})
        (claim,) = _run(cluster, "gang-of-four", {"gpus": "four-on-one-fabric"})
        chosen = _devices(claim)
        assert len(chosen) == 4
        assert {domain[d] for d in chosen} == {"nvlink-board-b"}
        _remove(cluster, "holds-one", "gang-of-four")


def test_counters_never_allocate_a_gpu_and_its_partitions_together(
    cluster: LocalCluster, namespace: str
) -> None:
    with PluginProcess(cluster, simulate="dgx-h100", args=["--partitions"]):
        devices = wait_published(cluster, simulated_device_count("dgx-h100", partitions=True))
        uuid = devices["gpu-0000-1b-00-0"]["attributes"]["uuid"]["string"]
        whole = f'device.attributes["unidra.dev"].uuid == "{uuid}"'
        part = f'device.attributes["unidra.dev"].parentUUID == "{uuid}"'
        apply(
            cluster,
            claim_template(
                "the-gpu", NS, {"devices": {"requests": [device_request(selectors=[whole])]}}
            ),
            claim_template(
                "a-slice-of-it",
                NS,
                {
                    "devices": {
                        "requests": [
                            device_request(device_class="partition.unidra.dev", selectors=[part])
                        ]
                    }
                },
            ),
        )
        _run(cluster, "whole-gpu", {"gpu": "the-gpu"})
        apply(cluster, pod("mig-slice", NS, templates={"slice": "a-slice-of-it"}))
        assert "cannot allocate all claims" in scheduling_message(cluster, NS, "mig-slice")
        _remove(cluster, "whole-gpu")
        wait_pod_ready(cluster, NS, "mig-slice")
        (claim,) = pod_claims(cluster, NS, "mig-slice")
        assert _devices(claim)[0].startswith("gpu-0000-1b-00-0-mig-")
        # And the other way round: with a slice allocated, the whole GPU is not free.
        apply(cluster, pod("whole-gpu-again", NS, templates={"gpu": "the-gpu"}))
        assert "cannot allocate all claims" in scheduling_message(cluster, NS, "whole-gpu-again")
        _remove(cluster, "mig-slice", "whole-gpu-again")
