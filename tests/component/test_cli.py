"""The `unidra` command as a user runs it: inspect tables and JSON, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def unidra(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = (
        [shutil.which("unidra") or "", *args]
        if shutil.which("unidra")
        else [sys.executable, "-m", "driver", *args]
    )
    return subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_inspect_mixed_prints_a_table_of_several_vendors() -> None:
    run = unidra("inspect", "--simulate", "mixed")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "VENDOR",
        "TYPE",
        "MODEL",
        "ARCH",
        "MEMORY",
        "UNITS",
        "PCI",
        "NUMA",
        "INTERCONNECT",
    ]
    vendors = {line.split()[1] for line in lines[1:]}
    assert vendors == {"nvidia", "amd", "intel", "furiosa", "rebellions"}
    assert any("NVIDIA H100 NVL" in line and "nvlink:nvlink-bridge-0" in line for line in lines)


def test_inspect_json() -> None:
    run = unidra("inspect", "--simulate", "dgx-h100", "-o", "json")
    document = json.loads(run.stdout)
    assert len(document["devices"]) == 8
    first = document["devices"][0]
    assert first["name"] == "gpu-0000-1b-00-0" and first["memoryBytes"] == 85520809984
    assert first["interconnect"] == {"technology": "nvlink", "domain": "nvswitch-fabric-0"}


def test_inspect_reads_the_profile_from_the_environment() -> None:
    run = unidra("inspect", env={"UNIDRA_SIMULATE": "rbln-atom"})
    assert run.returncode == 0 and run.stdout.count("RBLN-CA12") == 4


def test_inspect_without_accelerators_lists_profiles(tmp_path: Path) -> None:
    run = unidra("inspect", "--host-root", str(tmp_path), env={"UNIDRA_SIMULATE": ""})
    assert run.returncode == 0
    assert "No accelerators found on this machine." in run.stdout
    assert "dgx-h100, gaudi3, mi300x, mixed, rbln-atom, rngd" in run.stdout
    # every vendor says why it found nothing
    for vendor in ("nvidia", "amd", "intel-gpu", "gaudi", "furiosa", "rebellions", "tpu"):
        assert f"  {vendor}: no PCI device of vendor 0x" in run.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["inspect", "--simulate", "nope"],
            "unidra: invalid setting: --simulate: 'nope' is neither a built-in profile",
        ),
        (
            ["kubelet-plugin", "--simulate", "dgx-h100"],
            "unidra: invalid setting: --node-name: is required",
        ),
        (
            [
                "kubelet-plugin",
                "--node-name",
                "n",
                "--driver-name",
                "Bad_Name",
                "--simulate",
                "mixed",
            ],
            "--driver-name",
        ),
        (
            ["kubelet-plugin", "--node-name", "n", "--cdi-root", "relative", "--simulate", "mixed"],
            "must be an absolute path",
        ),
        (
            ["kubelet-plugin", "--node-name", "n", "--metrics-interval-seconds", "0"],
            "--metrics-interval-seconds: 0.0 must be a positive number of seconds",
        ),
        (
            ["kubelet-plugin", "--node-name", "n", "--taint-effect", "xid=Evict"],
            "--taint-effect: xid=Evict: the effect must be one of",
        ),
        (
            [
                "kubelet-plugin",
                "--node-name",
                "n",
                "--sharing",
                "--backend-option",
                "amd.sharing=|",
            ],
            "--backend-option: amd.sharing='|': expected off, all, or device models",
        ),
    ],
)
def test_errors_are_one_line(args: list[str], message: str) -> None:
    run = unidra(*args, env={"NODE_NAME": ""})
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_inspect_slices_prints_valid_resource_slices() -> None:
    import yaml

    run = unidra("inspect", "--slices", "--simulate", "dgx-h100", "--node-name", "gpu-node-7")
    assert run.returncode == 0, run.stderr
    documents = list(yaml.safe_load_all(run.stdout))
    assert [d["kind"] for d in documents] == ["ResourceSlice"]
    spec = documents[0]["spec"]
    assert spec["pool"] == {"name": "gpu-node-7", "generation": 1, "resourceSliceCount": 1}
    assert spec["nodeName"] == "gpu-node-7" and len(spec["devices"]) == 8


def test_inspect_slices_with_partitions_as_json() -> None:
    run = unidra(
        "inspect",
        "--slices",
        "--simulate",
        "dgx-h100",
        "--partitions",
        "-o",
        "json",
        "--node-name",
        "n",
    )
    items = json.loads(run.stdout)["items"]
    assert [bool(i["spec"].get("sharedCounters")) for i in items] == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert sum(len(i["spec"].get("devices") or []) for i in items) == 208


@pytest.mark.parametrize(
    ("args", "env", "shared"),
    [
        ([], {}, 0),
        (["--sharing"], {}, 8),
        ([], {"UNIDRA_SHARING": "true"}, 8),
        (["--sharing", "--backend-option", "simulated.sharing=*A100*"], {}, 0),
        ([], {"UNIDRA_SHARING": "1", "UNIDRA_BACKEND_OPTIONS": "simulated.sharing=*h100*"}, 8),
    ],
    ids=["off", "flag", "env", "narrowed-away", "narrowed-to-h100"],
)
def test_inspect_slices_with_sharing(args: list[str], env: dict[str, str], shared: int) -> None:
    run = unidra(
        "inspect",
        "--slices",
        "--simulate",
        "dgx-h100",
        "-o",
        "json",
        "--node-name",
        "n",
        *args,
        env={"UNIDRA_SHARING": "", **env},
    )
    assert run.returncode == 0, run.stderr
    (item,) = json.loads(run.stdout)["items"]
    assert sum(bool(d.get("allowMultipleAllocations")) for d in item["spec"]["devices"]) == shared
