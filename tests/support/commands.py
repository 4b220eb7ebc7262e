"""Run `unidra` subcommands as an operator would: a separate process, from this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_simulate(plugins_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`unidra simulate ...` against the daemons whose plugin directory is under `plugins_dir`."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "driver",
            "simulate",
            *args,
            f"--kubelet-plugins-directory-path={plugins_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def simulate(plugins_dir: Path, *args: str) -> str:
    """The output of a `unidra simulate ...` that must succeed."""
    run = run_simulate(plugins_dir, *args)
    assert run.returncode == 0, run.stderr
    return run.stdout
