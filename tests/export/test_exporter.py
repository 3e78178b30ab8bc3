"""The gRPC exporter against a real collector on loopback."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import batch_with_ids, free_port
from grpc_health.v1 import health, health_pb2_grpc
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter

ROOT = Path(__file__).resolve().parents[2]


def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_every_row_received_exactly_once(collector):
    srv = collector()
    verdicts = []
    settings = ExporterSettings(
        target=f"127.0.0.1:{srv.port}",
        flush_rows=3000,
        flush_age_s=0.05,
        node_name="node-a",
        max_message_bytes=512 * 1024,
    )
    total = 0
    with GrpcExporter(settings, on_verdicts=verdicts.append) as ex:
        for i in range(40):
            n = 50 + 37 * i
            assert ex.put(batch_with_ids(n, total, seed=i))
            total += n
        # Different kinds and column sets travel as separate messages.
        ex.put(batch_with_ids(10, total, kind="synflood"))
        total += 10
        assert _wait(lambda: ex.stats()["sent_rows"] == total)
    st = ex.stats()
    ids = np.sort(srv.sink.all_ids())
    np.testing.assert_array_equal(ids, np.arange(total, dtype=np.uint64))
    assert st["produced_rows"] == st["sent_rows"] == total and st["dropped_rows"] == 0
    assert st["reconnects"] == 0 and st["sent_batches"] > 1  # 512 KiB messages force splits
    # The model flags rows with >= 50 packets; the collector sends those back.
    assert st["verdicts_received"] == srv.stats()["rows_flagged"] == sum(len(v.verdicts) for v in verdicts) > 0
    assert all(v.score >= 0.5 and v.label == "anomaly" for vb in verdicts for v in vb.verdicts)
    assert all(len(v.key.src_ip) == 16 for vb in verdicts for v in vb.verdicts)


def test_queue_full_drops_whole_batches_and_counts(tmp_path):
    port = free_port()  # nothing listens: every connection attempt fails
    settings = ExporterSettings(
        target=f"127.0.0.1:{port}",
        queue_max_bytes=1_000_000,
        flush_age_s=0.05,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    ex = GrpcExporter(settings)
    results = []
    t0 = time.perf_counter()
    for i in range(30):
        results.append(ex.put(batch_with_ids(500, i * 500)))
        assert ex.stats()["queue_bytes"] <= 1_000_000
    assert time.perf_counter() - t0 < 2.0  # put() never waits for the network
    assert not all(results) and any(results)
    time.sleep(0.5)
    st = ex.close(timeout_s=0.5)
    assert st["sent_rows"] == 0
    assert st["produced_rows"] == 15000 == st["sent_rows"] + st["dropped_rows"]
    assert st["stream_failures"] >= 1 and st["reconnects"] >= 1
    assert "UNAVAILABLE" in ex.last_error


def test_non_retryable_status_drops_in_flight_rows():
    # A gRPC server without the Collector service answers UNIMPLEMENTED: not retryable.
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        ex = GrpcExporter(ExporterSettings(target=f"127.0.0.1:{port}", flush_age_s=0.01, backoff_initial_s=0.05))
        ex.put(batch_with_ids(100, 0))
        assert _wait(lambda: ex.stats()["dropped_rows"] == 100)
        st = ex.close(1)
        assert st["sent_rows"] == 0 and st["produced_rows"] == 100 == st["dropped_rows"]
        assert "UNIMPLEMENTED" in ex.last_error
    finally:
        server.stop(0)


def _start_collector(port: int, tmp_path: Path, name: str) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xdpml",
            "collector",
            "--listen",
            f"127.0.0.1:{port}",
            "--baseline-rows",
            "200",
            "--state-dir",
            str(tmp_path / "state"),
            "--jsonl",
            str(tmp_path / f"{name}.jsonl"),
            "--no-verdicts",
        ],
        cwd=ROOT,
        stderr=log,
        stdout=log,
    )
    log.close()
    ready = _wait(
        lambda: (
            proc.poll() is not None or "xdpml collector: listening on port" in (tmp_path / f"{name}.log").read_text()
        ),
        30,
    )
    assert ready and proc.poll() is None, (tmp_path / f"{name}.log").read_text()
    return proc


def _ids_in(path: Path) -> set[int]:
    import json

    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.add(json.loads(line)["row_id"])
            except json.JSONDecodeError:  # last line cut by kill -9
                pass
    return out


@pytest.mark.slow
def test_collector_killed_and_restarted(tmp_path):
    port = free_port()
    first = _start_collector(port, tmp_path, "first")
    bound = 2_000_000
    settings = ExporterSettings(
        target=f"127.0.0.1:{port}", queue_max_bytes=bound, flush_age_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.3
    )
    ex = GrpcExporter(settings)
    next_id = 0
    max_queue = 0

    def produce(seconds: float) -> None:
        nonlocal next_id, max_queue
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ex.put(batch_with_ids(300, next_id, seed=next_id))
            next_id += 300
            max_queue = max(max_queue, ex.stats()["queue_bytes"])
            time.sleep(0.01)

    second = None
    try:
        produce(1.5)
        # the first acknowledgement waits for the collector to learn its baseline (seconds under load)
        assert _wait(lambda: ex.stats()["sent_rows"] > 0, 60)
        first.send_signal(signal.SIGKILL)
        first.wait()
        sent_before = ex.stats()["sent_rows"]
        produce(2.0)  # collector down: the queue fills, then whole batches drop
        assert ex.stats()["dropped_rows"] > 0
        second = _start_collector(port, tmp_path, "second")
        produce(1.5)
        assert _wait(lambda: ex.stats()["sent_rows"] > sent_before)
        st = ex.close(timeout_s=10)
    finally:
        for p in (first, second):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
    assert st["produced_rows"] == next_id
    assert st["sent_rows"] + st["dropped_rows"] == st["produced_rows"]
    assert st["reconnects"] >= 1 and st["pending_rows"] == 0
    assert max_queue <= bound
    # Every acknowledged row reached a collector's sink (written before the ack).
    received = _ids_in(tmp_path / "first.jsonl") | _ids_in(tmp_path / "second.jsonl")
    assert len(received) >= st["sent_rows"]
    assert received <= set(range(next_id))


class SlowModel:
    name, version, default_threshold, feature_names = "slow", "1", 2.0, ()

    def __init__(self, seconds):
        self.seconds = seconds

    def score(self, batch):
        time.sleep(self.seconds)
        from xdpml.collector.models import Scores

        return Scores(np.zeros(len(batch)))

    def close(self):
        pass


def test_close_respects_its_deadline_and_counts_what_is_left(collector):
    srv = collector(model=SlowModel(1.0))
    ex = GrpcExporter(ExporterSettings(target=f"127.0.0.1:{srv.port}", flush_age_s=0.01, max_message_bytes=64 * 1024))
    ex.put(batch_with_ids(1000, 0))  # ~10 messages, each taking the collector 1 s
    time.sleep(0.3)
    t = time.monotonic()
    st = ex.close(timeout_s=0.5)
    assert time.monotonic() - t < 2.0
    assert st["produced_rows"] == 1000 == st["sent_rows"] + st["dropped_rows"]
    assert st["dropped_rows"] > 0 and st["pending_rows"] == 0


def test_graceful_shutdown_acknowledges_every_batch_it_received(collector):
    srv = collector(model=SlowModel(0.2))
    ex = GrpcExporter(
        ExporterSettings(
            target=f"127.0.0.1:{srv.port}",
            flush_age_s=0.01,
            max_in_flight=4,
            max_message_bytes=64 * 1024,
            backoff_initial_s=0.05,
            backoff_max_s=0.1,
        )
    )
    ex.put(batch_with_ids(2000, 0))
    assert _wait(lambda: ex.stats()["sent_rows"] > 0)
    srv.stop(grace_s=10)
    received = srv.stats()["rows_received"]
    assert received < 2000  # stopped mid-stream
    time.sleep(0.3)
    st = ex.close(timeout_s=0.5)
    # Drained: every row the collector took in was scored and acknowledged before it left.
    assert st["sent_rows"] == received
    assert st["sent_rows"] + st["dropped_rows"] == st["produced_rows"] == 2000
    assert "UNAVAILABLE" in ex.last_error


def test_many_agents_at_once_get_their_own_verdicts(collector):
    from xdpml.wire.columns import ip_from_str, ip_to_str

    srv = collector()
    agents = []
    for k in range(4):
        got = []
        ex = GrpcExporter(
            ExporterSettings(target=f"127.0.0.1:{srv.port}", node_name=f"node-{k}", flush_age_s=0.02),
            on_verdicts=got.append,
        )
        agents.append((k, ex, got))
    expected = {}
    for k, ex, _ in agents:
        flagged = 0
        for j in range(5):
            b = batch_with_ids(300, (k * 5 + j) * 300, seed=k * 10 + j)
            b.columns["src_ip"] = np.array([ip_from_str(f"10.{k}.0.{i % 250 + 1}") for i in range(300)], dtype="S16")
            flagged += int((b["bidirectional_packets"] >= 50).sum())
            ex.put(b)
        expected[k] = flagged
    for k, ex, _ in agents:
        assert _wait(
            lambda ex=ex, k=k: ex.stats()["sent_rows"] == 1500 and ex.stats()["verdicts_received"] == expected[k]
        )
        ex.close(2)
    np.testing.assert_array_equal(np.sort(srv.sink.all_ids()), np.arange(4 * 1500, dtype=np.uint64))
    for k, _, got in agents:
        srcs = {ip_to_str(v.key.src_ip) for vb in got for v in vb.verdicts}
        assert srcs and all(s.startswith(f"10.{k}.0.") for s in srcs)
    assert srv.stats()["streams_total"] == 4
