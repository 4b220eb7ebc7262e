"""`hack/bench --side-by-side` runs against the real API server and reports every figure (tiny counts;
the numbers belong in BENCHMARKS.md, never in assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from driver.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]


def test_the_side_by_side_benchmark_reports_every_scenario(cluster: LocalCluster) -> None:
    peer = cluster.bin_dir / "dra-test-driver"
    if not peer.is_file():
        message = f"{peer} is missing: the Go reference driver is the benchmark's peer"
        if os.environ.get("UNIDRA_E2E_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)
    # Its own control plane, from the same binaries as the session's cluster.
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "hack" / "bench"),
            "--side-by-side",
            "--rounds",
            "1",
            "--cycles",
            "16",
            "--pace",
            "0.01",
            "--kube-bin",
            str(cluster.bin_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    for scenario in ("1x1_sequential", "1x8_sequential", "1x1_16_callers"):
        entry = report["scenarios"][scenario]
        assert set(entry) == {"unidra", "go-reference", "ratio_unidra_to_go"}
        assert entry["unidra"]["prepare_median_ms"] > 0
    assert report["rss_mib"]["go-reference"] > 0
    where = report["unidra_where_the_time_goes_mean_ms"]["1x1_sequential"]
    assert {"claim_get", "cdi_write", "handler", "outside_the_handler"} <= set(where["prepare"])
    assert where["unprepare"]["client"] > 0
    assert "| 1x1_sequential | prepare p50 ms |" in done.stdout
