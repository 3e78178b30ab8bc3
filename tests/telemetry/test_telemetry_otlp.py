"""Metrics reach a real OTLP gRPC receiver on loopback (MetricsService from opentelemetry-proto)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

from xdpml.obs.telemetry import Telemetry, TelemetryError, TelemetrySettings


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Keeps every ExportMetricsServiceRequest it gets."""

    def __init__(self) -> None:
        self.requests: list = []
        self.got = threading.Event()
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            self.requests.append(request)
        self.got.set()
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def metrics(self) -> dict:
        """name -> (Metric, resource attributes) from the most recent request holding it."""
        out = {}
        with self.lock:
            for req in self.requests:
                for rm in req.resource_metrics:
                    res = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            out[m.name] = (m, res)
        return out


@pytest.fixture
def receiver():
    rec = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rec.port = port
    yield rec
    server.stop(grace=None)


def attrs(point) -> dict:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def test_flush_delivers_every_instrument_kind(receiver):
    settings = TelemetrySettings(
        service_name="xdpml-agent",
        otlp_endpoint=f"127.0.0.1:{receiver.port}",
        otlp_interval_s=3600,
        resource_attributes={"k8s.node.name": "node-a"},
    )
    with Telemetry.from_settings(settings) as tel:
        assert not tel.noop
        pk = tel.counter("xdpml.agent.packets")
        pk.add(100, {"interface": "eth0", "direction": "src2dst"})
        pk.add(23, {"interface": "eth0", "direction": "src2dst"})
        pk.add(7, {"interface": "eth0", "direction": "dst2src"})
        lat = tel.histogram("xdpml.agent.batch.latency")
        for v in (0.0004, 0.003, 0.003, 2.0):
            lat.record(v, {"sink": "grpc"})
        agents = tel.up_down_counter("xdpml.collector.agents")
        agents.add(3)
        agents.add(-1)
        tel.observe_gauge("xdpml.agent.queue.depth", lambda: [(5, {"queue": "grpc"})])
        tel.observe_counter("xdpml.agent.kernel.events", lambda: {"err_bad_ihl": 11, "flow_full": 2})
        assert tel.force_flush(timeout_s=10)

    got = receiver.metrics()
    m, res = got["xdpml.agent.packets"]
    assert res["service.name"] == "xdpml-agent" and res["k8s.node.name"] == "node-a"
    assert m.unit == "{packet}" and m.sum.is_monotonic
    by_dir = {attrs(p)["direction"]: p.as_int for p in m.sum.data_points}
    assert by_dir == {"src2dst": 123, "dst2src": 7}

    m, _ = got["xdpml.agent.batch.latency"]
    (p,) = m.histogram.data_points
    assert m.unit == "s" and p.count == 4 and p.sum == pytest.approx(2.0064)
    assert list(p.explicit_bounds)[:3] == [0.0005, 0.001, 0.0025]
    # 0.0004 -> first bucket (<=0.0005); 0.003 x2 -> (0.0025, 0.005]; 2.0 -> (1.0, 2.5]
    bounds = list(p.explicit_bounds)
    expected = [0] * (len(bounds) + 1)
    expected[0] = 1
    expected[bounds.index(0.005)] = 2
    expected[bounds.index(2.5)] = 1
    assert list(p.bucket_counts) == expected

    m, _ = got["xdpml.collector.agents"]
    assert not m.sum.is_monotonic and m.sum.data_points[0].as_int == 2

    m, _ = got["xdpml.agent.queue.depth"]
    (p,) = m.gauge.data_points
    assert attrs(p) == {"queue": "grpc"} and p.as_int == 5

    m, _ = got["xdpml.agent.kernel.events"]
    assert m.sum.is_monotonic
    assert {attrs(p)["kind"]: p.as_int for p in m.sum.data_points} == {"err_bad_ihl": 11, "flow_full": 2}


def test_periodic_reader_pushes_without_flush(receiver):
    settings = TelemetrySettings(otlp_endpoint=f"http://127.0.0.1:{receiver.port}", otlp_interval_s=0.2)
    tel = Telemetry.from_settings(settings)
    try:
        tel.counter("xdpml.collector.rows").add(42, {"kind": "flow"})
        assert receiver.got.wait(timeout=10), "no periodic OTLP export within 10 s"
        deadline = time.monotonic() + 10
        while "xdpml.collector.rows" not in receiver.metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
        m, res = receiver.metrics()["xdpml.collector.rows"]
        assert m.sum.data_points[0].as_int == 42 and res["service.name"] == "xdpml"
    finally:
        tel.shutdown()


def test_shutdown_flushes_last_values(receiver):
    settings = TelemetrySettings(otlp_endpoint=f"127.0.0.1:{receiver.port}", otlp_interval_s=3600)
    tel = Telemetry.from_settings(settings)
    tel.counter("xdpml.agent.verdicts").add(9, {"label": "anomaly", "action": "none"})
    tel.shutdown()
    tel.shutdown()  # idempotent
    m, _ = receiver.metrics()["xdpml.agent.verdicts"]
    (p,) = m.sum.data_points
    assert p.as_int == 9 and attrs(p) == {"label": "anomaly", "action": "none"}


def test_failing_callback_does_not_block_other_metrics(receiver, caplog):
    settings = TelemetrySettings(otlp_endpoint=f"127.0.0.1:{receiver.port}", otlp_interval_s=3600)
    with Telemetry.from_settings(settings) as tel:
        tel.observe_gauge("xdpml.agent.queue.depth", lambda: 1 / 0)
        tel.counter("xdpml.agent.reconnects").add(1, {"code": "UNAVAILABLE"})
        assert tel.force_flush()
    got = receiver.metrics()
    assert got["xdpml.agent.reconnects"][0].sum.data_points[0].as_int == 1
    assert "xdpml.agent.queue.depth" not in got
    assert "metric callback for xdpml.agent.queue.depth failed" in caplog.text


@pytest.mark.parametrize(
    "endpoint, message",
    [
        ("otel-collector", "not HOST:PORT"),
        ("grpc://otel:4317", "scheme must be"),
        ("otel:99999", "not HOST:PORT"),
        ("otel:", "not HOST:PORT"),
    ],
)
def test_bad_endpoint_is_a_clear_error(endpoint, message):
    with pytest.raises(TelemetryError, match=message):
        Telemetry.from_settings(TelemetrySettings(otlp_endpoint=endpoint))


def test_https_endpoint_with_unreadable_ca_is_a_clear_error(tmp_path):
    s = TelemetrySettings(otlp_endpoint="https://otel:4317", otlp_ca_file=str(tmp_path / "nope.pem"))
    with pytest.raises(TelemetryError, match="cannot read OTLP CA file"):
        Telemetry.from_settings(s)


def _make_ca_and_server_cert(tmp_path):
    """A throwaway CA and a server certificate for 'localhost', written as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xdpml test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca_file, cert.public_bytes(pem), key_pem


def test_https_endpoint_verifies_the_receiver_with_the_ca_file(tmp_path):
    ca_file, cert_pem, key_pem = _make_ca_and_server_cert(tmp_path)
    rec = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(rec, server)
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    server.start()
    try:
        # trusted CA: delivered
        s = TelemetrySettings(
            otlp_endpoint=f"https://localhost:{port}", otlp_ca_file=str(ca_file), otlp_interval_s=3600, otlp_timeout_s=5
        )
        with Telemetry.from_settings(s) as tel:
            tel.counter("xdpml.collector.errors").add(4, {"kind": "malformed"})
            assert tel.force_flush(timeout_s=10)
        assert receiver_value(rec, "xdpml.collector.errors") == 4
        # plaintext against the TLS port: nothing arrives
        rec.requests.clear()
        s = TelemetrySettings(otlp_endpoint=f"localhost:{port}", otlp_interval_s=3600, otlp_timeout_s=1)
        with Telemetry.from_settings(s) as tel:
            tel.counter("xdpml.collector.errors").add(1, {"kind": "model"})
            tel.force_flush(timeout_s=3)
        assert rec.requests == []
    finally:
        server.stop(grace=None)


def receiver_value(rec: Receiver, name: str) -> int:
    m, _ = rec.metrics()[name]
    return sum(p.as_int for p in m.sum.data_points)
