"""Run `unidra` subcommands as an operator would (a separate process, from this checkout), and load hack/ scripts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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


def hack_script(name: str) -> ModuleType:
    """A script of hack/ (`smoke.py`) as a module, as `python3 hack/<name>` would run it."""
    module_name = f"unidra_hack_{name.removesuffix('.py')}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "hack" / name)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[module_name]
