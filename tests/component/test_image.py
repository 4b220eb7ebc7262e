"""The container image's recipe: what the Dockerfile copies exists, its extras are real, the wheel
it installs carries the simulated profiles and generated protocol code, and the DaemonSet runs
the image's own entry point. (No container runtime here: the build itself runs in release CI.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from support import kustomize

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    return re.findall(rf"^{name} (.+)$", DOCKERFILE, re.MULTILINE)


def test_everything_copied_exists_and_nothing_else_goes_in() -> None:
    copied = [
        part for line in instructions("COPY") if "--from" not in line for part in line.split()[:-1]
    ]
    assert copied and all((REPO / path).exists() for path in copied)
    allowed = {
        line.lstrip("!").rstrip("/")
        for line in (REPO / ".dockerignore").read_text().split()
        if line.startswith("!")
    }
    assert {path.rstrip("/") for path in copied} <= allowed


def test_the_documented_extras_exist() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    documented = set(re.findall(r"--build-arg EXTRAS=(\w+)", DOCKERFILE))
    assert documented and documented <= set(extras)
    assert any(
        '".[${EXTRAS}]"' in line for line in instructions("    && /opt/unidra/bin/pip install")
    )


def test_the_daemonset_runs_the_image_entry_point() -> None:
    entry = json.loads(instructions("ENTRYPOINT")[0]) + json.loads(instructions("CMD")[0])
    ds = next(o for o in kustomize.render(REPO / "manifests") if o["kind"] == "DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert container["command"] == entry


def test_the_wheel_carries_data_files_and_entry_points(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("unidra-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "vendors/simulated/catalog.yaml" in names
    assert "vendors/simulated/profiles/dgx-h100.yaml" in names
    assert "driver/kubelet/gen/dra/v1/api_pb2.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "unidra = driver.cli:main" in text and "nvidia = vendors.nvidia:NvidiaBackend" in text
