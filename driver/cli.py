"""The `unidra` command: argv + environment -> Settings, then run a subcommand; errors are one line."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from driver import __version__, backends, inspect, inventory, logs
from driver.backends import BackendContext
from driver.errors import ConfigError, UnidraError
from driver.settings import DEFAULT_DRIVER_NAME, Settings


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


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
    parser.add_argument(
        "--backend-option",
        metavar="BACKEND.KEY=VALUE",
        action="append",
        default=[o for o in (_env("UNIDRA_BACKEND_OPTIONS") or "").split(",") if o],
        help="an option for one backend, e.g. nvidia.ignore-xids=119 (repeatable) "
        "[env UNIDRA_BACKEND_OPTIONS, comma-separated]",
    )
    parser.add_argument(
        "--partitions",
        action="store_true",
        default=_env("UNIDRA_PARTITIONS", "") in ("1", "true", "yes"),
        help="also publish partitions (MIG, AMD compute partitions) sharing counters with their device; "
        "needs Kubernetes 1.35+ with DRAPartitionableDevices [env UNIDRA_PARTITIONS]",
    )
    parser.add_argument(
        "--host-root",
        type=Path,
        default=Path(_env("UNIDRA_HOST_ROOT", "/") or "/"),
        help="where the host's / is mounted; sysfs, devfs and vendor CLIs are looked up under it "
        "[env UNIDRA_HOST_ROOT, default /]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unidra", description="One Kubernetes DRA driver for every accelerator."
    )
    parser.add_argument("--version", action="version", version=f"unidra {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plugin = commands.add_parser("kubelet-plugin", help="run the node daemon that kubelet talks to")
    plugin.add_argument("--node-name", default=_env("NODE_NAME"), help="this node [env NODE_NAME]")
    plugin.add_argument(
        "--driver-name",
        default=_env("UNIDRA_DRIVER_NAME", DEFAULT_DRIVER_NAME),
        help=f"DRA driver name [env UNIDRA_DRIVER_NAME, default {DEFAULT_DRIVER_NAME}]",
    )
    plugin.add_argument(
        "--kubeconfig",
        type=Path,
        default=_env("KUBECONFIG"),
        help="kubeconfig file; in-cluster config when absent [env KUBECONFIG]",
    )
    plugin.add_argument(
        "--cdi-root",
        type=Path,
        default=Path(_env("UNIDRA_CDI_ROOT", "/var/run/cdi") or ""),
        help="directory for transient CDI specs [env UNIDRA_CDI_ROOT, default /var/run/cdi]",
    )
    plugin.add_argument(
        "--kubelet-registrar-directory-path",
        type=Path,
        default=Path(
            _env("UNIDRA_KUBELET_REGISTRAR_DIRECTORY_PATH", "/var/lib/kubelet/plugins_registry")
            or ""
        ),
        help="kubelet's plugin registration directory [env UNIDRA_KUBELET_REGISTRAR_DIRECTORY_PATH]",
    )
    plugin.add_argument(
        "--kubelet-plugins-directory-path",
        type=Path,
        default=Path(
            _env("UNIDRA_KUBELET_PLUGINS_DIRECTORY_PATH", "/var/lib/kubelet/plugins") or ""
        ),
        help="kubelet's plugins directory [env UNIDRA_KUBELET_PLUGINS_DIRECTORY_PATH]",
    )
    plugin.add_argument(
        "--pod-uid",
        default=_env("POD_UID"),
        help="this pod's UID, for per-instance sockets during rolling upgrades [env POD_UID]",
    )
    _add_backend_flags(plugin)
    _add_log_flags(plugin)

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
    found = inventory.discover(built, partitions=args.partitions)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args)
        settings = _settings(args)
        logs.setup(args.log_format, args.verbose)
        from driver import daemon

        return daemon.run(settings)
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
