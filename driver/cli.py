"""The `unidra` command: argv + environment -> Settings, then run a subcommand; errors are one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from driver import __version__, backends, inspect, inventory, logs, sharing
from driver.backends import BackendContext
from driver.errors import ConfigError, UnidraError
from driver.settings import DEFAULT_DRIVER_NAME, Settings

PLUGINS_DIR = "/var/lib/kubelet/plugins"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


def _env_name(flag: str) -> str:
    return "UNIDRA_" + flag.removeprefix("--").replace("-", "_").upper()


def _seconds(parser: argparse.ArgumentParser, flag: str, default: float, help: str) -> None:
    env = _env_name(flag)
    parser.add_argument(
        flag,
        type=float,
        default=float(_env(env) or default),
        help=f"{help} [env {env}, default {default}]",
    )


def _directory(parser: argparse.ArgumentParser, flag: str, default: str, help: str) -> None:
    env = _env_name(flag)
    parser.add_argument(
        flag,
        type=Path,
        default=Path(_env(env, default) or default),
        help=f"{help} [env {env}, default {default}]",
    )


def _repeatable(parser: argparse.ArgumentParser, flag: str, metavar: str, help: str) -> None:
    env = _env_name(flag) + "S"
    parser.add_argument(
        flag,
        metavar=metavar,
        action="append",
        default=[item for item in (_env(env) or "").split(",") if item],
        help=f"{help} (repeatable) [env {env}, comma-separated]",
    )


def _add_backend_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--simulate",
        metavar="PROFILE|FILE",
        default=_env("UNIDRA_SIMULATE"),
        help="serve simulated devices from a built-in profile (dgx-h100, mixed, ...) or a profile file "
        "[env UNIDRA_SIMULATE]",
    )
    parser.add_argument(
        "--simulate-dev-root",
        metavar="DIR",
        default=_env("UNIDRA_SIMULATE_DEV_ROOT"),
        help="fake /dev tree that simulated CDI device nodes point at [env UNIDRA_SIMULATE_DEV_ROOT]",
    )
    parser.add_argument(
        "--vendors",
        metavar="NAME[,NAME...]",
        default=_env("UNIDRA_VENDORS"),
        help="run these backends instead of picking them by the PCI devices present (nvidia, amd, intel-gpu, "
        "gaudi, furiosa, rebellions, tpu, or an out-of-tree module:Class) [env UNIDRA_VENDORS]",
    )
    _repeatable(
        parser,
        "--backend-option",
        "BACKEND.KEY=VALUE",
        "an option for one backend, e.g. nvidia.ignore-xids=119",
    )
    parser.add_argument(
        "--partitions",
        action="store_true",
        default=_env("UNIDRA_PARTITIONS", "") in ("1", "true", "yes"),
        help="also publish partitions (MIG, AMD compute partitions) sharing counters with their device; "
        "needs Kubernetes 1.35+ with DRAPartitionableDevices [env UNIDRA_PARTITIONS]",
    )
    parser.add_argument(
        "--sharing",
        action="store_true",
        default=_env("UNIDRA_SHARING", "") in ("1", "true", "yes"),
        help="publish devices that can be shared as shareable: claims get shares of memory and "
        "compute units (consumable capacity, Kubernetes 1.36+); narrow it with "
        "--backend-option BACKEND.sharing=off|all|MODEL[|MODEL...] (docs/sharing.md) "
        "[env UNIDRA_SHARING]",
    )
    _directory(
        parser,
        "--host-root",
        "/",
        "where the host's / is mounted; sysfs, devfs and vendor CLIs are looked up under it",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unidra", description="One Kubernetes DRA driver for every accelerator."
    )
    parser.add_argument("--version", action="version", version=f"unidra {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plugin = commands.add_parser("kubelet-plugin", help="run the node daemon that kubelet talks to")
    _add_node_flags(plugin)
    plugin.add_argument(
        "--pod-uid",
        default=_env("POD_UID"),
        help="this pod's UID, for per-instance sockets during rolling upgrades [env POD_UID]",
    )
    _add_backend_flags(plugin)
    plugin.add_argument(
        "--metrics-address",
        default=_env("UNIDRA_METRICS_ADDRESS", ":9464"),
        help="Prometheus endpoint HOST:PORT, empty to disable [env UNIDRA_METRICS_ADDRESS, default :9464]",
    )
    plugin.add_argument(
        "--healthcheck-port",
        type=int,
        default=int(_env("UNIDRA_HEALTHCHECK_PORT") or 51515),
        help="TCP port of the gRPC health service for the liveness probe, -1 to disable "
        "[env UNIDRA_HEALTHCHECK_PORT, default 51515]",
    )
    _seconds(
        plugin,
        "--metrics-interval-seconds",
        10,
        "how often device metrics are sampled, off the scrape path",
    )
    _repeatable(
        plugin,
        "--taint-effect",
        "KIND=EFFECT",
        "override the taint policy, e.g. xid=NoExecute or overheating=off (docs/health.md)",
    )
    _seconds(
        plugin,
        "--health-quiet-seconds",
        300,
        "transient faults clear after this long without new faults",
    )
    _seconds(
        plugin,
        "--health-min-hold-seconds",
        30,
        "no health condition clears sooner than this after it was raised (anti-flapping)",
    )
    _add_log_flags(plugin)

    simulate = commands.add_parser(
        "simulate",
        help="make a simulated device of the running daemon fail or recover, or list device health",
    )
    simulate.add_argument("action", choices=("inject", "recover", "health"))
    simulate.add_argument("--device", help="device name, as in the ResourceSlice (inject, recover)")
    simulate.add_argument(
        "--fault", help="xid-<number> (e.g. xid-79), ecc-dbe, lost or overheat (inject)"
    )
    simulate.add_argument(
        "--driver-name",
        default=_env("UNIDRA_DRIVER_NAME", DEFAULT_DRIVER_NAME),
        help="DRA driver name of the daemon",
    )
    _directory(
        simulate,
        "--kubelet-plugins-directory-path",
        PLUGINS_DIR,
        "kubelet's plugins directory, where the daemon's control socket is",
    )

    doctor = commands.add_parser(
        "doctor", help="check this node's prerequisites and say what is missing"
    )
    _add_node_flags(doctor)
    _add_backend_flags(doctor)
    doctor.add_argument("-o", "--output", choices=("text", "json"), default="text")

    cleanup = commands.add_parser(
        "cleanup",
        help="after uninstalling: remove this driver's CDI specs, checkpoint and sockets from the node",
    )
    _add_node_flags(cleanup)
    cleanup.add_argument(
        "--force", action="store_true", help="even while an instance still answers (not advised)"
    )

    show = commands.add_parser("inspect", help="show the accelerators Unidra finds on this machine")
    _add_backend_flags(show)
    show.add_argument(
        "--slices",
        action="store_true",
        help="print the ResourceSlices that would be published (default -o yaml)",
    )
    show.add_argument(
        "--node-name",
        default=_env("NODE_NAME"),
        help="node (pool) name [env NODE_NAME, default hostname]",
    )
    show.add_argument(
        "--driver-name",
        default=_env("UNIDRA_DRIVER_NAME", DEFAULT_DRIVER_NAME),
        help=f"DRA driver name [env UNIDRA_DRIVER_NAME, default {DEFAULT_DRIVER_NAME}]",
    )
    show.add_argument("-o", "--output", choices=("table", "json", "yaml"), default=None)

    return parser


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    """Where the daemon meets kubelet, the runtime and the API server."""
    parser.add_argument("--node-name", default=_env("NODE_NAME"), help="this node [env NODE_NAME]")
    parser.add_argument(
        "--driver-name",
        default=_env("UNIDRA_DRIVER_NAME", DEFAULT_DRIVER_NAME),
        help=f"DRA driver name [env UNIDRA_DRIVER_NAME, default {DEFAULT_DRIVER_NAME}]",
    )
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        default=_env("KUBECONFIG"),
        help="kubeconfig file; in-cluster config when absent [env KUBECONFIG]",
    )
    _directory(parser, "--cdi-root", "/var/run/cdi", "directory for transient CDI specs")
    _directory(
        parser,
        "--kubelet-registrar-directory-path",
        "/var/lib/kubelet/plugins_registry",
        "kubelet's plugin registration directory",
    )
    _directory(
        parser, "--kubelet-plugins-directory-path", PLUGINS_DIR, "kubelet's plugins directory"
    )


def _add_log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("UNIDRA_LOG_FORMAT", "text"),
        help="log line format [env UNIDRA_LOG_FORMAT, default text]",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=int(_env("UNIDRA_VERBOSITY", "0") or 0),
        help="debug logs",
    )


def _backend_selection(
    args: argparse.Namespace,
) -> tuple[tuple[str, ...], dict[str, dict[str, str]]]:
    """The backends asked for (empty: pick them by the PCI devices present) and their options."""
    options: dict[str, dict[str, str]] = {}
    for item in args.backend_option:
        backend, dot, rest = item.partition(".")
        key, equals, value = rest.partition("=")
        if not dot or not equals or not key:
            raise ConfigError("--backend-option", f"{item!r} is not BACKEND.KEY=VALUE")
        options.setdefault(backend, {})[key] = value
    if args.simulate:
        options.setdefault("simulated", {})["profile"] = args.simulate
        if args.simulate_dev_root:
            options["simulated"]["dev-root"] = args.simulate_dev_root
        return ("simulated",), options
    if args.vendors:
        return tuple(v.strip() for v in args.vendors.split(",") if v.strip()), options
    return (), options


def _pair(item: str, flag: str) -> tuple[str, str]:
    key, equals, value = item.partition("=")
    if not equals or not key or not value:
        raise ConfigError(flag, f"{item!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def _settings(args: argparse.Namespace) -> Settings:
    names, options = _backend_selection(args)
    return Settings(
        node_name=args.node_name or "",
        driver_name=args.driver_name,
        kubeconfig=args.kubeconfig,
        cdi_root=args.cdi_root,
        registrar_dir=args.kubelet_registrar_directory_path,
        plugins_dir=args.kubelet_plugins_directory_path,
        pod_uid=args.pod_uid,
        host_root=args.host_root,
        backends=names,
        backend_options=options,
        partitions=args.partitions,
        sharing=args.sharing,
        metrics_address=args.metrics_address,
        metrics_interval_seconds=args.metrics_interval_seconds,
        healthcheck_port=None if args.healthcheck_port < 0 else args.healthcheck_port,
        taint_effects=dict(_pair(item, "--taint-effect") for item in args.taint_effect),
        health_quiet_seconds=args.health_quiet_seconds,
        health_min_hold_seconds=args.health_min_hold_seconds,
    ).validate()


def _inspect(args: argparse.Namespace) -> int:
    from vendors.simulated import profiles

    names, options = _backend_selection(args)
    not_picked: dict[str, str] = {}
    if not names:
        picked, not_picked = backends.detect(args.host_root)
        names = tuple(picked)
    node = args.node_name or socket.gethostname()
    built, failures = backends.create_all(
        names,
        lambda name: BackendContext(
            host_root=args.host_root, node_name=node, options=options.get(name, {})
        ),
    )
    policy = sharing.parse_policy(args.sharing, options)
    found = inventory.discover(built, partitions=args.partitions, policy=policy)
    failures.update(found.failures)
    if args.slices:
        print(
            inspect.slices_document(
                found, driver=args.driver_name, node=node, output=args.output or "yaml"
            )
        )
        return 0
    if args.output in ("json", "yaml"):
        print(inspect.devices_document(found.devices, {**not_picked, **failures}, args.output))
        return 0
    if found.devices:
        print(inspect.table(found.devices))
    else:
        print("No accelerators found on this machine.")
    for name, reason in sorted({**not_picked, **failures}.items()):
        print(f"  {name}: {reason}")
    if not args.simulate and not found.devices:
        print("Try a simulated node: unidra inspect --simulate PROFILE, with PROFILE one of:")
        print("  " + ", ".join(profiles.builtin_names()))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from driver import control
    from driver.kubelet import sockets

    if args.action != "health" and not args.device:
        raise ConfigError("--device", "is required")
    if args.action == "inject" and not args.fault:
        raise ConfigError("--fault", "is required: xid-<number>, ecc-dbe, lost or overheat")
    answer = control.broadcast(
        sockets.control_sockets(args.kubelet_plugins_directory_path / args.driver_name),
        {"command": args.action, "device": args.device, "fault": args.fault},
    )
    if "error" in answer:
        print(f"unidra: {answer['error']}", file=sys.stderr)
        return 1
    if args.action == "health":
        for item in answer["devices"]:
            print(f"{item['device']}  {item['health']}  {item['message']}".rstrip())
    else:
        state = "healthy" if answer["healthy"] else "unhealthy"
        print(f"{answer['device']}: {answer['kind']} {answer['code']} ({state})".replace("  ", " "))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from driver import doctor, kubeapi

    names, options = _backend_selection(args)
    target = doctor.Target(
        host_root=args.host_root,
        registrar_dir=args.kubelet_registrar_directory_path,
        plugins_dir=args.kubelet_plugins_directory_path,
        cdi_root=args.cdi_root,
        driver_name=args.driver_name,
        node_name=args.node_name or socket.gethostname(),
        vendors=names,
        options=options,
    )
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    api = (
        (lambda: kubeapi.SliceApi(kubeapi.build_client(args.kubeconfig)))
        if args.kubeconfig or in_cluster
        else None
    )
    findings = doctor.run(target, api)
    if args.output == "json":
        print(json.dumps([dataclasses.asdict(f) for f in findings], indent=2))
    else:
        print(doctor.report(findings))
    return 1 if doctor.failed(findings) else 0


def _kubelet_plugin(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.setup(args.log_format, args.verbose)
    from driver import daemon

    return daemon.run(settings)


def _cleanup(args: argparse.Namespace) -> int:
    from driver import cleanup

    removed = cleanup.clean(
        driver=args.driver_name,
        cdi_root=args.cdi_root,
        plugins_dir=args.kubelet_plugins_directory_path,
        registrar_dir=args.kubelet_registrar_directory_path,
        force=args.force,
    )
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} file(s) of {args.driver_name} removed from this node")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "kubelet-plugin": _kubelet_plugin,
        "inspect": _inspect,
        "simulate": _simulate,
        "doctor": _doctor,
        "cleanup": _cleanup,
    }
    try:
        return commands[args.command](args)
    except ConfigError as err:
        print(f"unidra: invalid setting: {err}", file=sys.stderr)
        return 2
    except UnidraError as err:
        print(f"unidra: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
