"""The `unidra` command as a user runs it: inspect tables and JSON, and one-line errors without tracebacks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def test_inspect_partitions_shows_them_in_the_table_and_json() -> None:
    table = unidra("inspect", "--simulate", "dgx-h100", "--partitions")
    assert table.returncode == 0 and table.stderr == ""  # the simulated backend publishes them
    rows = table.stdout.splitlines()
    assert rows[1].startswith("gpu-0000-1b-00-0 ")
    assert rows[2].split()[0] == "gpu-0000-1b-00-0-mig-1g10gb-0" and "(partition)" in rows[2]
    document = json.loads(
        unidra("inspect", "--simulate", "dgx-h100", "--partitions", "-o", "json").stdout
    )
    assert len(document["partitions"]) == 200
    assert document["partitions"][0] | {"consumes": None} == {
        "name": "gpu-0000-1b-00-0-mig-1g10gb-0",
        "parent": "gpu-0000-1b-00-0",
        "profile": "1g.10gb",
        "placement": 0,
        "memoryBytes": document["partitions"][0]["memoryBytes"],
        "computeUnits": 16,
        "consumes": None,
    }
    assert (
        json.loads(unidra("inspect", "--simulate", "dgx-h100", "-o", "json").stdout)["partitions"]
        == []
    )


def one_line_error(run: subprocess.CompletedProcess[str], code: int, *says: str) -> None:
    """The operator's contract: exit code, one line naming the setting, no traceback."""
    assert run.returncode == code, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    for text in says:
        assert text in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("UNIDRA_METRICS_INTERVAL_SECONDS", "abc", "'abc' is not a number of seconds"),
        ("UNIDRA_HEALTH_QUIET_SECONDS", "nan", "'nan' is not a number of seconds"),
        ("UNIDRA_HEALTHCHECK_PORT", "x", "'x' is not a TCP port number, or -1 to disable"),
        ("UNIDRA_VERBOSITY", "loud", "'loud' is not a verbosity: 0 or info, 1 or debug"),
        ("UNIDRA_LOG_FORMAT", "xml", "'xml' is not a log format: text or json"),
        ("UNIDRA_PARTITIONS", "maybe", "'maybe' is not a boolean: true, false, 1, 0, yes or no"),
    ],
)
def test_a_bad_environment_value_names_the_variable(variable: str, value: str, says: str) -> None:
    run = unidra("kubelet-plugin", "--node-name=n", "--simulate=mixed", env={variable: value})
    one_line_error(run, 2, f"unidra: invalid setting: {variable}: {says}")


def test_a_bad_flag_value_is_one_line() -> None:
    run = unidra("kubelet-plugin", "--node-name=n", "--healthcheck-port=x")
    one_line_error(
        run, 2, "argument --healthcheck-port: 'x' is not a TCP port number, or -1 to disable"
    )


def test_verbosity_by_name_is_accepted() -> None:
    # The run stops at the next setting, which proves UNIDRA_VERBOSITY=debug passed.
    run = unidra(
        "kubelet-plugin", "--node-name=n", "--cdi-root=relative", env={"UNIDRA_VERBOSITY": "debug"}
    )
    one_line_error(run, 2, "--cdi-root: relative must be an absolute path")


@pytest.mark.parametrize("value", ["True", "TRUE", "1", "yes", "Yes"])
def test_partitions_from_the_environment_accepts_any_spelling_of_true(value: str) -> None:
    run = unidra(
        "inspect", "--slices", "--simulate=dgx-h100", "-o", "json", env={"UNIDRA_PARTITIONS": value}
    )
    assert run.returncode == 0, run.stderr
    assert any(i["spec"].get("sharedCounters") for i in json.loads(run.stdout)["items"])


@pytest.mark.parametrize("value", ["False", "0", "no", "NO"])
def test_partitions_from_the_environment_can_be_off(value: str) -> None:
    run = unidra(
        "inspect", "--slices", "--simulate=dgx-h100", "-o", "json", env={"UNIDRA_PARTITIONS": value}
    )
    assert run.returncode == 0, run.stderr
    assert not any(i["spec"].get("sharedCounters") for i in json.loads(run.stdout)["items"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["inspect", "--simulate=mixed", "--vendors=nvidia"],
            "--vendors: cannot be combined with --simulate",
        ),
        (
            ["inspect", "--slices", "-o", "table", "--simulate=mixed"],
            "--output: --slices prints ResourceSlices as yaml or json, not a table",
        ),
        (
            ["kubelet-plugin", "--node-name=n", "--simulate=mixed", "--kubeconfig=/nonexistent/kc"],
            "--kubeconfig: /nonexistent/kc is not a file",
        ),
    ],
)
def test_contradictions_and_missing_files_are_refused(args: list[str], says: str) -> None:
    one_line_error(unidra(*args, env={"KUBECONFIG": ""}), 2, says)


def test_a_backend_that_cannot_load_fails_inspect(tmp_path: Path) -> None:
    run = unidra("inspect", "--vendors=nosuchmodule:Backend", "--host-root", str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "nosuchmodule:Backend" in run.stdout
    run = unidra("inspect", "--vendors=nosuchmodule:Backend", "-o", "json")
    assert run.returncode == 1 and "backend nosuchmodule:Backend" in run.stderr


def test_a_closed_pipe_ends_quietly() -> None:
    """`unidra inspect -o json | head`: the reader is gone before the first write."""
    command = [sys.executable, "-m", "driver", "inspect", "--simulate=mixed", "-o", "json"]
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        error = process.stderr.read()
        assert process.wait(timeout=60) == 141
    assert error == ""


def test_cleanup_takes_no_flags_it_would_ignore() -> None:
    for flag in ("--node-name=n", "--kubeconfig=/k"):
        one_line_error(unidra("cleanup", flag), 2, "unrecognized arguments", "--help")


def test_a_line_break_inside_a_value_stays_on_the_errors_one_line() -> None:
    # Found by the property test below: `--kubeconfig=$'\r'` split the message in two.
    for value in ("\r", "a\nb", "x\u2028y"):
        one_line_error(unidra("fleet", f"--kubeconfig={value}"), 2, "--kubeconfig", "is not a file")


def _variables() -> list[str]:
    """Every environment variable the commands read, from their help."""
    from driver import cli

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    helps = " ".join(p.format_help() for p in subparsers.choices.values())  # type: ignore[attr-defined]
    return sorted(set(re.findall(r"\[env\s+([A-Z_]+)", helps)))


VARIABLES = _variables()


# What each command may be given; cleanup only with --dry-run (random directories!), demo not at
# all, fleet without the flags that serve or watch.
FLAGS = {
    "kubelet-plugin": [
        "--node-name",
        "--driver-name",
        "--kubeconfig",
        "--cdi-root",
        "--pod-uid",
        "--simulate",
        "--vendors",
        "--backend-option",
        "--metrics-address",
        "--healthcheck-port",
        "--metrics-interval-seconds",
        "--taint-effect",
        "--health-quiet-seconds",
        "--health-min-hold-seconds",
        "--log-format",
        "--host-root",
        "--simulate-dev-root",
        "--partitions",
        "--sharing",
    ],
    "inspect": [
        "--simulate",
        "--vendors",
        "--backend-option",
        "--node-name",
        "--driver-name",
        "--output",
        "--host-root",
        "--partitions",
    ],
    "doctor": [
        "--node-name",
        "--driver-name",
        "--kubeconfig",
        "--cdi-root",
        "--simulate",
        "--vendors",
        "--host-root",
        "--output",
        "--partitions",
    ],
    "simulate": [
        "--device",
        "--fault",
        "--driver-name",
        "--pod-uid",
        "--socket",
        "--kubelet-plugins-directory-path",
    ],
    "fleet": ["--kubeconfig", "--output", "--job-sizes"],
    "cleanup": [
        "--driver-name",
        "--cdi-root",
        "--kubelet-plugins-directory-path",
        "--kubelet-registrar-directory-path",
    ],
}
VALUES = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    st.sampled_from(
        [
            "",
            "-1",
            "0",
            "1e999",
            "nan",
            "mixed",
            "dgx-h100",
            "nvidia",
            ":X",
            "a..b:C",
            "json:loads",
            "x=y",
            "a.b=c",
            "/",
            "relative",
            "true",
            "65536",
            ":9464",
        ]
    ),
)


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(
    command=st.sampled_from(sorted(FLAGS)),
    data=st.data(),
)
def test_no_value_of_any_variable_or_flag_gives_a_traceback(
    command: str, data: st.DataObject
) -> None:
    from driver import cli, daemon

    env = data.draw(st.dictionaries(st.sampled_from(VARIABLES), VALUES, max_size=4))
    flags = data.draw(st.dictionaries(st.sampled_from(FLAGS[command]), VALUES, max_size=4))
    argv = [command, *(["inject"] if command == "simulate" else [])]
    argv += [f"{flag}={value}" for flag, value in flags.items()]
    argv += ["--dry-run"] if command == "cleanup" else []
    out, err = io.StringIO(), io.StringIO()
    clean = {
        k: v for k, v in os.environ.items() if k not in VARIABLES and k != "KUBERNETES_SERVICE_HOST"
    }
    with (
        mock.patch.dict(os.environ, {**clean, **env}, clear=True),
        mock.patch.object(daemon, "run", return_value=0),  # valid settings: do not serve
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = cli.main(argv)
        except SystemExit as exit:  # argparse's own errors
            code = exit.code  # type: ignore[assignment]
    assert code in (0, 1, 2), (argv, env, err.getvalue())
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert len(err.getvalue().strip().splitlines()) == 1, (argv, env, err.getvalue())


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
