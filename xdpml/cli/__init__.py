"""xdpml command line: agent, collector, cleanup, demo."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import textwrap

from xdpml import __version__
from xdpml.errors import DataLoss, EnvironmentNotReady, XdpmlError

log = logging.getLogger("xdpml")

# Modules only one side's install has (pyproject.toml's extras; bcc is Debian's
# python3-bpfcc): running the other side's command in an install without them, e.g.
# `xdpml collector` in the agent image, is a one-line error rather than a traceback.
# tests/image/test_extras.py keeps this table equal to the extras.
EXTRA_OF_MODULE = {
    "bcc": "agent",
    "pyroute2": "agent",
    "kubernetes": "agent",
    "jsonschema": "agent",
    "celpy": "agent",
    "grpc_health": "collector",
    "grpc_reflection": "collector",
    "sklearn": "collector",
    "joblib": "collector",
    "pyarrow": "collector",
    "onnxruntime": "collector",
    "onnx": "collector",
}

AGENT_EXAMPLES = """\
examples:
  xdpml agent -i eth0 -o features.jsonl           flows from eth0 to a file
  xdpml agent -i eth0 -w 100 -o features.jsonl     + seed-000 windows of 100 packets
  xdpml agent -i 'eth*' -i physical --sample 100   flows + 1-in-100 packet samples, stdout
  xdpml agent -i eth0 --unix-socket ids.sock       stream JSON lines to /run/xdpml/ids.sock
  xdpml agent -i eth0 --collector collector:50051  stream protobuf batches over gRPC
  xdpml cleanup                                     remove programs a killed agent left
"""


def _non_negative(convert, what: str):
    """argparse type: a number >= 0, with a message naming what was expected."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
        return v

    return parse


_positive_float = _non_negative(float, "a number")
_nonneg_int = _non_negative(int, "a whole number")


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interfaces and hooks")
    g.add_argument(
        "-i",
        "--interface",
        action="append",
        default=[],
        metavar="IFACE",
        help="interface name or glob; 'physical' or 'pod-veths' for all of a kind (repeatable)",
    )
    g.add_argument(
        "--hooks",
        choices=("auto", "xdp", "tc", "xdp+tc"),
        default="auto",
        help="auto: XDP ingress + TC egress on physical NICs, TC both ways on veth and "
        "virtual interfaces (default: %(default)s)",
    )
    g.add_argument(
        "--xdp-mode",
        choices=("auto", "native", "generic"),
        default="auto",
        help="XDP attach mode; auto = native on physical NICs (default: %(default)s)",
    )
    f = p.add_argument_group("features")
    f.add_argument(
        "-w",
        "--window",
        type=_nonneg_int,
        default=0,
        metavar="N",
        help="window features over every N packets (seed 000); 0 = off",
    )
    f.add_argument(
        "--window-seconds",
        type=_positive_float,
        default=0.0,
        metavar="T",
        help="window features over T-second windows; 0 = off",
    )
    f.add_argument(
        "--sample",
        type=_nonneg_int,
        default=0,
        metavar="N",
        help="per-packet features for 1 in N packets; 0 = off (default)",
    )
    f.add_argument(
        "--first-n",
        type=_nonneg_int,
        default=10,
        metavar="N",
        help="packets per flow kept for sequence features, 0..32 (default: %(default)s)",
    )
    f.add_argument("--no-flows", action="store_true", help="do not export flow records")
    f.add_argument(
        "--record-per",
        choices=("conversation", "interface"),
        default="conversation",
        help="conversation: one flow record per conversation seen on several interfaces (pod "
        "veth, overlay device, NIC), listing them in seen_on, with one preferred interface's "
        "counts; interface: one record per interface (default: %(default)s)",
    )
    t = p.add_argument_group("flow table and timeouts")
    t.add_argument(
        "--flow-table-size",
        type=_nonneg_int,
        default=65536,
        metavar="N",
        help="kernel flow table entries (default: %(default)s)",
    )
    t.add_argument(
        "--no-flow-lock",
        action="store_true",
        help="compile out the per-flow spin lock: ~1/3 less kernel time per packet, but two "
        "CPUs updating one flow at once may lose an update (docs/benchmarks.md)",
    )
    t.add_argument(
        "--no-tunnel",
        action="append",
        default=[],
        choices=("vxlan", "geneve", "ipip", "gre", "gtpu", "wireguard", "esp"),
        metavar="KIND",
        help="do not decapsulate (label) this tunnel kind: vxlan, geneve, ipip, gre, gtpu, wireguard, "
        "esp; repeatable (default: all on, docs/features.md)",
    )
    t.add_argument(
        "--tunnel-max-depth",
        type=_nonneg_int,
        default=1,
        metavar="N",
        help="tunnels decapsulated per packet, 1..4 (default: %(default)s)",
    )
    t.add_argument(
        "--vxlan-port",
        action="append",
        type=_nonneg_int,
        default=[],
        metavar="PORT",
        help="UDP port read as VXLAN; repeatable, up to 4 (default: 4789 and 8472)",
    )
    t.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=120.0,
        metavar="S",
        help="export a flow idle this long, seconds (default: %(default)s)",
    )
    t.add_argument(
        "--active-timeout",
        type=_positive_float,
        default=1800.0,
        metavar="S",
        help="export and restart a flow this old, seconds (default: %(default)s)",
    )
    t.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="flow table scan period, seconds (default: %(default)s)",
    )
    t.add_argument(
        "--early-packets",
        type=int,
        default=10,
        metavar="K",
        help="send the collector a snapshot of each flow (expiration id 3) once it has K packets, "
        "so verdicts act within a second; the flow is exported again at its timeouts; 0 = off "
        "(default: %(default)s)",
    )
    t.add_argument(
        "--early-ms",
        type=float,
        default=500.0,
        metavar="T",
        help="... or once it is T milliseconds old; 0 = off (default: %(default)s)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="JSON lines file ('-' = stdout; the default when no other output is given); "
        "created 0600, refused in a directory others can write to",
    )
    o.add_argument(
        "--unix-socket",
        metavar="PATH",
        help="stream JSON lines to this Unix socket; a bare name is in /run/xdpml (0700). "
        "Refused in a directory others can write to; the listener must be root, the "
        "agent's user or the directory's owner",
    )
    o.add_argument(
        "--collector",
        metavar="HOST:PORT",
        help="stream flow records as protobuf batches to an xdpml collector (windows and "
        "packet samples go to the local outputs only); exit code 8 if none was delivered",
    )
    o.add_argument("--tls-ca", metavar="PEM", help="CA that signed the collector's certificate (enables TLS)")
    o.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    o.add_argument("--tls-key", metavar="PEM", help="client key for mutual TLS")
    o.add_argument("--tls-server-name", metavar="NAME", help="name expected in the collector's certificate")
    o.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="node identity sent with every batch (default: $NODE_NAME or the hostname)",
    )
    k = p.add_argument_group("Kubernetes and operations")
    k.add_argument(
        "--kubernetes",
        action="store_true",
        help="configure from AgentConfig resources and enrich flows with pod metadata "
        "(interfaces then come from the AgentConfig; -i is not needed)",
    )
    k.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, then ~/.kube/config)")
    k.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "xdpml"),
        help="namespace of the AgentConfig resources (default: $POD_NAMESPACE or xdpml)",
    )
    k.add_argument(
        "--config-name",
        default="",
        metavar="NAME",
        help="follow only the AgentConfig of this name (default: the oldest that selects the node)",
    )
    k.add_argument(
        "--health-port",
        type=_nonneg_int,
        default=None,
        metavar="PORT",
        help="serve /livez and /readyz on this port (0..65535)",
    )
    k.add_argument(
        "--metrics-port",
        type=_nonneg_int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port (0..65535)",
    )
    k.add_argument(
        "--bind-address",
        default=None,
        metavar="ADDR",
        help="address the health and metrics ports listen on (default: 127.0.0.1; "
        "0.0.0.0 with --kubernetes, where the kubelet and scrapers reach the pod)",
    )
    k.add_argument(
        "--otlp-endpoint",
        default="",
        metavar="URL",
        help="push OpenTelemetry metrics over OTLP gRPC (host:port, http:// or https://)",
    )
    from xdpml.agent.enforce.cli_commands import add_enforce_arguments

    add_enforce_arguments(p)
    m = p.add_argument_group("model in the kernel (docs/models.md)")
    m.add_argument(
        "--model-slots",
        action="store_true",
        help="compile the two model slots in, pinned under PIN_DIR/model for `xdpml model load` (empty at start)",
    )
    m.add_argument(
        "--model",
        default="",
        metavar="FILE",
        help="scikit-learn model (.joblib/.pkl, an .onnx tree ensemble, or an .xdpml compiled bundle) the kernel "
        "classifies packets with "
        "from the start; reloaded live when the file changes (implies --model-slots)",
    )
    m.add_argument(
        "--model-features",
        default="",
        metavar="A,B,...",
        help="the model's input columns in order (default: the names it was fitted on)",
    )
    m.add_argument(
        "--model-action",
        action="append",
        default=[],
        metavar="CLASS=ACTION",
        help="what packets of a --model class do: pass (default), alert, drop, rate-limit:PPS[:BURST] (drop "
        "and rate-limit through the enforcement mode, allowlist and kill switch, docs/models.md); repeatable",
    )
    m.add_argument(
        "--model-decisions",
        default="",
        metavar="FILE",
        help="append sampled decisions of the kernel's model (flow key, class, action, dropped, the model's "
        "inputs) to FILE as JSON lines, for auditing and retraining",
    )
    m.add_argument(
        "--model-sample",
        type=int,
        default=100,
        metavar="N",
        help="--model-decisions / --model-decisions-to-collector: 1 in N classified packets (default: %(default)s)",
    )
    m.add_argument(
        "--model-decisions-to-collector",
        action="store_true",
        help='send the sampled decisions of the kernel\'s model to the collector too, as record kind "decision" '
        "(not scored; the collector stores them for audit and retraining, docs/models.md)",
    )
    m.add_argument(
        "--model-trusted-key",
        action="append",
        default=[],
        metavar="FILE",
        help="Ed25519 public key (PEM, `xdpml model keygen` writes NAME.pub) whose signed models the collector "
        "may push (collector --push-model; newer versions only, loaded with --model-action); repeatable; "
        "none: pushed models are refused (implies --model-slots; docs/models.md)",
    )
    m.add_argument(
        "--model-flow-k",
        type=int,
        default=4,
        metavar="K",
        help="a model on flow features classifies a flow at its K-th packet (compiled in; default: %(default)s)",
    )
    o.add_argument(
        "--duration",
        type=_positive_float,
        default=0.0,
        metavar="S",
        help="stop after S seconds (default: run until SIGINT/SIGTERM)",
    )
    o.add_argument(
        "--summary-interval",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="seconds between summary lines on stderr; 0 = off (default: %(default)s)",
    )


def settings_from_args(a):
    from xdpml.agent.enforce.cli_commands import enforce_settings_from_args
    from xdpml.config import (
        AgentSettings,
        DatapathSettings,
        HarvestSettings,
        InterfaceSettings,
        ModelSettings,
        TunnelSettings,
        WindowSettings,
    )

    tunnels = TunnelSettings(max_depth=a.tunnel_max_depth, **{kind: False for kind in a.no_tunnel})
    if a.vxlan_port:
        tunnels.vxlan_ports = list(a.vxlan_port)

    return AgentSettings(
        interfaces=InterfaceSettings(names=a.interface, hooks=a.hooks, xdp_mode=a.xdp_mode),
        datapath=DatapathSettings(
            flow_table_size=a.flow_table_size, first_n=a.first_n, sample_rate=a.sample, flow_lock=not a.no_flow_lock
        ),
        tunnels=tunnels,
        harvest=HarvestSettings(
            idle_timeout_s=a.idle_timeout,
            active_timeout_s=a.active_timeout,
            interval_s=a.interval,
            record_per=a.record_per,
            early_packets=a.early_packets,
            early_ms=a.early_ms,
        ),
        window=WindowSettings(packets=a.window, seconds=a.window_seconds),
        enforce=enforce_settings_from_args(a),
        model=ModelSettings(
            slots=a.model_slots,
            file=os.path.abspath(a.model) if a.model else "",
            features=[f.strip() for f in a.model_features.split(",") if f.strip()],
            actions=_model_actions(a.model_action),
            decisions_file=os.path.abspath(a.model_decisions) if a.model_decisions else "",
            sample_every=a.model_sample,
            decisions_to_collector=a.model_decisions_to_collector,
            flow_k=a.model_flow_k,
            trusted_keys=[os.path.abspath(k) for k in a.model_trusted_key],
        ),
        summary_interval_s=a.summary_interval,
    ).validate()


def _model_actions(items) -> dict[str, str]:
    from xdpml.models.cli_commands import parse_actions

    return parse_actions(items)


def _bind_address(a) -> str:
    if a.bind_address is not None:
        return a.bind_address
    return "0.0.0.0" if getattr(a, "kubernetes", False) else "127.0.0.1"


def _telemetry(a, service: str):
    from xdpml.obs.telemetry import Telemetry, TelemetrySettings

    attrs = {"k8s.node.name": a.node_name} if getattr(a, "node_name", "") else {}
    return Telemetry.from_settings(
        TelemetrySettings(
            service_name=service,
            prometheus_port=a.metrics_port,
            prometheus_host=_bind_address(a),
            otlp_endpoint=a.otlp_endpoint,
            resource_attributes=attrs,
        )
    )


def check_agent_args(a) -> None:
    """What argparse cannot check alone: refused here, before anything starts, as the
    AgentConfig would refuse it (ConfigError, one line)."""
    from xdpml.errors import ConfigError

    for flag, port in (("--metrics-port", a.metrics_port), ("--health-port", a.health_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{flag} must be 0..65535, not {port}")
    if a.bind_address is not None:
        import ipaddress

        try:
            ipaddress.ip_address(a.bind_address)
        except ValueError:
            raise ConfigError(f"--bind-address {a.bind_address!r} is not an IP address") from None
    if a.model and not os.path.isfile(a.model):
        raise ConfigError(f"--model {a.model}: no such file")
    if a.model_features and not a.model:
        raise ConfigError("--model-features names the columns of a --model FILE; give one")
    if a.collector:
        from xdpml.agent.export.grpc_client import check_target

        check_target(a.collector)
        local = a.output or a.unix_socket
        extra = [
            flag
            for flag, on in (("-w/--window", a.window), ("--window-seconds", a.window_seconds), ("--sample", a.sample))
            if on
        ]
        if extra and not local and not a.kubernetes:
            raise ConfigError(
                f"the collector scores flow records only: {' and '.join(extra)} records need "
                "a local output too (-o FILE or --unix-socket PATH)"
            )


def run_agent(a) -> int:
    from xdpml.agent.export.sinks import JsonLinesSink, UnixSocketSink
    from xdpml.agent.pipeline import Agent, install_signal_handlers, register_observables
    from xdpml.config import ConfigError
    from xdpml.datapath.loader import AttachError, resolve_interfaces

    check_agent_args(a)
    if a.kubernetes:
        return run_kubernetes_agent(a)
    if not a.interface:
        print("xdpml agent: give at least one interface with -i (see `ip link show`), or --kubernetes", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(a)
        names = resolve_interfaces(a.interface)
    except (ConfigError, AttachError) as exc:
        print(f"xdpml agent: {exc}", file=sys.stderr)
        return 2
    if not names:
        print(f"xdpml agent: no interface matches {', '.join(a.interface)}", file=sys.stderr)
        return 2
    sinks = []
    if a.output or not (a.unix_socket or a.collector):
        sinks.append(JsonLinesSink(a.output or "-"))
    if a.unix_socket:
        sinks.append(UnixSocketSink(a.unix_socket))
    telemetry = _telemetry(a, "xdpml-agent")
    holder: dict = {}
    from xdpml.agent.enforce.cli_commands import AgentEnforcement

    enf = AgentEnforcement(a, settings.enforce, telemetry)  # verdicts -> rules (docs/enforcement.md)
    if a.collector:
        try:
            sinks.append(enf.wrap(_grpc_sink(a, telemetry, lambda: holder.get("agent"), enf.on_verdicts)))
        except (ValueError, OSError) as exc:
            print(f"xdpml agent: collector settings: {exc}", file=sys.stderr)
            return 2
    health = _health(a, ("programs_attached",))

    def attached(dp) -> None:
        enf.on_attached(dp)
        if health:
            health.set("programs_attached")

    agent = Agent(
        settings, interfaces=names, sinks=sinks, flows=not a.no_flows, telemetry=telemetry, on_attached=attached
    )
    holder["agent"] = agent
    register_observables(telemetry, lambda: agent)
    install_signal_handlers(agent.stop_event)
    try:
        totals = agent.run(duration_s=a.duration or None)
    except (AttachError, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    except PermissionError as exc:
        log.error("permission denied (%s): the agent needs root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON", exc)
        return 1
    finally:
        enf.close()
        telemetry.shutdown()
        if health:
            health.close()
    check_delivered(totals.deliveries)
    return 0


def check_delivered(deliveries: dict[str, tuple[int, int]]) -> None:
    """DataLoss (exit 8) when an output was given rows and delivered none of them."""
    lost = [f"{name}: 0 of {given} rows delivered" for name, (given, done) in deliveries.items() if given and not done]
    if lost:
        raise DataLoss("every row sent to an output was dropped (" + "; ".join(lost) + "); see the warnings above")


def _health(a, conditions):
    if a.health_port is None:
        return None
    from xdpml.obs.health import HealthServer

    return HealthServer(host=_bind_address(a), port=a.health_port, conditions=conditions)


def run_kubernetes_agent(a) -> int:
    from xdpml.agent.export.sinks import JsonLinesSink, UnixSocketSink
    from xdpml.agent.kubernetes import KubeAgentOptions, KubernetesAgent
    from xdpml.agent.pipeline import install_signal_handlers
    from xdpml.kube.client import KubeUnavailable, api_client
    from xdpml.wire.tls import ClientTls

    try:
        api = api_client(kubeconfig=a.kubeconfig)
    except KubeUnavailable as exc:
        print(f"xdpml agent: {exc}", file=sys.stderr)
        return 2
    extra = []
    if a.output:
        extra.append(JsonLinesSink(a.output))
    if a.unix_socket:
        extra.append(UnixSocketSink(a.unix_socket))
    tls = None
    if a.tls_ca or a.tls_cert or a.tls_key:
        tls = ClientTls(ca_file=a.tls_ca, cert_file=a.tls_cert, key_file=a.tls_key, server_name=a.tls_server_name)
    opts = KubeAgentOptions(
        namespace=a.namespace,
        node_name=a.node_name,
        config_name=a.config_name,
        collector=a.collector or "",
        collector_tls=tls,
        extra_sinks=extra,
        pin_dir=a.pin_dir,
    )
    telemetry = _telemetry(a, "xdpml-agent")
    health = _health(a, ("programs_attached", "pod_cache_synced"))
    sup = KubernetesAgent(api, opts, health=health, telemetry=telemetry)
    install_signal_handlers(sup.stop_event)
    try:
        return sup.run()
    finally:
        telemetry.shutdown()
        if health:
            health.close()


def _grpc_sink(a, telemetry, current_agent, on_verdicts=None):
    from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
    from xdpml.agent.export.sinks import CollectorSink
    from xdpml.agent.export.verdicts import verdict_counter
    from xdpml.wire.tls import ClientTls

    tls = None
    if a.tls_ca or a.tls_cert or a.tls_key:
        tls = ClientTls(ca_file=a.tls_ca, cert_file=a.tls_cert, key_file=a.tls_key, server_name=a.tls_server_name)

    from xdpml.agent.pipeline import loss_counters

    count = verdict_counter(telemetry)

    def verdicts(vb) -> None:
        count(vb)
        if on_verdicts is not None:
            on_verdicts(vb)

    def model(update) -> None:
        agent = current_agent()
        if agent is not None:
            agent.on_model(update)

    exporter = GrpcExporter(
        ExporterSettings(target=a.collector, tls=tls, node_name=a.node_name),
        on_verdicts=verdicts,
        loss_counters=loss_counters(current_agent),
        on_model=model,
    )
    return CollectorSink(exporter)


def run_check_config(a) -> int:
    from xdpml.config import ConfigError
    from xdpml.kube.agentconfig import check_file

    bad = 0
    for path in a.files:
        try:
            results = check_file(path)
        except ConfigError as exc:
            print(f"{path}: {exc}")
            bad += 1
            continue
        for name, res in results:
            if isinstance(res, ConfigError):
                bad += 1
                print(f"{path}: {name}: INVALID: {res}")
            else:
                rules = "; ".join(f"{'/'.join(r.names)} ({r.hooks})" for r in res.interface_rules)
                print(f"{path}: {name}: ok (interfaces {rules})")
    return 1 if bad else 0


def run_cleanup(a) -> int:
    from xdpml.datapath.loader import cleanup

    result = cleanup(interfaces=a.interface or None, force=a.force)
    for line in result.removed:
        print(f"removed {line}")
    if result.left:
        print(f"xdpml cleanup: {result.left_message()}", file=sys.stderr)
        return 1
    if not result.removed:
        print("nothing of xdpml's was attached" + (f" to {', '.join(a.interface)}" if a.interface else ""))
    return 0


def _add_global_options(p: argparse.ArgumentParser, default) -> None:
    """--log-format and -v, accepted before or after the subcommand. On subcommands their
    default is SUPPRESS, so a value given before the subcommand is not reset by it."""
    g = p.add_argument_group("global options")
    g.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text" if default is None else default,
        help="log line format (default: text)",
    )
    g.add_argument(
        "-v", "--verbose", action="store_true", default=False if default is None else default, help="debug logging"
    )


def _with_global_options(add_parser):
    def add(*args, **kw):
        sp = add_parser(*args, **kw)
        _add_global_options(sp, argparse.SUPPRESS)
        return sp

    return add


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xdpml",
        description="Network flow, window and packet features for machine learning, from XDP/TC "
        "programs, streamed to files, sockets or an inference collector.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=AGENT_EXAMPLES,
    )
    p.add_argument("--version", action="version", version=f"xdpml {__version__}")
    _add_global_options(p, None)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser = _with_global_options(sub.add_parser)  # type: ignore[method-assign]
    ag = sub.add_parser(
        "agent",
        help="attach to interfaces and export features",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attach the datapath to interfaces and export features.",
        epilog=AGENT_EXAMPLES,
    )
    add_agent_arguments(ag)
    ag.set_defaults(func=run_agent)
    cc = sub.add_parser("check-config", help="validate AgentConfig YAML files as the agents would")
    cc.add_argument("files", nargs="+", metavar="FILE")
    cc.set_defaults(func=run_check_config)
    cl = sub.add_parser(
        "cleanup",
        help="remove xdpml programs a killed agent left attached",
        description="Remove the xdpml XDP programs and TC filters whose agent is gone "
        "(kill -9, OOM). What a running agent holds is left alone, and the "
        "exit code is 1 if anything was left.",
    )
    cl.add_argument(
        "-i",
        "--interface",
        action="append",
        default=[],
        metavar="IFACE",
        help="only this interface (repeatable; default: every interface)",
    )
    cl.add_argument("--force", action="store_true", help="remove them even while an xdpml agent process holds them")
    cl.set_defaults(func=run_cleanup)
    from xdpml.agent.enforce.cli_commands import add_rules_commands

    add_rules_commands(sub)
    try:
        from xdpml.cli import collector as collector_cli
    except ImportError:
        collector_cli = None
    if collector_cli is not None and hasattr(collector_cli, "add_arguments"):
        co = sub.add_parser(
            "collector",
            help="receive feature batches, score them, send verdicts",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        collector_cli.add_arguments(co)
        co.set_defaults(func=collector_cli.run)
    dm = sub.add_parser(
        "demo",
        help="the whole loop on this machine with test hosts in namespaces",
        description=textwrap.dedent("""\
                            Builds test hosts in network namespaces, runs the agent on their
                            interfaces and the collector with the embedded model, sends normal
                            traffic, then a port scan and a SYN flood; then verdicts become a
                            kernel rule, dry-run first, then enforce (the flood dropped, the
                            allowlist untouched), until it expires; then a tree trained on the
                            agent's packet records is loaded into the running agent and drops
                            the flood in the kernel; prints the flows the model flags. Needs
                            root. Ends by itself and removes what it made."""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dm.add_argument("--seconds", type=_positive_float, default=20.0, help="baseline traffic duration")
    dm.set_defaults(func=run_demo)
    from xdpml.cli import score as score_cli

    sc = sub.add_parser(
        "score",
        help="score exported flows (JSON lines or Parquet) with a model; show or --apply the rules they make",
        description=score_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score_cli.add_arguments(sc)
    sc.set_defaults(func=score_cli.run)
    from xdpml.models.cli_commands import add_model_commands

    add_model_commands(sub)
    return p


def run_demo(a) -> int:
    from xdpml.cli import demo

    return demo.main(a)


def log_stream(a):
    """Logs go to stdout (what `kubectl logs` is for) unless stdout carries data: the
    agent's JSON lines (`-o -`, or no output option outside Kubernetes) or the
    collector's (`--jsonl -`, `--print-flagged`). Then they go to stderr."""
    cmd = getattr(a, "command", "")
    if cmd == "agent":
        data = a.output == "-" or (not a.kubernetes and not (a.output or a.unix_socket or a.collector))
    elif cmd == "collector":
        data = getattr(a, "jsonl", None) == "-" or getattr(a, "print_flagged", False)
    else:
        data = True  # demo, cleanup, check-config print their results on stdout
    return sys.stderr if data else sys.stdout


def setup_logging(fmt: str, verbose: bool, stream=None) -> None:
    from xdpml.obs.logs import setup_logging as configure

    configure(fmt, "debug" if verbose else "info", stream=stream or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    setup_logging(a.log_format, a.verbose, log_stream(a))
    if a.command in ("agent", "collector", "demo"):
        from xdpml.cli.memory import tune_malloc

        # Feature columns and batches are megabytes each at high flow rates: reuse heap
        # pages instead of a fresh, page-faulted mmap per array (flow_columns ~1.4x faster).
        # The process is the CLI's to tune; libraries never do it.
        tune_malloc()
    try:
        return a.func(a) or 0
    except XdpmlError as exc:
        # the one place a user error becomes a message and an exit code
        print(f"xdpml: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        how = (
            "Debian's python3-bpfcc, seen by the venv (scripts/install.sh)"
            if exc.name == "bcc"
            else f"pip install 'xdpml[{extra}]'"
        )
        print(
            f"xdpml {a.command}: this install has no {exc.name}: the {extra} needs it ({how}; "
            f"in containers, the {extra} image)",
            file=sys.stderr,
        )
        return EnvironmentNotReady.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
