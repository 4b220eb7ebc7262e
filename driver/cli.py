"""The `unidra` command: argv + environment -> Settings, then run a subcommand; errors are one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from driver import __version__, backends, inspect, inventory, logs, sharing
from driver.backends import BackendContext
from driver.errors import ConfigError, UnidraError
from driver.fleet.view import DEFAULT_JOB_SIZES
from driver.settings import DEFAULT_DRIVER_NAME, Settings, check_driver_name, metrics_endpoint

PLUGINS_DIR = "/var/lib/kubelet/plugins"
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the flag, what was wrong, and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _FromEnv(str):
    """A default read from the environment: a bad value is reported under the variable's name."""

    env: str

    def __new__(cls, value: str, env: str) -> _FromEnv:
        item = super().__new__(cls, value)
        item.env = env
        return item


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return _FromEnv(value, name) if value else default


def _env_name(flag: str) -> str:
    return "UNIDRA_" + flag.removeprefix("--").replace("-", "_").upper()


def _typed(parse: Callable[[str], T], accepted: str) -> Callable[[str], T]:
    """An argparse type: `parse` raises ValueError on bad input; the error names what is accepted."""

    def convert(raw: str) -> T:
        try:
            return parse(raw)
        except (ValueError, KeyError):
            if isinstance(raw, _FromEnv):
                raise ConfigError(raw.env, f"{str(raw)!r} is not {accepted}") from None
            raise argparse.ArgumentTypeError(f"{raw!r} is not {accepted}") from None

    convert.__name__ = accepted  # argparse names the type in some messages
    return convert


def _number(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _integer(raw: str) -> int:
    return int(raw.strip())


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _boolean(raw: str) -> bool:
    return _BOOLEANS[raw.strip().lower()]


def _verbosity(raw: str) -> int:
    named = {"info": 0, "debug": 1}
    value = named[raw.strip().lower()] if raw.strip().lower() in named else int(raw.strip())
    if value < 0:
        raise ValueError(raw)
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(raw)
        return raw

    return parse


SECONDS = _typed(_number, "a number of seconds")
BOOLEAN = _typed(_boolean, "a boolean: true, false, 1, 0, yes or no")
VERBOSITY = _typed(_verbosity, "a verbosity: 0 or info, 1 or debug")


def _seconds(parser: argparse.ArgumentParser, flag: str, default: float, help: str) -> None:
    env = _env_name(flag)
    parser.add_argument(
        flag,
        type=SECONDS,
        default=_env(env) or default,
        help=f"{help} [env {env}, default {default}]",
    )


def _switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """An on/off flag: `--flag`, `--flag=false`, or its environment variable."""
    env = _env_name(flag)
    parser.add_argument(
        flag,
        nargs="?",
        const=True,
        type=BOOLEAN,
        default=_env(env) or False,
        metavar="BOOL",
        help=f"{help} [env {env}: true or false]",
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
    _switch(
        parser,
        "--partitions",
        "also publish partitions sharing counters with their device, for the backends that can "
        "prepare them (simulated, furiosa; see docs/backends.md); needs Kubernetes 1.35+ with "
        "DRAPartitionableDevices",
    )
    _switch(
        parser,
        "--sharing",
        "publish devices that can be shared as shareable: claims get shares of memory and "
        "compute units (consumable capacity, Kubernetes 1.36+); narrow it with "
        "--backend-option BACKEND.sharing=off|all|MODEL[|MODEL...] (docs/sharing.md)",
    )
    _directory(
        parser,
        "--host-root",
        "/",
        "where the host's / is mounted; sysfs, devfs and vendor CLIs are looked up under it",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unidra", description="One Kubernetes DRA driver for every accelerator.")
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
        type=_typed(_integer, "a TCP port number, or -1 to disable"),
        default=_env("UNIDRA_HEALTHCHECK_PORT") or 51515,
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
    _driver_name(simulate)
    _directory(
        simulate,
        "--kubelet-plugins-directory-path",
        PLUGINS_DIR,
        "kubelet's plugins directory, where the daemon's control socket is",
    )
    simulate.add_argument(
        "--pod-uid",
        default=_env("POD_UID"),
        help="the daemon of this pod, when several run on the node (rolling upgrade) [env POD_UID]",
    )
    simulate.add_argument(
        "--socket",
        type=Path,
        help="the daemon's control socket, instead of finding it in the plugins directory",
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
    _add_directory_flags(cleanup)
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cleanup.add_argument(
        "--force", action="store_true", help="even while an instance still answers (not advised)"
    )

    demo = commands.add_parser(
        "demo",
        help="the whole story on this machine, no cluster and no GPU: publish, allocate, prepare, "
        "fail, recover",
    )
    demo.add_argument(
        "--profile",
        default="dgx-h100",
        help="the simulated node (a built-in profile or a profile file) [default dgx-h100]",
    )
    demo.add_argument(
        "--kube-bin",
        type=Path,
        default=_env("UNIDRA_KUBE_BIN"),
        help="run on real Kubernetes binaries in DIR (kube-apiserver, kube-controller-manager, "
        "kube-scheduler, kubelet, kubectl, labetcd, fakecri; root needed), with the real "
        "scheduler allocating and the real kubelet preparing [env UNIDRA_KUBE_BIN; default: an "
        "embedded API server]",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the demo's private directory (sockets, checkpoint, CDI specs, log) afterwards",
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
    _driver_name(show)
    show.add_argument("-o", "--output", choices=("table", "json", "yaml"), default=None)

    _add_fleet_command(commands)
    return parser


def _add_fleet_command(commands: argparse._SubParsersAction[_Parser]) -> None:
    fleet = commands.add_parser(
        "fleet",
        help="report every node's accelerators: free, allocated, tainted, largest free group, "
        "fragmentation, who holds what (read-only)",
    )
    _kubeconfig(fleet)
    fleet.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    fleet.add_argument(
        "--watch",
        action="store_true",
        help="keep the report current from watches and print it again when it changes",
    )
    fleet.add_argument(
        "--serve-metrics",
        metavar="HOST:PORT",
        default="",
        help="keep the report current and serve it as Prometheus metrics (/metrics, /readyz)",
    )
    fleet.add_argument(
        "--job-sizes",
        metavar="N[,N...]",
        default=",".join(str(n) for n in DEFAULT_JOB_SIZES),
        help="job sizes the fragmentation figure is computed for [default "
        + ",".join(str(n) for n in DEFAULT_JOB_SIZES)
        + "]",
    )
    _add_log_flags(fleet)


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    """Where the daemon meets kubelet, the runtime and the API server."""
    parser.add_argument("--node-name", default=_env("NODE_NAME"), help="this node [env NODE_NAME]")
    _kubeconfig(parser)
    _add_directory_flags(parser)


def _kubeconfig(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        default=_env("KUBECONFIG"),
        help="kubeconfig file; in-cluster config when absent [env KUBECONFIG]",
    )


def _add_directory_flags(parser: argparse.ArgumentParser) -> None:
    """The driver's name and the node directories it owns files in."""
    _driver_name(parser)
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


def _driver_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--driver-name",
        type=_checked(check_driver_name),
        default=_env("UNIDRA_DRIVER_NAME", DEFAULT_DRIVER_NAME),
        help=f"DRA driver name [env UNIDRA_DRIVER_NAME, default {DEFAULT_DRIVER_NAME}]",
    )


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type from a check that raises ConfigError: the same message for flag and env."""

    def convert(raw: str) -> str:
        try:
            return check(raw)
        except ConfigError as err:
            if isinstance(raw, _FromEnv):
                raise ConfigError(raw.env, err.problem) from None
            raise argparse.ArgumentTypeError(err.problem) from None

    return convert


def _add_log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        type=_typed(_one_of("text", "json"), "a log format: text or json"),
        default=_env("UNIDRA_LOG_FORMAT", "text"),
        help="log line format [env UNIDRA_LOG_FORMAT, default text]",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="debug logs [env UNIDRA_VERBOSITY: 0 or info, 1 or debug]",
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
        if args.vendors:
            raise ConfigError(
                "--vendors",
                f"cannot be combined with --simulate ({args.simulate} serves only simulated devices); "
                "drop one of them",
            )
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

    if args.slices and args.output == "table":
        raise ConfigError("--output", "--slices prints ResourceSlices as yaml or json, not a table")
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
    warning = inventory.partitions_warning(built) if args.partitions else None
    if warning:
        print(f"unidra: {warning}", file=sys.stderr)
    partitions = list(found.partitions.values())
    # A backend that was asked for, or that the PCI bus called for, and did not run is a failure.
    status = 1 if failures else 0
    if args.slices:
        print(
            inspect.slices_document(
                found, driver=args.driver_name, node=node, output=args.output or "yaml"
            )
        )
        _warn(failures)
        return status
    if args.output in ("json", "yaml"):
        print(
            inspect.devices_document(
                found.devices, {**not_picked, **failures}, args.output, partitions
            )
        )
        _warn(failures)
        return status
    if found.devices:
        print(inspect.table(found.devices, partitions))
    else:
        print("No accelerators found on this machine.")
    for name, reason in sorted({**not_picked, **failures}.items()):
        print(f"  {name}: {reason}")
    if not args.simulate and not found.devices:
        print("Try a simulated node: unidra inspect --simulate PROFILE, with PROFILE one of:")
        print("  " + ", ".join(profiles.builtin_names()))
    return status


def _warn(failures: dict[str, str]) -> None:
    for name, reason in sorted(failures.items()):
        print(f"unidra: backend {name}: {reason}", file=sys.stderr)


def _simulate(args: argparse.Namespace) -> int:
    from driver import control
    from driver.kubelet import sockets

    if args.action != "health" and not args.device:
        raise ConfigError("--device", "is required")
    if args.action == "inject" and not args.fault:
        raise ConfigError("--fault", "is required: xid-<number>, ecc-dbe, lost or overheat")
    plugin_dir = args.kubelet_plugins_directory_path / args.driver_name
    if args.socket:
        target = args.socket
    elif args.pod_uid:
        target = sockets.control_socket(plugin_dir, args.pod_uid)
    else:
        target = control.choose(sockets.control_sockets(plugin_dir), plugin_dir)
    print(f"daemon: {target}", file=sys.stderr)
    answer = control.request(
        target, {"command": args.action, "device": args.device, "fault": args.fault}
    )
    if "error" in answer:
        print(f"unidra: {answer['error']}", file=sys.stderr)
        return 1
    if args.action == "health":
        for item in answer["devices"]:
            print(f"{item['device']}  {item['health']}  {item['message']}".rstrip())
        return 0
    print(control.describe(answer))
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
        partitions=args.partitions,
    )
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    api = (
        (lambda: kubeapi.Preflight(kubeapi.build_client(args.kubeconfig)))
        if args.kubeconfig or in_cluster
        else None
    )
    findings = doctor.run(target, api)
    if args.output == "json":
        print(json.dumps([dataclasses.asdict(f) for f in findings], indent=2))
    else:
        print(doctor.report(findings))
    return 1 if doctor.failed(findings) else 0


def _verbosity_of(args: argparse.Namespace) -> int:
    """-v counts; without it, UNIDRA_VERBOSITY."""
    verbosity: int = args.verbose or VERBOSITY(_env("UNIDRA_VERBOSITY") or "0")
    return verbosity


def _kubelet_plugin(args: argparse.Namespace) -> int:
    from driver import kubeapi

    settings = _settings(args)
    kubeapi.require_kubeconfig(settings.kubeconfig)
    logs.setup(args.log_format, _verbosity_of(args))
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
        dry_run=args.dry_run,
    )
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    print(f"{len(removed)} file(s) of {args.driver_name} {verb} from this node")
    return 0


def _fleet(args: argparse.Namespace) -> int:
    from driver.fleet import service as fleet_service

    sizes = []
    for item in args.job_sizes.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise ConfigError(
                "--job-sizes", f"{args.job_sizes!r} is not a list of positive integers"
            )
        sizes.append(int(item))
    if args.serve_metrics and metrics_endpoint(args.serve_metrics) is None:
        raise ConfigError("--serve-metrics", f"{args.serve_metrics!r} is not HOST:PORT or :PORT")
    if args.watch or args.serve_metrics:
        logs.setup(args.log_format, _verbosity_of(args))
    options = fleet_service.FleetOptions(
        kubeconfig=args.kubeconfig,
        output=args.output,
        watch=args.watch,
        metrics_address=args.serve_metrics,
        job_sizes=tuple(sorted(set(sizes))),
    )
    return fleet_service.run(options, sys.stdout)


def _demo(args: argparse.Namespace) -> int:
    from driver.demo import story

    if args.kube_bin is not None:
        from driver.localcluster import BINARIES, missing_binaries

        missing = missing_binaries(args.kube_bin)
        if missing:
            raise ConfigError(
                "--kube-bin",
                f"{args.kube_bin} lacks {', '.join(missing)}; it needs {', '.join(BINARIES)}",
            )
    return story.run(profile=args.profile, keep=args.keep, kube_bin=args.kube_bin)


def _one_line(message: str) -> str:
    """The message on one line: a line break inside a value it quotes (`--kubeconfig=$'\\r'`) escaped."""
    return "".join(
        c.encode("unicode_escape").decode() if len(f"a{c}b".splitlines()) > 1 else c
        for c in message
    )


def main(argv: Sequence[str] | None = None) -> int:
    commands = {
        "kubelet-plugin": _kubelet_plugin,
        "inspect": _inspect,
        "simulate": _simulate,
        "doctor": _doctor,
        "cleanup": _cleanup,
        "fleet": _fleet,
        "demo": _demo,
    }
    try:
        args = build_parser().parse_args(argv)
        code = commands[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except ConfigError as err:
        print(f"unidra: invalid setting: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except UnidraError as err:
        print(f"unidra: {_one_line(str(err))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `unidra inspect -o json | head`: the reader left; say nothing, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
