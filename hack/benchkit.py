"""What the benchmarks share: summaries, the daemon as a measured process, scraping its histograms."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from driver.kubelet import client as kubelet  # noqa: E402
from driver.localcluster import free_port, stop_process  # noqa: E402

NODE = "node-a"
BENCH_GPUS = 128  # enough for 16 concurrent callers holding 8 devices each
TICKS = os.sysconf("SC_CLK_TCK")


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(p99 * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "n": len(ordered),
    }


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


class Process:
    """`unidra kubelet-plugin` as a child process, with its memory and CPU from /proc."""

    python = sys.executable

    def __init__(self, root: Path, kubeconfig: Path, profile: str, *extra: str) -> None:
        self.root = root
        self.metrics_port = free_port()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                self.python,
                "-m",
                "driver",
                "kubelet-plugin",
                f"--node-name={NODE}",
                f"--kubeconfig={kubeconfig}",
                f"--cdi-root={root / 'cdi'}",
                f"--kubelet-registrar-directory-path={root / 'registry'}",
                f"--kubelet-plugins-directory-path={root / 'plugins'}",
                f"--simulate={profile}",
                f"--metrics-address=127.0.0.1:{self.metrics_port}",
                "--healthcheck-port=-1",
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(root / "daemon.log", "wb"),  # noqa: SIM115 - lives as long as the process
        )

    def register(self) -> kubelet.Plugin:
        registry = self.root / "registry"
        while not kubelet.find_registration_sockets(registry):
            if self.proc.poll() is not None:
                raise SystemExit((self.root / "daemon.log").read_text())
            time.sleep(0.005)
        return kubelet.wait_for_registration(registry)

    def rss_mib(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(field)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime

    def scrape(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as r:
            return r.read().decode()

    def stop(self) -> None:
        stop_process(self.proc, 30)


def histogram(text: str, name: str, label: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of a histogram per value of its one label."""
    found: dict[str, list[float]] = {}
    for kind in ("sum", "count"):
        for value, number in re.findall(
            rf'^{name}_{kind}{{{label}="(\w+)"}} (\S+)$', text, re.MULTILINE
        ):
            found.setdefault(value, [0.0, 0.0])[kind == "count"] = float(number)
    return {value: (pair[0], pair[1]) for value, pair in found.items()}


def means(before: str, after: str, name: str, label: str) -> dict[str, float]:
    """Mean milliseconds per label value between two scrapes."""
    return means_over([(before, after)], name, label)


def means_over(windows: list[tuple[str, str]], name: str, label: str) -> dict[str, float]:
    """Mean milliseconds per label value over several (before, after) pairs of scrapes."""
    totals: dict[str, list[float]] = {}
    for before, after in windows:
        start, end = histogram(before, name, label), histogram(after, name, label)
        for value, (total, count) in end.items():
            pair = totals.setdefault(value, [0.0, 0.0])
            pair[0] += total - start.get(value, (0.0, 0.0))[0]
            pair[1] += count - start.get(value, (0.0, 0.0))[1]
    return {
        value: round(total / count * 1000, 3) for value, (total, count) in totals.items() if count
    }


def bench_profile(path: Path) -> Path:
    """A node with BENCH_GPUS H100s in fabrics of 8."""
    lines = ["description: benchmark node", "devices:"]
    for fabric in range(BENCH_GPUS // 8):
        lines += [
            "  - model: h100-sxm5-80gb",
            f"    interconnectDomain: nvswitch-fabric-{fabric}",
            "    instances:",
        ]
        for index in range(fabric * 8, fabric * 8 + 8):
            bus = f"{index + 1:02x}"
            lines.append(
                f'      - {{pciBusID: "0000:{bus}:00.0", pcieRoot: pci0000:{bus}, '
                f"numaNode: {index * 2 // BENCH_GPUS}}}"
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def gpu(index: int) -> str:
    return f"gpu-0000-{index + 1:02x}-00-0"


def ok(answer: dict[str, kubelet.ClaimResult], claim: tuple[str, str, str]) -> None:
    if answer[claim[2]].error:
        raise SystemExit(f"claim failed: {answer[claim[2]].error}")
