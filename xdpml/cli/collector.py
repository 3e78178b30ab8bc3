"""``xdpml collector``: receive feature batches from agents, score them, answer with verdicts."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

EMBEDDED_FILE = "embedded-iforest.joblib"  # collector.models.EMBEDDED_FILE (not imported: --help stays light)

EPILOG = """examples:
  xdpml collector learn flows.jsonl                 # fit the embedded baseline on recorded flows
  xdpml collector                                   # embedded model, plaintext on 127.0.0.1:50051
  xdpml collector --listen 0.0.0.0:50051 --print-flagged --jsonl scored.jsonl
  xdpml collector --model sklearn:model.joblib --threshold 0.8 --parquet flows.parquet
  xdpml collector --policy policy.yaml --dry-run    # see what the policy would drop, drop nothing
  xdpml collector --model v2:127.0.0.1:8081/flows?output=predict_proba
  xdpml collector --tls-cert server.pem --tls-key server.key --tls-client-ca agents-ca.pem

docs: docs/collector.md (models, flags, file formats), docs/wire-format.md
"""


LEARN_DOC = """Fit the embedded Isolation Forest on flows you recorded and trust, and save it
(mode 0600, atomically) with its provenance: the input files, the agents (node names)
the rows came from, the row count and the time, also in a .json file beside it. Rows
a collector flagged (its --jsonl/--parquet output) are left out. The
collector loads it at start (from --state-dir, or pinned with --baseline FILE) and
never replaces it by itself. Record normal traffic with `xdpml agent -i eth0 -o
flows.jsonl`, or keep a collector's `--jsonl`/`--parquet` output."""


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "xdpml")


def add_model_arguments(g, *, live_learning: bool = True) -> None:
    """The model options, on argument group ``g``: the collector's, and ``xdpml score``'s
    (which scores a file: ``live_learning=False`` leaves out --learn-from and
    --baseline-rows)."""
    g.add_argument(
        "--model",
        default="embedded",
        metavar="SPEC",
        help="embedded | sklearn:PATH | onnx:PATH | v2:HOST:PORT/MODEL[?output=..&features=a,b] (default %(default)s)",
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="flag rows with score >= this (default: 0.65 for embedded, 0.5 otherwise)",
    )
    g.add_argument(
        "--baseline",
        metavar="FILE",
        help="embedded model: pinned baseline (from `xdpml collector learn -o FILE`), used read-only",
    )
    if live_learning:
        g.add_argument(
            "--learn-from",
            metavar="WHO",
            help="embedded model without a baseline: learn it live from these agents' streams: "
            "'authenticated' (any verified client certificate, needs --tls-client-ca), certificate "
            "names (comma list), or 'any' (every peer, unauthenticated: labs only). "
            "Default: nobody; rows stay unscored until `xdpml collector learn` made a baseline",
        )
        g.add_argument(
            "--baseline-rows",
            type=int,
            default=5000,
            metavar="N",
            help="embedded model, --learn-from: flows to learn the baseline from (default %(default)s)",
        )
    g.add_argument(
        "--trees",
        type=int,
        default=50,
        metavar="N",
        help="embedded model: trees in the forest; scoring cost grows linearly (default %(default)s)",
    )
    g.add_argument(
        "--features", metavar="A,B,...", help="embedded model: feature columns to use instead of the built-in list"
    )
    g.add_argument(
        "--state-dir",
        default=_default_state_dir(),
        metavar="DIR",
        help="where the embedded model keeps its baseline (default %(default)s)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="address to serve gRPC on, 0.0.0.0:PORT for every interface; port 0 picks a free "
        "one (default %(default)s: this host only)",
    )
    parser.add_argument(
        "--reflection",
        action="store_true",
        help="offer gRPC server reflection (lets anyone who can connect list the services)",
    )
    g = parser.add_argument_group("TLS")
    g.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain); enables TLS")
    g.add_argument("--tls-key", metavar="PEM", help="server private key")
    g.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="CA that signs agent certificates; makes client certificates mandatory (mTLS)",
    )
    add_model_arguments(parser.add_argument_group("model"))
    g = parser.add_argument_group("output")
    g.add_argument("--jsonl", metavar="PATH", help="append scored rows as JSON lines ('-' = stdout)")
    g.add_argument(
        "--parquet",
        metavar="PATH",
        help="write scored rows to Parquet files named after PATH (flows.parquet -> "
        "flows-<time>-<n>.parquet), each complete and renamed into place when rotated",
    )
    g.add_argument(
        "--parquet-file-mb",
        type=float,
        default=256,
        metavar="MB",
        help="rotate a Parquet file at this size (default %(default)g)",
    )
    g.add_argument(
        "--parquet-file-seconds",
        type=float,
        default=300,
        metavar="SECONDS",
        help="rotate a Parquet file at this age, so rows are readable within it (default %(default)g)",
    )
    g.add_argument(
        "--verdicts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream verdicts for flagged rows back to the agents (default on)",
    )
    g.add_argument(
        "--push-model",
        default="",
        metavar="SIGNED_FILE",
        help="a signed model (`xdpml model sign`) sent to every agent, once per version, also to agents that "
        "connect later; re-read when the file changes. The agents verify the signature (--model-trusted-key): "
        "the collector needs no key (docs/models.md)",
    )
    g = parser.add_argument_group("verdict policy (docs/collector.md#verdict-policy)")
    g.add_argument(
        "--policy", metavar="FILE", help="YAML policy: threshold, min_confidence, action and TTL per model and class"
    )
    g.add_argument(
        "--action",
        choices=("allow", "alert", "rate-limit", "drop"),
        default=None,
        help="action of the default rule (overrides the policy file; default alert)",
    )
    g.add_argument(
        "--verdict-ttl",
        type=int,
        default=None,
        metavar="SECONDS",
        help="TTL of the default rule's verdicts, 1-86400 (overrides the policy file; default 300)",
    )
    g.add_argument(
        "--dry-run",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send every drop and rate-limit verdict as alert (the policy's choice in policy_action); "
        "overrides the policy file's dry_run (default off)",
    )
    g.add_argument("--print-flagged", action="store_true", help="print a table of flagged flows to stdout")
    g = parser.add_argument_group("limits")
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest batch message accepted (default 4 MiB, gRPC's default)",
    )
    g.add_argument("--max-agents", type=int, default=256, help="concurrent agent streams (default %(default)s)")
    g.add_argument(
        "--max-streams-per-peer",
        type=int,
        default=16,
        metavar="N",
        help="concurrent streams from one address (default %(default)s)",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="end a stream that sent no message for this long (default %(default)g)",
    )
    g.add_argument(
        "--max-stream-age",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="drain and end streams this old, the agent reconnects; 0 = never (default %(default)g)",
    )
    g.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, time to finish received batches (default %(default)s)",
    )
    sub = parser.add_subparsers(dest="collector_command", metavar="{learn}")
    lp = sub.add_parser(
        "learn",
        help="fit the embedded model's baseline on recorded flows (JSON lines or Parquet)",
        description=LEARN_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lp.add_argument(
        "inputs",
        nargs="+",
        metavar="FILE",
        help="flow records: the agent's JSON lines (-o), the collector's --jsonl or --parquet files",
    )
    lp.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help=f"baseline file to write (default STATE_DIR/{EMBEDDED_FILE}, what the collector loads)",
    )
    lp.add_argument(
        "--state-dir",
        default=_default_state_dir(),
        metavar="DIR",
        help="where the collector looks for its baseline (default %(default)s)",
    )
    lp.add_argument("--replace", action="store_true", help="overwrite an existing baseline (its provenance is logged)")
    lp.add_argument("--trees", type=int, default=50, metavar="N", help="trees in the forest (default %(default)s)")
    lp.add_argument("--features", metavar="A,B,...", help="feature columns instead of the built-in list")
    lp.add_argument(
        "--max-rows",
        type=int,
        default=1_000_000,
        metavar="N",
        help="use at most the first N flows (default %(default)s)",
    )
    lp.set_defaults(func=run_learn)
    g = parser.add_argument_group("metrics")
    g.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT", help="serve Prometheus metrics on this port"
    )
    g.add_argument(
        "--metrics-host",
        default=None,
        metavar="ADDR",
        help="address the metrics endpoint binds (default: the --listen host, so loopback unless "
        "gRPC is served further)",
    )
    g.add_argument(
        "--otlp-endpoint",
        default="",
        metavar="URL",
        help="push OpenTelemetry metrics over OTLP gRPC (host:port, http:// or https://)",
    )


def run(args: argparse.Namespace) -> int:
    from xdpml.collector.models import describe_provenance, load_model
    from xdpml.collector.server import CollectorServer, CollectorSettings, parse_listen
    from xdpml.collector.sinks import FlaggedPrinter, JsonlSink, ParquetSink
    from xdpml.errors import ConfigError, XdpmlError
    from xdpml.obs.telemetry import Telemetry, TelemetrySettings
    from xdpml.wire.tls import ServerTls, TlsConfigError

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
        learn_from = tuple(w.strip() for w in args.learn_from.split(",") if w.strip()) if args.learn_from else ()
        # Settings first: a bad address or --learn-from fails before a model is loaded.
        from xdpml.collector.policy import Policy, load_policy, with_overrides

        policy = with_overrides(
            load_policy(args.policy) if args.policy else Policy(),
            action=args.action,
            threshold=args.threshold,
            ttl_seconds=args.verdict_ttl,
            dry_run=args.dry_run,
        )
        settings = CollectorSettings(
            listen=args.listen,
            tls=tls,
            threshold=args.threshold,
            send_verdicts=args.verdicts,
            policy=policy,
            max_message_bytes=args.max_message_bytes,
            max_agents=args.max_agents,
            max_streams_per_peer=args.max_streams_per_peer,
            idle_timeout_s=args.idle_timeout,
            max_stream_age_s=args.max_stream_age,
            reflection=args.reflection,
            learn_from=learn_from,
            push_model=os.path.abspath(args.push_model) if args.push_model else "",
        )
        model = load_model(
            args.model,
            state_dir=args.state_dir,
            baseline_rows=args.baseline_rows,
            features=features,
            trees=args.trees,
            baseline_file=args.baseline,
        )
        if learn_from and not getattr(model, "learns", False):
            model.close()
            raise ConfigError(f"--learn-from is for the embedded model; {model.name} does not learn")
        if args.jsonl:
            sinks.append(JsonlSink(args.jsonl))
        if args.parquet:
            if args.parquet_file_mb <= 0 or args.parquet_file_seconds <= 0:
                raise ConfigError("--parquet-file-mb and --parquet-file-seconds must be positive")
            sinks.append(
                ParquetSink(
                    args.parquet,
                    max_file_bytes=int(args.parquet_file_mb * 1024 * 1024),
                    max_file_age_s=args.parquet_file_seconds,
                    flush_s=min(10.0, args.parquet_file_seconds),
                )
            )
        if args.print_flagged:
            sinks.append(FlaggedPrinter())
        telemetry = Telemetry.from_settings(
            TelemetrySettings(
                service_name="xdpml-collector",
                prometheus_port=args.metrics_port,
                otlp_endpoint=args.otlp_endpoint,
                prometheus_host=args.metrics_host or parse_listen(args.listen)[0].strip("[]"),
            )
        )
        server = CollectorServer(model, sinks, settings, telemetry)
    except (XdpmlError, TlsConfigError, ValueError, OSError) as e:
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
    threshold = server.servicer.threshold
    if getattr(model, "learns", False):
        if model.trained:
            log.info("baseline: %s", describe_provenance(model.provenance))
            if learn_from:
                log.info("the model has a baseline already; --learn-from changes nothing")
        elif learn_from:
            log.warning(
                "no baseline yet: learning it from the first %d rows of %s",
                args.baseline_rows,
                "ANY peer (unauthenticated)" if learn_from == ("any",) else ", ".join(learn_from),
            )
        else:
            log.warning(
                "the embedded model has no baseline and learns from nobody: rows are stored unscored "
                "(label 'unscored'); make one with `xdpml collector learn`, pin one with --baseline, "
                "or let authenticated agents teach it with --learn-from"
            )
    print(
        f"xdpml collector: listening on port {server.port}, model {model.name} ({model.version}), "
        f"threshold {threshold:g}; policy: {policy.summary()}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop(args.grace)
        st = server.stats()
        print(
            f"xdpml collector: stopped; {st['batches_received']} batches, {st['rows_received']} rows, "
            f"{st['rows_flagged']} flagged, {st['batches_rejected']} rejected",
            file=sys.stderr,
            flush=True,
        )
        telemetry.shutdown()
    return 0


def read_flow_table(path: str, names: list[str]):
    """A Parquet file of flow records as a pyarrow Table that has the columns ``names``;
    a ConfigError if it cannot be read or lacks one."""
    import pyarrow.parquet as pq

    from xdpml.errors import ConfigError

    try:
        t = pq.read_table(path)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    missing = [n for n in names if n not in t.column_names]
    if missing:
        raise ConfigError(f"{path} has no column(s) {', '.join(missing)}: not flow records")
    return t


def flow_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each flow record of a JSON lines file, window and packet
    records skipped; a ConfigError for a line that is not JSON or a file that cannot be read."""
    import json

    from xdpml.errors import ConfigError, describe_os_error

    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise ConfigError(f"{path}:{lineno}: not a JSON line") from None
                if isinstance(row, dict) and row.get("record", "flow") == "flow":
                    yield lineno, row
    except OSError as e:
        raise ConfigError(describe_os_error(e, f"cannot read {path}")) from None


def _read_rows(path: str, names: list[str]) -> tuple[dict, list[str], int]:
    """Feature columns of the flow records in one file, the node names seen, and how
    many rows a collector had flagged (left out: an anomaly must not become normal)."""
    import numpy as np

    if path.endswith(".parquet"):
        t = read_flow_table(path, names)
        keep = np.ones(t.num_rows, dtype=bool)
        if "flagged" in t.column_names:
            keep = ~np.asarray(t.column("flagged").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
        cols = {n: t.column(n).to_numpy(zero_copy_only=False).astype(np.float64)[keep] for n in names}
        nodes = sorted(set(t.column("node_name").to_pylist())) if "node_name" in t.column_names else []
        return cols, [n for n in nodes if n], int((~keep).sum())
    vals: dict[str, list] = {n: [] for n in names}
    nodes: set[str] = set()
    flagged = 0
    for _, row in flow_lines(path):
        if any(n not in row for n in names):
            continue  # another schema
        if row.get("flagged") is True:
            flagged += 1
            continue
        for n in names:
            v = row[n]
            vals[n].append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan)
        if isinstance(row.get("node_name"), str) and row["node_name"]:
            nodes.add(row["node_name"])
    return {n: np.asarray(v, dtype=np.float64) for n, v in vals.items()}, sorted(nodes), flagged


def run_learn(args: argparse.Namespace) -> int:
    """``xdpml collector learn``: the explicit baseline step."""
    import numpy as np

    from xdpml.collector.models import EMBEDDED_FEATURES, EmbeddedIsolationForest, describe_provenance
    from xdpml.collector.server import printable
    from xdpml.errors import ConfigError, XdpmlError
    from xdpml.wire.columns import ColumnBatch

    log = logging.getLogger("xdpml.collector")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    out = args.output or os.path.join(args.state_dir, EMBEDDED_FILE)
    names = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else list(EMBEDDED_FEATURES)
    try:
        if os.path.exists(out):
            if not args.replace:
                old = EmbeddedIsolationForest(state_dir=None, baseline_file=out, features=names)
                raise ConfigError(
                    f"{out} holds a baseline already ({describe_provenance(old.provenance)}); --replace overwrites it"
                )
            log.warning("replacing baseline %s", out)
        parts, nodes, used = [], set(), []
        have = skipped = 0
        for path in args.inputs:
            cols, seen, flagged = _read_rows(path, names)
            skipped += flagged
            n = len(cols[names[0]])
            if n == 0:
                log.warning("%s holds no flow records with the features %s", path, ", ".join(names))
                continue
            take = min(n, args.max_rows - have)
            parts.append(ColumnBatch("flow", {k: v[:take] for k, v in cols.items()}))
            nodes.update(seen)
            used.append(os.path.abspath(path))
            have += take
            if have >= args.max_rows:
                break
        if not parts:
            raise ConfigError("no flow records to learn from in " + ", ".join(args.inputs))
        model = EmbeddedIsolationForest(state_dir=None, features=names, n_estimators=args.trees)
        x = np.concatenate([model.features_of(b) for b in parts])
        nonfinite = int(sum(int((~np.isfinite(b[n])).sum()) for b in parts for n in names))
        model.fit(
            x,
            {
                "source": "collector learn",
                "inputs": used,
                "nodes": [printable(n, 253) for n in sorted(nodes)],
                "nonfinite_values_as_zero": nonfinite,
                "skipped_flagged_rows": skipped,
            },
        )
        from xdpml.collector.models import save_baseline

        model.provenance["file"] = os.path.abspath(out)
        save_baseline(out, model._forest, model.feature_names, model.version, model._ranges, model.provenance)
    except (XdpmlError, ValueError) as e:
        print(f"xdpml collector learn: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from xdpml.errors import describe_os_error

        print(f"xdpml collector learn: {describe_os_error(e, f'cannot write {out}')}", file=sys.stderr)
        return 5
    print(f"xdpml collector learn: baseline of {len(x)} flows saved to {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xdpml collector", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)
    args = parser.parse_args(argv)
    return args.func(args)
