"""docs/operations.md shows what `unidra fleet` really prints: each output block marked
`<!-- fleet-output: NAME -->` is produced here by playing the runbook's story against the test
API server, and must match. `UNIDRA_UPDATE_DOCS=1 pytest tests/component/test_operations_doc.py`
rewrites the blocks after a deliberate change of the output."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from driver import kubeapi
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.fleet.metrics import FleetCollector
from driver.fleet.service import FleetOptions, run
from driver.fleet.watch import FleetWatcher
from support import cluster

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
# A marker and the text block after it, both indented alike (inside a list item, or not).
MARKER = re.compile(
    r"^( *)<!-- fleet-output: ([\w-]+) -->\n\1```text\n(.*?)^\1```\n", re.DOTALL | re.MULTILINE
)
NAMES = cluster.device_names()
RESOURCE = "resource.k8s.io"
NODES = [f"gpu-node-{n}" for n in range(1, 5)]
# Five of every node's eight GPUs are busy: 12 free, 3 per NVLink domain.
JOBS = {
    "gpu-node-1": {"llm-serve-1": [0, 1, 2, 3], "embed-1": [4]},
    "gpu-node-2": {"llm-serve-2": [0, 1, 2, 3], "embed-2": [4]},
    "gpu-node-3": {"finetune-3": [0, 1], "eval-3": [2, 3, 4]},
    "gpu-node-4": {"batch-4": [0, 1, 2, 3, 4]},
}


class Story:
    """The runbook's cluster in the test API server, and what `unidra fleet` prints of it."""

    def __init__(self, api: FakeApiServer, kubeconfig: Path) -> None:
        self.api = api
        self.kubeconfig = kubeconfig
        for node in NODES:
            api.create("", "nodes", cluster.node(node))
            for obj in cluster.node_slices(node):
                api.create(RESOURCE, "resourceslices", obj)
            for name, indices in JOBS[node].items():
                self.allocate(name, node, indices)
        api.create(RESOURCE, "resourceclaims", cluster.claim("pretrain", namespace="ml", count=4))
        api.create(
            "", "pods", cluster.pod("pretrain-0", ["pretrain"], namespace="ml", phase="Pending")
        )

    def allocate(self, name: str, node: str, indices: list[int]) -> None:
        devices = [(node, NAMES[i]) for i in indices]
        self.api.create(
            RESOURCE,
            "resourceclaims",
            cluster.claim(name, devices, namespace="ml", pods=[f"{name}-0"]),
        )
        self.api.create("", "pods", cluster.pod(f"{name}-0", [name], namespace="ml", node=node))

    def finish(self, name: str) -> None:
        """The job ends: its pod goes, and with it the claim generated for it."""
        self.api.delete("", "pods", f"{name}-0", "ml")
        self.api.delete(RESOURCE, "resourceclaims", name, "ml")

    def republish(
        self, node: str, *, taints: dict[str, list[dict[str, str]]] | None = None
    ) -> None:
        """The driver rewrites the node's slice, with or without health taints."""
        (current,) = [
            s for s in self.api.list(RESOURCE, "resourceslices") if s["spec"]["nodeName"] == node
        ]
        (fresh,) = cluster.node_slices(node, taints=taints)
        current["spec"] = fresh["spec"]
        self.api.update(RESOURCE, "resourceslices", current)

    def fleet(self, *args: str) -> str:
        out = io.StringIO()
        output = args[args.index("-o") + 1] if "-o" in args else "table"
        assert run(FleetOptions(kubeconfig=self.kubeconfig, output=output), out) == 0
        return out.getvalue()

    def metrics(self, *prefixes: str) -> str:
        watcher = FleetWatcher(kubeapi.build_client(self.kubeconfig))
        watcher.load()
        registry = CollectorRegistry()
        registry.register(FleetCollector(watcher.summary))
        lines = generate_latest(registry).decode().splitlines()
        return "\n".join(line for line in lines if line.startswith(prefixes)) + "\n"


def section(text: str, *titles: str) -> str:
    """What `sed -n '/^TITLE/,/^$/p'` prints for each title: a section and the blank line after it."""
    blocks = text.rstrip("\n").split("\n\n")
    return "".join(
        block + "\n" + ("\n" if index < len(blocks) - 1 else "")
        for index, block in enumerate(blocks)
        if block.startswith(titles)
    )


def outputs(story: Story) -> dict[str, str]:
    """Every block of docs/operations.md, in the order the runbook tells the story."""
    found: dict[str, str] = {}
    step: Callable[[str, str], None] = found.__setitem__
    step("overview", story.fleet())
    # Fragmentation: keep new small jobs off gpu-node-4 until it is whole, then run the big one.
    rule = cluster.taint_rule(
        "defragment-gpu-node-4", key="example.com/defragment", pool="gpu-node-4"
    )
    story.api.create(RESOURCE, "devicetaintrules", rule, version="v1beta2")
    story.finish("batch-4")
    step("fragmentation-reserved", section(story.fleet(), "NODES"))
    story.api.delete(RESOURCE, "devicetaintrules", rule["metadata"]["name"], version="v1beta2")
    step("fragmentation-whole", section(story.fleet(), "MODELS"))
    story.api.delete("", "pods", "pretrain-0", "ml")
    story.api.delete(RESOURCE, "resourceclaims", "pretrain", "ml")
    story.allocate("pretrain", "gpu-node-4", [0, 1, 2, 3])
    # A GPU fails: the driver taints it (Xid 79 is `lost`: NoExecute), the pod on it is evicted.
    story.republish("gpu-node-2", taints={NAMES[0]: cluster.unhealthy("lost-79", "NoExecute")})
    step("failure-tainted", section(story.fleet(), "TAINTED"))
    step(
        "failure-metrics",
        story.metrics(
            "unidra_fleet_device_taint_info",
            'unidra_fleet_largest_free_group{dra_driver="unidra.dev",hw_model="NVIDIA H100 80GB HBM3",'
            'hw_type="gpu",hw_vendor="nvidia",interconnect="nvlink",'
            'interconnect_domain="gpu-node-2-nvswitch-fabric-0"',
        ),
    )
    story.finish("llm-serve-2")
    step("failure-evicted", section(story.fleet(), "MODELS", "TAINTED"))
    story.republish("gpu-node-2")
    step("failure-recovered", section(story.fleet(), "MODELS"))
    # A node drained for repair: a NoExecute rule evicts its DRA pods and keeps new ones off.
    maintenance = cluster.taint_rule(
        "maintenance-gpu-node-3",
        key="example.com/maintenance",
        value="repair",
        effect="NoExecute",
        pool="gpu-node-3",
    )
    story.api.create(RESOURCE, "devicetaintrules", maintenance, version="v1beta2")
    story.api.update("", "nodes", cluster.node("gpu-node-3", unschedulable=True))  # kubectl cordon
    story.finish("finetune-3")  # evicted; eval-3's pod hangs on the failing node
    step("drain-held", section(story.fleet(), "TAINTED", "CLAIMS", "note"))
    story.api.delete("", "nodes", "gpu-node-3")
    for obj in story.api.list(RESOURCE, "resourceslices"):
        if obj["spec"]["nodeName"] == "gpu-node-3":  # the Node was deleted: its slices go too
            story.api.delete(RESOURCE, "resourceslices", obj["metadata"]["name"])
    step("drain-orphan", section(story.fleet(), "NODES", "ALLOCATED"))
    story.finish("eval-3")
    story.api.delete(
        RESOURCE, "devicetaintrules", maintenance["metadata"]["name"], version="v1beta2"
    )
    # A driver upgrade: the new version republishes gpu-node-2 in two slices, one after the other.
    (old,) = [
        s
        for s in story.api.list(RESOURCE, "resourceslices")
        if s["spec"]["nodeName"] == "gpu-node-2"
    ]
    first = {
        "metadata": {"name": "gpu-node-2-unidra.dev-upgrade-0"},
        "spec": {
            **old["spec"],
            "pool": {"name": "gpu-node-2", "generation": 2, "resourceSliceCount": 2},
            "devices": old["spec"]["devices"][:4],
        },
    }
    story.api.create(RESOURCE, "resourceslices", first)
    step("upgrade-midway", section(story.fleet(), "NODES", "note"))
    second = {
        "metadata": {"name": "gpu-node-2-unidra.dev-upgrade-1"},
        "spec": {**first["spec"], "devices": old["spec"]["devices"][4:]},
    }
    story.api.create(RESOURCE, "resourceslices", second)
    story.api.delete(RESOURCE, "resourceslices", old["metadata"]["name"])
    step("upgrade-done", section(story.fleet(), "MODELS"))
    return found


def test_the_runbook_shows_what_unidra_fleet_prints(api: FakeApiServer, tmp_path: Path) -> None:
    produced = outputs(Story(api, api.write_kubeconfig(tmp_path / "kubeconfig")))
    text = DOC.read_text()
    if os.environ.get("UNIDRA_UPDATE_DOCS"):
        text = MARKER.sub(lambda m: _block(m[1], m[2], produced[m[2]]), text)
        DOC.write_text(text)
    documented = {m[2]: _dedent(m[3], m[1]) for m in MARKER.finditer(text)}
    assert documented.keys() == produced.keys()
    for name, block in produced.items():
        assert documented[name] == block, name


def _block(indent: str, name: str, body: str) -> str:
    lines = [f"<!-- fleet-output: {name} -->", "```text", *body.splitlines(), "```"]
    return "".join(f"{indent}{line}\n" if line else "\n" for line in lines)


def _dedent(body: str, indent: str) -> str:
    return "".join(line.removeprefix(indent) for line in body.splitlines(keepends=True))
