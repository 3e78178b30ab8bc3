"""Load test (issue 10): N good agents x M streams each, with bad peers mixed in, on
loopback, bounded in time. Good agents lose nothing: every row they send is scored,
stored once and acknowledged. Figures: docs/security.md, "Load test"."""

import os
import threading
import time

import grpc
import numpy as np
from conftest import batch_with_ids
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
from xdpml.collector.models import Scores, feature_matrix

from xdpml.wire import codec
from xdpml.wire.v1 import collector_pb2 as cpb
from xdpml.wire.v1 import collector_pb2_grpc as cgrpc

AGENTS, STREAMS, BATCHES, ROWS = 8, 2, 16, 1000  # 256,000 good rows over 16 streams
IDLE, GARBAGE, HUGE_ID, NAN = 40, 3, 2, 2  # bad peers (threads or streams)


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PacketsBpsModel:
    """score = bidirectional_packets / 100; also takes bps, so NaN there must be imputed."""

    name, version, default_threshold = "packets-bps", "1", 0.5
    feature_names = ("bidirectional_packets", "bps")

    def score(self, batch):
        x = feature_matrix(batch, self.feature_names)
        assert np.isfinite(x).all()  # the collector never hands a model NaN
        return Scores(x[:, 0] / 100.0)

    def close(self):
        pass


def test_good_agents_lose_nothing_while_bad_peers_hammer_the_collector(collector):
    srv = collector(model=PacketsBpsModel(), max_streams_per_peer=200)  # every peer is 127.0.0.1 here
    target = f"127.0.0.1:{srv.port}"
    stop = threading.Event()
    bad = {"garbage": 0, "huge_id": 0, "nan_rows": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def garbage():
        with grpc.insecure_channel(target) as ch:
            raw = ch.stream_stream(
                "/xdpml.v1.Collector/Export",
                request_serializer=lambda b: b,
                response_deserializer=cpb.ExportResponse.FromString,
            )
            while not stop.is_set():
                try:
                    # An 11-byte varint tag is never valid protobuf; random bytes after it.
                    list(raw(iter([b"\xff" * 11 + os.urandom(64)]), timeout=10))
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        with lock:
                            errors.append(f"garbage: {e.code()}")
                with lock:
                    bad["garbage"] += 1

    def huge_id():
        req = cpb.ExportRequest(
            batch=codec.encode_batch(batch_with_ids(10, 0), sequence=1, node=codec.NodeIdentity("n", "x" * 100_000))
        )
        with grpc.insecure_channel(target) as ch:
            stub = cgrpc.CollectorStub(ch)
            while not stop.is_set():
                (resp,) = list(stub.Export(iter([req]), timeout=10))
                if resp.ack.error_code != 3:
                    with lock:
                        errors.append(f"huge id accepted: {resp.ack}")
                with lock:
                    bad["huge_id"] += 1

    def nan_rows(k):
        b = batch_with_ids(500, 10_000_000 * (k + 1))
        b.columns["bps"] = np.full(500, np.nan)
        seq = 0
        with grpc.insecure_channel(target) as ch:
            stub = cgrpc.CollectorStub(ch)
            while not stop.is_set():
                seq += 1
                req = cpb.ExportRequest(batch=codec.encode_batch(b, sequence=seq, node=codec.NodeIdentity("nan")))
                (resp,) = [r for r in stub.Export(iter([req]), timeout=10) if r.HasField("ack")]
                with lock:
                    bad["nan_rows"] += resp.ack.rows_accepted

    hold = threading.Event()
    idle_ch = grpc.insecure_channel(target)
    idle = [cgrpc.CollectorStub(idle_ch).Export(iter(hold.wait, True), timeout=120) for _ in range(IDLE)]
    assert len(idle) == IDLE
    threads = [threading.Thread(target=garbage) for _ in range(GARBAGE)]
    threads += [threading.Thread(target=huge_id) for _ in range(HUGE_ID)]
    threads += [threading.Thread(target=nan_rows, args=(k,)) for k in range(NAN)]
    rss0 = _rss_mb()
    for t in threads:
        t.start()

    # Good agents: AGENTS x STREAMS exporters (the agent's own client), unique row ids.
    exporters, sent = [], []
    t0 = time.monotonic()
    for a in range(AGENTS):
        for s in range(STREAMS):
            exporters.append(
                GrpcExporter(
                    ExporterSettings(
                        target=target,
                        node_name=f"node-{a}",
                        agent_id=f"agent-{a}-{s}",
                        flush_rows=ROWS,
                        flush_age_s=0.02,
                        backoff_initial_s=0.05,
                        backoff_max_s=0.5,
                    )
                )
            )
    next_id = 0
    for k in range(BATCHES):
        for ex in exporters:
            b = batch_with_ids(ROWS, next_id, seed=k)
            sent.append(b["row_id"])
            next_id += ROWS
            assert ex.put(b)
    end = time.monotonic() + 60
    total = AGENTS * STREAMS * BATCHES * ROWS
    while sum(ex.stats()["sent_rows"] for ex in exporters) < total:
        assert time.monotonic() < end, [ex.stats() for ex in exporters]
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    stats = [ex.close(5) for ex in exporters]
    stop.set()
    for t in threads:
        t.join(30)
    hold.set()
    idle_ch.close()
    grown = _rss_mb() - rss0

    assert errors == []
    assert all(st["dropped_rows"] == 0 and st["rejected_batches"] == 0 for st in stats), stats
    good = srv.sink.all_ids()
    good = good[good < 10_000_000]
    want = np.concatenate(sent)
    np.testing.assert_array_equal(np.sort(good), np.sort(want))  # every row, once
    st = srv.stats()
    assert bad["garbage"] >= GARBAGE and bad["huge_id"] >= HUGE_ID and bad["nan_rows"] >= 500
    assert st["bad_messages"] == bad["garbage"]
    assert srv.servicer.nonfinite["bps"] == bad["nan_rows"]  # each NaN counted, imputed
    assert st["rows_scored"] == st["rows_received"] == total + bad["nan_rows"]
    print(
        f"\nload: {AGENTS} agents x {STREAMS} streams, {total} good rows acknowledged in {elapsed:.1f} s "
        f"({total / elapsed:,.0f} rows/s) with {IDLE} idle streams, {bad['garbage']} garbage messages, "
        f"{bad['huge_id']} huge-id batches, {bad['nan_rows']} NaN rows; reconnects "
        f"{sum(s['reconnects'] for s in stats)}; RSS +{grown:.0f} MB"
    )
