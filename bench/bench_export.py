#!/usr/bin/env python3
"""Export benchmark: agent feature columns -> gRPC -> collector scores, on loopback.

Measures, in one run and on the same synthetic flows (xdpml.agent.export.synthetic, the
agent's full flow schema, ~650 bytes of columns per flow):

  encode          ColumnBatch -> FeatureBatch bytes (codec + protobuf serialization)
  decode          bytes -> FeatureBatch -> numpy columns
  score           the embedded Isolation Forest alone, on decoded columns
  columnar e2e    GrpcExporter in this process -> `python -m xdpml collector` in another
                  process with the embedded model (baseline loaded, every row scored);
                  time from the first put() to the last acknowledgement, which the
                  collector sends after scoring
  per-flow e2e    the design xdpml avoids: one protobuf message per flow (a FlowRecord
                  with one field per feature), streamed to a server process that turns
                  messages back into rows and scores them with the same model in
                  batches of 4096

    .venv/bin/python bench/bench_export.py [--flows 1000000] [--per-flow-flows 20000] [--trees 50,25]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
from xdpml.agent.export.synthetic import flow_batch
from xdpml.collector.models import EmbeddedIsolationForest

from xdpml.cli.memory import tune_malloc
from xdpml.wire import codec
from xdpml.wire.columns import ColumnBatch
from xdpml.wire.v1 import collector_pb2 as cpb

ROOT = Path(__file__).resolve().parents[1]

PER_FLOW_METHOD = "/xdpml.bench.PerFlow/Export"
F = descriptor_pb2.FieldDescriptorProto


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proto_type(col: np.ndarray) -> int:
    k, size = col.dtype.kind, col.dtype.itemsize
    if k == "b":
        return F.TYPE_BOOL
    if k == "u":
        return F.TYPE_UINT64 if size == 8 else F.TYPE_UINT32
    if k == "i":
        return F.TYPE_INT64 if size == 8 else F.TYPE_INT32
    if k == "f":
        return F.TYPE_DOUBLE if size == 8 else F.TYPE_FLOAT
    if k == "S":
        return F.TYPE_BYTES
    return F.TYPE_STRING


def flow_record_class(sample: ColumnBatch):
    """A FlowRecord message with one scalar (or repeated, for sequences) field per column."""
    fdp = descriptor_pb2.FileDescriptorProto(name="xdpml_bench_per_flow.proto", package="xdpml.bench", syntax="proto3")
    msg = fdp.message_type.add(name="FlowRecord")
    for i, (name, col) in enumerate(sample.columns.items(), 1):
        msg.field.add(
            name=name, number=i, type=_proto_type(col), label=F.LABEL_REPEATED if col.ndim == 2 else F.LABEL_OPTIONAL
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("xdpml.bench.FlowRecord"))


# ---- per-flow server (runs as a separate process) ---------------------------------------


def serve_per_flow(port: int, state_dir: str) -> None:
    from concurrent import futures

    sample = flow_batch(2, seed=0)
    FlowRecord = flow_record_class(sample)
    names = list(sample.columns)
    dtypes = {n: c.dtype for n, c in sample.columns.items()}
    model = EmbeddedIsolationForest(state_dir=state_dir)
    assert model.trained, "baseline missing"

    def flush(rows: list) -> int:
        cols = {}
        for j, n in enumerate(names):
            vals = [r[j] for r in rows]
            cols[n] = np.array(vals, dtype=dtypes[n]) if dtypes[n].kind != "O" else np.array(vals, dtype=object)
        return int(np.isfinite(model.score(ColumnBatch("flow", cols)).score).sum())

    def export(request_iterator, context):
        rows, scored = [], 0
        for m in request_iterator:
            rows.append(
                [
                    list(getattr(m, n)) if dtypes[n].kind != "O" and sample.columns[n].ndim == 2 else getattr(m, n)
                    for n in names
                ]
            )
            if len(rows) >= 4096:
                scored += flush(rows)
                rows = []
        if rows:
            scored += flush(rows)
        return struct.pack("<Q", scored)

    handler = grpc.method_handlers_generic_handler(
        "xdpml.bench.PerFlow",
        {
            "Export": grpc.stream_unary_rpc_method_handler(
                export, request_deserializer=FlowRecord.FromString, response_serializer=lambda b: b
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


# ---- measurements ------------------------------------------------------------------------


def bench_codec(batches: list[ColumnBatch], repeat: int) -> tuple[dict[str, float], list]:
    tune_malloc()  # as the CLI does for the agent and the collector
    seq = iter(range(1, 10**9))
    n = sum(len(b) for b in batches) * repeat
    # What the exporter does: serialized ExportRequests, split under 4 MiB. Payloads are
    # dropped as they are made, as the exporter frees them once sent, so the allocator
    # reuses their memory instead of page-faulting fresh memory for each.
    nbytes = 0
    t = time.perf_counter()
    for _ in range(repeat):
        for b in batches:
            for _, _, p in codec.encode_split_requests(b, next_sequence=lambda: next(seq)):
                nbytes += len(p)
    enc = time.perf_counter() - t
    wire = [p for b in batches for _, _, p in codec.encode_split_requests(b, next_sequence=lambda: next(seq))]
    wire *= repeat
    t = time.perf_counter()
    # What the collector does: gRPC's deserializer, then the codec.
    decoded = [codec.decode_batch(cpb.ExportRequest.FromString(w).batch) for w in wire]
    dec = time.perf_counter() - t
    return {
        "encode": n / enc,
        "decode": n / dec,
        "bytes_per_flow": nbytes / n,
        "encode_MBps": nbytes / enc / 1e6,
    }, decoded[: len(decoded) // repeat]


def bench_score(decoded: list, state_dir: str) -> float:
    model = EmbeddedIsolationForest(state_dir=state_dir)
    assert model.trained
    n = sum(len(d.batch) for d in decoded)
    t = time.perf_counter()
    for d in decoded:
        model.score(d.batch)
    return n / (time.perf_counter() - t)


def _wait_line(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while needle not in path.read_text():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"server did not start:\n{path.read_text()}")
        time.sleep(0.05)


def bench_columnar(batches: list[ColumnBatch], flows: int, model_args: list[str], tmp: Path) -> dict[str, float]:
    port = free_port()
    log = tmp / f"collector-{len(list(tmp.glob('collector-*')))}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xdpml", "collector", "--listen", f"127.0.0.1:{port}", *model_args],
            cwd=ROOT,
            stderr=f,
            stdout=f,
        )
    # The collector loads the baseline from state_dir, so it scores with that forest size.
    try:
        _wait_line(log, "listening on port", proc)
        settings = ExporterSettings(
            target=f"127.0.0.1:{port}", flush_rows=20_000, flush_age_s=0.05, queue_max_bytes=256 * 1024 * 1024
        )
        with GrpcExporter(settings) as ex:
            ex.put(batches[0])  # warm-up: connection, first-call costs
            while ex.stats()["sent_rows"] < len(batches[0]):
                time.sleep(0.01)
            base = ex.stats()["sent_rows"]
            produced = 0
            t = time.perf_counter()
            i = 0
            while produced < flows:
                b = batches[i % len(batches)]
                i += 1
                # A harvester producing faster than the network would have batches dropped;
                # here the producer waits so the measurement counts delivered rows only.
                while ex.stats()["queue_bytes"] > settings.queue_max_bytes // 2:
                    time.sleep(0.0005)
                ex.put(b)
                produced += len(b)
            while ex.stats()["sent_rows"] - base < produced:
                time.sleep(0.001)
            elapsed = time.perf_counter() - t
            st = ex.stats()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    m = re.search(r"(\d+) rows, (\d+) flagged", log.read_text())
    scored_rows = int(m.group(1)) if m else -1
    return {
        "flows_per_s": produced / elapsed,
        "flows": produced,
        "dropped": st["dropped_rows"],
        "collector_rows": scored_rows,
        "messages": st["sent_batches"],
    }


def bench_per_flow(batches: list[ColumnBatch], flows: int, state_dir: str, tmp: Path) -> dict[str, float]:
    port = free_port()
    log = tmp / "per_flow.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-per-flow", str(port), state_dir], cwd=ROOT, stdout=f, stderr=f
        )
    FlowRecord = flow_record_class(batches[0])
    try:
        _wait_line(log, "ready", proc)

        def records():
            sent = 0
            for b in batches:
                cols = {n: c.tolist() for n, c in b.columns.items()}
                for i in range(len(b)):
                    if sent >= flows:
                        return
                    yield FlowRecord(**{n: v[i] for n, v in cols.items()})
                    sent += 1

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.stream_unary(
                PER_FLOW_METHOD,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=lambda b: struct.unpack("<Q", b)[0],
            )
            t = time.perf_counter()
            scored = call(records(), timeout=600)
            elapsed = time.perf_counter() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"flows_per_s": flows / elapsed, "flows": flows, "scored": scored}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=1_000_000, help="flows for the columnar end-to-end run")
    ap.add_argument("--per-flow-flows", type=int, default=20_000, help="flows for the per-flow baseline")
    ap.add_argument("--batch-rows", type=int, default=10_000, help="rows per harvested batch")
    ap.add_argument("--trees", default="50,25", help="embedded forest sizes to run end to end (default %(default)s)")
    ap.add_argument("--serve-per-flow", nargs=2, metavar=("PORT", "STATE_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_per_flow:
        serve_per_flow(int(args.serve_per_flow[0]), args.serve_per_flow[1])
        return 0

    trees = [int(t) for t in args.trees.split(",")]
    batches = [flow_batch(args.batch_rows, seed=100 + i) for i in range(20)]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        states = {}
        for t in trees:
            # One baseline per forest size, loaded by every server of that run.
            states[t] = str(tmp / f"state-{t}-trees")
            EmbeddedIsolationForest(state_dir=states[t], baseline_rows=5000, n_estimators=t).score(
                flow_batch(5000, seed=999), learn_from="bench"
            )
        c, decoded = bench_codec(batches, repeat=2)
        score = {t: bench_score(decoded, states[t]) for t in trees}
        col = {t: bench_columnar(batches, args.flows, ["--state-dir", states[t]], tmp) for t in trees}
        # The same path with a model that costs almost nothing (a linear regression on
        # two columns): what transport, codec and collector cost without the forest.
        import joblib
        from sklearn.linear_model import LinearRegression

        cheap = ["bidirectional_packets", "bps"]
        lin = LinearRegression().fit(np.c_[batches[0][cheap[0]], batches[0][cheap[1]]], batches[0]["log_bytes"])
        joblib.dump({"model": lin, "feature_names": cheap}, tmp / "linear.joblib")
        col["linear"] = bench_columnar(
            batches, args.flows, ["--model", f"sklearn:{tmp / 'linear.joblib'}", "--threshold", "1e9"], tmp
        )
        per = bench_per_flow(batches, args.per_flow_flows, states[trees[0]], tmp)
    load = os.getloadavg()
    print(f"cpus: {os.cpu_count()}, load average (1/5/15 min) at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"flow row: {len(batches[0].columns)} columns, {c['bytes_per_flow']:.0f} bytes on the wire")
    print()
    print("| measurement | flows/s |")
    print("|---|---:|")
    print(
        f"| encode only (ColumnBatch -> serialized ExportRequest) | {c['encode']:,.0f} ({c['encode_MBps']:.0f} MB/s) |"
    )
    print(f"| decode only (ExportRequest bytes -> numpy columns, validated) | {c['decode']:,.0f} |")
    for t in trees:
        print(f"| embedded model scoring only, {t} trees | {score[t]:,.0f} |")
    for t in trees:
        r = col[t]
        print(
            f"| **columnar end to end**, embedded model {t} trees, {r['flows']:,} flows in {r['messages']} "
            f"messages | **{r['flows_per_s']:,.0f}** |"
        )
    r = col["linear"]
    print(
        f"| columnar end to end, linear model on 2 columns (transport + codec + collector), {r['flows']:,} flows "
        f"| {r['flows_per_s']:,.0f} |"
    )
    print(
        f"| one protobuf message per flow end to end, {trees[0]} trees, {per['flows']:,} flows "
        f"| {per['flows_per_s']:,.0f} |"
    )
    print()
    for t in trees:
        r = col[t]
        print(
            f"{t} trees: columnar / per-flow = {r['flows_per_s'] / per['flows_per_s']:.1f}x; dropped rows "
            f"{r['dropped']}; rows the collector received {r['collector_rows']:,} (incl. {args.batch_rows:,} warm-up)"
        )
    print(f"per-flow rows scored: {per['scored']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
