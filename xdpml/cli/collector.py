"""``xdpml collector``: receive feature batches from agents, score them, answer with verdicts."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

EPILOG = """examples:
  xdpml collector                                   # embedded model, plaintext on :50051
  xdpml collector --listen 127.0.0.1:50051 --print-flagged --jsonl scored.jsonl
  xdpml collector --model sklearn:model.joblib --threshold 0.8 --parquet flows.parquet
  xdpml collector --model v2:127.0.0.1:8081/flows?output=predict_proba
  xdpml collector --tls-cert server.pem --tls-key server.key --tls-client-ca agents-ca.pem

docs: docs/collector.md (models, flags, file formats), docs/wire-format.md
"""


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "xdpml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--listen", default="0.0.0.0:50051", metavar="HOST:PORT",
                        help="address to serve gRPC on; port 0 picks a free one (default %(default)s)")
    g = parser.add_argument_group("TLS")
    g.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain); enables TLS")
    g.add_argument("--tls-key", metavar="PEM", help="server private key")
    g.add_argument("--tls-client-ca", metavar="PEM",
                   help="CA that signs agent certificates; makes client certificates mandatory (mTLS)")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="embedded", metavar="SPEC",
                   help="embedded | sklearn:PATH | onnx:PATH | v2:HOST:PORT/MODEL[?output=..&features=a,b] "
                        "(default %(default)s)")
    g.add_argument("--threshold", type=float, default=None,
                   help="flag rows with score >= this (default: 0.65 for embedded, 0.5 otherwise)")
    g.add_argument("--baseline-rows", type=int, default=5000, metavar="N",
                   help="embedded model: flows to learn the baseline from before scoring (default %(default)s)")
    g.add_argument("--trees", type=int, default=50, metavar="N",
                   help="embedded model: trees in the forest; scoring cost grows linearly (default %(default)s)")
    g.add_argument("--features", metavar="A,B,...",
                   help="embedded model: feature columns to use instead of the built-in list")
    g.add_argument("--state-dir", default=_default_state_dir(), metavar="DIR",
                   help="where the embedded model keeps its baseline (default %(default)s)")
    g = parser.add_argument_group("output")
    g.add_argument("--jsonl", metavar="PATH", help="append scored rows as JSON lines ('-' = stdout)")
    g.add_argument("--parquet", metavar="PATH", help="write scored rows to a Parquet file (complete on exit)")
    g.add_argument("--verdicts", action=argparse.BooleanOptionalAction, default=True,
                   help="stream verdicts for flagged rows back to the agents (default on)")
    g.add_argument("--action", choices=("alert", "drop", "rate-limit"), default="alert",
                   help="action suggested in verdicts (default %(default)s)")
    g.add_argument("--print-flagged", action="store_true", help="print a table of flagged flows to stdout")
    g = parser.add_argument_group("limits")
    g.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest batch message accepted (default 4 MiB, gRPC's default)")
    g.add_argument("--max-agents", type=int, default=256, help="concurrent agent streams (default %(default)s)")
    g.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, time to finish received batches (default %(default)s)")
    g = parser.add_argument_group("metrics")
    g.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this port")
    g.add_argument("--otlp-endpoint", default="", metavar="URL",
                   help="push OpenTelemetry metrics over OTLP gRPC (host:port, http:// or https://)")


def run(args: argparse.Namespace) -> int:
    from xdpml.wire.tls import ServerTls, TlsConfigError
    from xdpml.collector.models import ModelError, load_model
    from xdpml.collector.server import CollectorServer, CollectorSettings, ListenError
    from xdpml.collector.sinks import FlaggedPrinter, JsonlSink, ParquetSink
    from xdpml.obs.telemetry import Telemetry, TelemetryError, TelemetrySettings

    log = logging.getLogger("xdpml.collector")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    def fail(msg: str) -> int:
        print(f"xdpml collector: {msg}", file=sys.stderr)
        return 2

    if bool(args.tls_cert) != bool(args.tls_key):
        return fail("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        return fail("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    sinks = []
    try:
        tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
        features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
        model = load_model(args.model, state_dir=args.state_dir, baseline_rows=args.baseline_rows, features=features,
                           trees=args.trees)
        if args.jsonl:
            sinks.append(JsonlSink(args.jsonl))
        if args.parquet:
            sinks.append(ParquetSink(args.parquet))
        if args.print_flagged:
            sinks.append(FlaggedPrinter())
        settings = CollectorSettings(listen=args.listen, tls=tls, threshold=args.threshold,
                                     send_verdicts=args.verdicts, action=args.action,
                                     max_message_bytes=args.max_message_bytes, max_agents=args.max_agents)
        telemetry = Telemetry.from_settings(TelemetrySettings(
            service_name="xdpml-collector", prometheus_port=args.metrics_port, otlp_endpoint=args.otlp_endpoint))
        server = CollectorServer(model, sinks, settings, telemetry)
    except (ModelError, TlsConfigError, ListenError, ValueError, OSError, TelemetryError) as e:
        for s in sinks:
            s.close()
        return fail(str(e))

    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("%s: draining", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    server.start()
    threshold = settings.threshold if settings.threshold is not None else model.default_threshold
    print(f"xdpml collector: listening on port {server.port}, model {model.name} ({model.version}), "
          f"threshold {threshold:g}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop(args.grace)
        st = server.stats()
        print(f"xdpml collector: stopped; {st['batches_received']} batches, {st['rows_received']} rows, "
              f"{st['rows_flagged']} flagged, {st['batches_rejected']} rejected", file=sys.stderr, flush=True)
        telemetry.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xdpml collector", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
