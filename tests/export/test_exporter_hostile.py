"""The exporter against collectors that misbehave: one that takes the stream but never
reads it, and one that sends verdicts with an Action value this agent does not know."""

import logging
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from conftest import PacketsModel, RecordingSink, batch_with_ids
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
from xdpml.agent.export.verdicts import verdict_counter
from xdpml.collector.server import CollectorServicer, CollectorSettings

from xdpml.wire.v1 import collector_pb2 as cpb
from xdpml.wire.v1 import collector_pb2_grpc as cgrpc


def _wait(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


class FirstStreamNeverReads(cgrpc.CollectorServicer):
    """The first Export stream is accepted and then ignored (never read, never answered)
    until the client gives up on it; later streams go to a real collector servicer."""

    def __init__(self, real: CollectorServicer) -> None:
        self.real = real
        self.streams = 0
        self.lock = threading.Lock()

    def Export(self, request_iterator, context):
        with self.lock:
            self.streams += 1
            first = self.streams == 1
        if first:
            gone = threading.Event()
            context.add_callback(gone.set)  # runs when the client cancels the stream
            gone.wait(60)
            return
        yield from self.real.Export(request_iterator, context)


def _server(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(8))
    cgrpc.add_CollectorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_a_collector_that_never_reads_is_left_after_the_ack_deadline(caplog):
    sink = RecordingSink()
    real = CollectorServicer(PacketsModel(), [sink], CollectorSettings())
    fake = FirstStreamNeverReads(real)
    server, port = _server(fake)
    caplog.set_level(logging.WARNING, logger="xdpml.agent.export.grpc_client")
    try:
        ex = GrpcExporter(
            ExporterSettings(
                target=f"127.0.0.1:{port}",
                flush_age_s=0.02,
                ack_timeout_s=1.0,
                max_message_bytes=64 * 1024,
                backoff_initial_s=0.05,
            )
        )
        total = 0
        for i in range(4):
            ex.put(batch_with_ids(500, total, seed=i))
            total += 500
        assert _wait(lambda: ex.stats()["sent_rows"] == total), ex.stats()
        st = ex.close(5)
    finally:
        server.stop(0)
    assert fake.streams == 2
    assert st["ack_timeouts"] == 1 and st["reconnects"] == 1
    assert st["produced_rows"] == st["sent_rows"] == total and st["dropped_rows"] == 0
    # The messages the silent stream held were sent again, each row delivered once.
    np.testing.assert_array_equal(np.sort(sink.all_ids()), np.arange(total, dtype=np.uint64))
    said = [
        r.getMessage()
        for r in caplog.records
        if "no acknowledgement for" in r.getMessage() and "reconnecting" in r.getMessage()
    ]
    assert len(said) == 1 and "messages in flight" in said[0]


def test_rows_lost_while_a_collector_sits_on_the_stream_are_counted_and_said():
    # Nothing but the silent stream: the bounded queue overflows meanwhile; every row is accounted for.
    class NeverReads(cgrpc.CollectorServicer):
        def Export(self, request_iterator, context):
            gone = threading.Event()
            context.add_callback(gone.set)
            gone.wait(60)
            return
            yield  # a generator, like the real handler

    server, port = _server(NeverReads())
    try:
        ex = GrpcExporter(
            ExporterSettings(
                target=f"127.0.0.1:{port}",
                flush_age_s=0.02,
                ack_timeout_s=0.5,
                queue_max_bytes=300_000,
                max_message_bytes=64 * 1024,
                backoff_initial_s=0.05,
                backoff_max_s=0.1,
            )
        )
        results = [ex.put(batch_with_ids(300, i * 300, seed=i)) for i in range(20)]
        assert _wait(lambda: ex.stats()["ack_timeouts"] >= 2)
        st = ex.close(0.5)
    finally:
        server.stop(0)
    assert not all(results)
    assert st["produced_rows"] == 6000 == st["sent_rows"] + st["dropped_rows"] and st["sent_rows"] == 0
    assert st["dropped_rows"] == 6000 and st["pending_rows"] == 0
    assert st["reconnects"] >= 2
    assert "no acknowledgement for" in ex.last_error


class UnknownActions(cgrpc.CollectorServicer):
    """Acknowledges every batch and answers with verdicts, one of them an unknown Action."""

    ACTIONS = (cpb.ACTION_ALERT, 99, cpb.ACTION_DROP)

    def Export(self, request_iterator, context):
        for req in request_iterator:
            seq = req.batch.sequence
            yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, rows_accepted=1))
            yield cpb.ExportResponse(
                verdicts=cpb.VerdictBatch(
                    sequence=seq,
                    model=cpb.ModelInfo(name="hostile", version="1"),
                    threshold=0.5,
                    verdicts=[
                        cpb.Verdict(row=i, score=1.0, label="anomaly", action=a) for i, a in enumerate(self.ACTIONS)
                    ],
                )
            )


class RecordingTelemetry:
    def __init__(self):
        self.added: list[tuple[str, int, dict]] = []

    def counter(self, name):
        outer = self

        class C:
            def add(self, n, attrs):
                outer.added.append((name, n, dict(attrs)))

        return C()


def test_unknown_action_values_are_counted_and_skipped_the_rest_applied(caplog):
    server, port = _server(UnknownActions())
    telemetry = RecordingTelemetry()
    counted = verdict_counter(telemetry)
    got = []

    def on_verdicts(vb):
        got.append(vb)
        counted(vb)

    caplog.set_level(logging.INFO)
    try:
        ex = GrpcExporter(ExporterSettings(target=f"127.0.0.1:{port}", flush_age_s=0.02), on_verdicts=on_verdicts)
        ex.put(batch_with_ids(10, 0))
        assert _wait(lambda: ex.stats()["verdict_batches"] == 1)
        st = ex.close(2)
    finally:
        server.stop(0)
    assert st["sent_rows"] == 10
    assert st["verdicts_received"] == 2 and st["verdicts_unknown_action"] == 1
    assert [[v.action for v in vb.verdicts] for vb in got] == [[cpb.ACTION_ALERT, cpb.ACTION_DROP]]
    assert sorted((a["action"], n) for name, n, a in telemetry.added if name == "xdpml.agent.verdicts") == [
        ("action_alert", 1),
        ("action_drop", 1),
    ]
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text
    assert any("unknown action skipped" in r.getMessage() for r in caplog.records)
