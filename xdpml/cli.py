"""xdpml command line: agent, collector, cleanup, demo."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import textwrap

from xdpml.errors import XdpmlError

log = logging.getLogger("xdpml")

AGENT_EXAMPLES = """\
examples:
  xdpml agent -i eth0 -o features.jsonl           flows from eth0 to a file
  xdpml agent -i eth0 -w 100 -o features.jsonl     + seed-000 windows of 100 packets
  xdpml agent -i 'eth*' -i physical --sample 100   flows + 1-in-100 packet samples, stdout
  xdpml agent -i eth0 --unix-socket /tmp/ids.sock  stream JSON lines to a local consumer
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
    g.add_argument("-i", "--interface", action="append", default=[], metavar="IFACE",
                   help="interface name or glob; 'physical' or 'pod-veths' for all of a kind (repeatable)")
    g.add_argument("--hooks", choices=("auto", "xdp", "tc", "xdp+tc"), default="auto",
                   help="auto: XDP ingress + TC egress on physical NICs, TC both ways on veth and "
                        "virtual interfaces (default: %(default)s)")
    g.add_argument("--xdp-mode", choices=("auto", "native", "generic"), default="auto",
                   help="XDP attach mode; auto = native on physical NICs (default: %(default)s)")
    f = p.add_argument_group("features")
    f.add_argument("-w", "--window", type=_nonneg_int, default=0, metavar="N",
                   help="window features over every N packets (seed 000); 0 = off")
    f.add_argument("--window-seconds", type=_positive_float, default=0.0, metavar="T",
                   help="window features over T-second windows; 0 = off")
    f.add_argument("--sample", type=_nonneg_int, default=0, metavar="N",
                   help="per-packet features for 1 in N packets; 0 = off (default)")
    f.add_argument("--first-n", type=_nonneg_int, default=10, metavar="N",
                   help="packets per flow kept for sequence features, 0..32 (default: %(default)s)")
    f.add_argument("--no-flows", action="store_true", help="do not export flow records")
    t = p.add_argument_group("flow table and timeouts")
    t.add_argument("--flow-table-size", type=_nonneg_int, default=65536, metavar="N",
                   help="kernel flow table entries (default: %(default)s)")
    t.add_argument("--no-flow-lock", action="store_true",
                   help="compile out the per-flow spin lock: ~1/3 less kernel time per packet, but two "
                        "CPUs updating one flow at once may lose an update (docs/benchmarks.md)")
    t.add_argument("--idle-timeout", type=_positive_float, default=120.0, metavar="S",
                   help="export a flow idle this long, seconds (default: %(default)s)")
    t.add_argument("--active-timeout", type=_positive_float, default=1800.0, metavar="S",
                   help="export and restart a flow this old, seconds (default: %(default)s)")
    t.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                   help="flow table scan period, seconds (default: %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", metavar="FILE",
                   help="JSON lines file ('-' = stdout; the default when no other output is given)")
    o.add_argument("--unix-socket", metavar="PATH", help="stream JSON lines to this Unix socket")
    o.add_argument("--collector", metavar="HOST:PORT", help="stream protobuf batches to an xdpml collector")
    o.add_argument("--tls-ca", metavar="PEM", help="CA that signed the collector's certificate (enables TLS)")
    o.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    o.add_argument("--tls-key", metavar="PEM", help="client key for mutual TLS")
    o.add_argument("--tls-server-name", metavar="NAME", help="name expected in the collector's certificate")
    o.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="node identity sent with every batch (default: $NODE_NAME or the hostname)")
    k = p.add_argument_group("Kubernetes and operations")
    k.add_argument("--kubernetes", action="store_true",
                   help="configure from AgentConfig resources and enrich flows with pod metadata "
                        "(interfaces then come from the AgentConfig; -i is not needed)")
    k.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, then ~/.kube/config)")
    k.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "xdpml"),
                   help="namespace of the AgentConfig resources (default: $POD_NAMESPACE or xdpml)")
    k.add_argument("--config-name", default="", metavar="NAME",
                   help="follow only the AgentConfig of this name (default: the oldest that selects the node)")
    k.add_argument("--health-port", type=_nonneg_int, default=None, metavar="PORT",
                   help="serve /livez and /readyz on this port")
    k.add_argument("--metrics-port", type=_nonneg_int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this port")
    k.add_argument("--otlp-endpoint", default="", metavar="URL",
                   help="push OpenTelemetry metrics over OTLP gRPC (host:port, http:// or https://)")
    o.add_argument("--duration", type=_positive_float, default=0.0, metavar="S",
                   help="stop after S seconds (default: run until SIGINT/SIGTERM)")
    o.add_argument("--summary-interval", type=_positive_float, default=5.0, metavar="S",
                   help="seconds between summary lines on stderr; 0 = off (default: %(default)s)")


def settings_from_args(a):
    from agent.config import (AgentSettings, DatapathSettings, HarvestSettings, InterfaceSettings,
                              WindowSettings)

    return AgentSettings(
        interfaces=InterfaceSettings(names=a.interface, hooks=a.hooks, xdp_mode=a.xdp_mode),
        datapath=DatapathSettings(flow_table_size=a.flow_table_size, first_n=a.first_n, sample_rate=a.sample,
                                  flow_lock=not a.no_flow_lock),
        harvest=HarvestSettings(idle_timeout_s=a.idle_timeout, active_timeout_s=a.active_timeout,
                                interval_s=a.interval),
        window=WindowSettings(packets=a.window, seconds=a.window_seconds),
        summary_interval_s=a.summary_interval,
    ).validate()


def _telemetry(a, service: str):
    from xdpml.telemetry import Telemetry, TelemetrySettings

    attrs = {"k8s.node.name": a.node_name} if getattr(a, "node_name", "") else {}
    return Telemetry.from_settings(TelemetrySettings(
        service_name=service, prometheus_port=a.metrics_port, otlp_endpoint=a.otlp_endpoint,
        resource_attributes=attrs))


def run_agent(a) -> int:
    from agent.bpf.loader import AttachError, resolve_interfaces
    from agent.config import ConfigError
    from agent.export.sinks import JsonLinesSink, UnixSocketSink
    from agent.pipeline import Agent, install_signal_handlers, register_observables

    if a.kubernetes:
        return run_kubernetes_agent(a)
    if not a.interface:
        print("xdpml agent: give at least one interface with -i (see `ip link show`), or --kubernetes",
              file=sys.stderr)
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
    if a.collector:
        try:
            sinks.append(_grpc_sink(a, telemetry, lambda: holder.get("agent")))
        except (ValueError, OSError) as exc:
            print(f"xdpml agent: collector settings: {exc}", file=sys.stderr)
            return 2
    health = _health(a, ("programs_attached",))
    agent = Agent(settings, interfaces=names, sinks=sinks, flows=not a.no_flows, telemetry=telemetry,
                  on_attached=(lambda dp: health.set("programs_attached")) if health else None)
    holder["agent"] = agent
    register_observables(telemetry, lambda: agent)
    install_signal_handlers(agent.stop_event)
    try:
        agent.run(duration_s=a.duration or None)
    except (AttachError, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    except PermissionError as exc:
        log.error("permission denied (%s): the agent needs root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON", exc)
        return 1
    finally:
        telemetry.shutdown()
        if health:
            health.close()
    return 0


def _health(a, conditions):
    if a.health_port is None:
        return None
    from agent.health import HealthServer

    return HealthServer(port=a.health_port, conditions=conditions)


def run_kubernetes_agent(a) -> int:
    from agent.export.sinks import JsonLinesSink, UnixSocketSink
    from agent.export.tls import ClientTls
    from agent.kube.client import KubeUnavailable, api_client
    from agent.kubernetes import KubeAgentOptions, KubernetesAgent
    from agent.pipeline import install_signal_handlers

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
    opts = KubeAgentOptions(namespace=a.namespace, node_name=a.node_name, config_name=a.config_name,
                            collector=a.collector or "", collector_tls=tls, extra_sinks=extra)
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


def _grpc_sink(a, telemetry, current_agent):
    from agent.export.grpc_client import ExporterSettings, GrpcExporter
    from agent.kubernetes import verdict_counter
    from agent.export.sinks import CollectorSink
    from agent.export.tls import ClientTls

    tls = None
    if a.tls_ca or a.tls_cert or a.tls_key:
        tls = ClientTls(ca_file=a.tls_ca, cert_file=a.tls_cert, key_file=a.tls_key,
                        server_name=a.tls_server_name)

    from agent.pipeline import loss_counters

    exporter = GrpcExporter(ExporterSettings(target=a.collector, tls=tls, node_name=a.node_name),
                            on_verdicts=verdict_counter(telemetry), loss_counters=loss_counters(current_agent))
    return CollectorSink(exporter)


def run_check_config(a) -> int:
    from agent.config import ConfigError
    from agent.kube.agentconfig import check_file

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
    from agent.bpf.loader import AgentRunning, cleanup

    try:
        removed = cleanup(force=a.force)
    except AgentRunning as exc:
        print(f"xdpml cleanup: {exc}", file=sys.stderr)
        return 1
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print("nothing of xdpml's was attached")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xdpml",
        description="Network flow, window and packet features for machine learning, from XDP/TC "
                    "programs, streamed to files, sockets or an inference collector.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=AGENT_EXAMPLES)
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    ag = sub.add_parser("agent", help="attach to interfaces and export features",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Attach the datapath to interfaces and export features.",
                        epilog=AGENT_EXAMPLES)
    add_agent_arguments(ag)
    ag.set_defaults(func=run_agent)
    cc = sub.add_parser("check-config", help="validate AgentConfig YAML files as the agents would")
    cc.add_argument("files", nargs="+", metavar="FILE")
    cc.set_defaults(func=run_check_config)
    cl = sub.add_parser("cleanup", help="remove xdpml programs a killed agent left attached")
    cl.add_argument("--force", action="store_true",
                    help="remove them even while an xdpml agent process is running")
    cl.set_defaults(func=run_cleanup)
    try:
        from collector import cli as collector_cli
    except ImportError:
        collector_cli = None
    if collector_cli is not None and hasattr(collector_cli, "add_arguments"):
        co = sub.add_parser("collector", help="receive feature batches, score them, send verdicts",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        collector_cli.add_arguments(co)
        co.set_defaults(func=collector_cli.run)
    dm = sub.add_parser("demo", help="the whole loop on this machine with test hosts in namespaces",
                        description=textwrap.dedent("""\
                            Builds test hosts in network namespaces, runs the agent on their
                            interfaces and the collector with the embedded model, sends normal
                            traffic, then a port scan and a SYN flood, and prints the flows the
                            model flags. Needs root. Ends by itself and removes what it made."""),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    dm.add_argument("--seconds", type=_positive_float, default=20.0, help="baseline traffic duration")
    dm.set_defaults(func=run_demo)
    from xdpml.models.cli_commands import add_model_commands
    add_model_commands(sub)
    return p


def run_demo(a) -> int:
    from xdpml import demo

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
    from xdpml.logging_setup import setup_logging as configure

    configure(fmt, "debug" if verbose else "info", stream=stream or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    setup_logging(a.log_format, a.verbose, log_stream(a))
    try:
        return a.func(a) or 0
    except XdpmlError as exc:
        # the one place a user error becomes a message and an exit code
        print(f"xdpml: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
