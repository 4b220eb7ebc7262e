"""The benchmark harnesses still run end to end and report every measurement (tiny counts; the
numbers themselves belong in BENCHMARKS.md, never in assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "hack" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bench_reports_every_scenario() -> None:
    report = json.loads(run("bench", "--quick", "--rounds", "4", "--concurrency", "2"))
    claims = report["claims"]
    for scenario in (
        "1x1_sequential",
        "1x8_sequential",
        "1share_sequential",
        "1x1_2_callers",
        "1x8_2_callers",
        "1share_2_callers_2_gpus",
    ):
        assert claims[scenario]["prepare"]["n"] == 4
        assert set(claims[scenario]["phases_mean_ms"]) >= {"claim_get", "cdi_write"}
    assert report["pool_dgx_h100_partitions"]["devices"] == 208
    assert report["pool_dgx_h100"]["idle"]["api_writes"] == 0
    assert claims["peak_rss_mib"] > 0


def test_bench_health_reports_every_path() -> None:
    output = run("bench-health", "--rounds", "2")
    for path in ("floor", "taint in API server", "health stream UNHEALTHY", "taint removed"):
        assert path in output


def test_bench_fleet_reports_every_measurement(tmp_path: Path) -> None:
    results = tmp_path / "fleet.json"
    run("bench-fleet", "--nodes", "20", "--changes", "8", "--api", "--json", str(results))
    report = json.loads(results.read_text())
    measured = report["in_process"]
    assert measured["devices"] == 160
    assert measured["change_then_scrape_view"]["n"] == 8 and measured["state_mib"] > 0
    through = report["api"]
    assert through["write_to_view"]["n"] == 8 and through["deployment_rss_mib"] > 0
    assert set(through["lists"].values()) == {1}
