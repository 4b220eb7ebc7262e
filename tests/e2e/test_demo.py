"""`unidra demo --kube-bin DIR` on real Kubernetes: the real scheduler allocates the story's claim
through a pod, the real kubelet prepares it and reports the GPU's health in the pod's status, and
nothing is left behind: no process, no mount, no directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from e2e.plugin import REPO

STEPS = (
    "A cluster: real Kubernetes from",
    "kube-scheduler and a kubelet whose containers run on fakecri.",
    "Node demo-node exists",
    "The Unidra kubelet plugin starts for demo-node, on simulated hardware (dgx-h100).",
    "Kubelet finds the registration socket and registers the plugin.",
    "/kubelet/plugins/unidra.dev/dra.sock",
    "The plugin publishes 8 devices as ResourceSlices (pool demo-node):",
    "The scheduler allocates a device and reserves the claim for a pod.",
    "It picked gpu-",
    "The plugin answers with the CDI device IDs for the container runtime: k8s.unidra.dev/claim=",
    '"kind": "k8s.unidra.dev/claim"',
    "The GPU fails: Xid 79 on gpu-",
    "=lost-79:NoExecute",
    ": Unhealthy Xid 79: GPU has fallen off the bus (pod demo-gpu-pod, claim:gpu)",
    "Ready=False (Xid 79: GPU has fallen off the bus)",
    'hw_state="failed"} 1',
    "the taint is gone",
    ": Healthy (pod demo-gpu-pod, claim:gpu)",
    "The pod is gone: kubelet unprepares the claim.",
    "Its CDI spec is removed: [] left.",
    "Done.",
)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{entry.name}: {command}")
    return found


def test_the_demo_on_real_kubernetes_tells_the_story_and_leaves_nothing(kube_bin: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("UNIDRA_KUBE_BIN", "UNIDRA_E2E_BIN")}
    run = subprocess.run(
        [sys.executable, "-m", "driver", "demo", f"--kube-bin={kube_bin}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    position = 0
    for step in STEPS:  # in this order
        found = run.stdout.find(step, position)
        assert found >= 0, f"{step!r} missing after position {position}:\n{run.stdout}"
        position = found
    match = re.search(r"live in (/tmp/unidra-demo-\w+)\.", run.stdout)
    assert match is not None, run.stdout
    root = match.group(1)
    assert not Path(root).exists()
    assert root not in Path("/proc/self/mountinfo").read_text()
    assert _processes_mentioning(root) == []
