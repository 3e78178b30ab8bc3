"""Collector metrics on the Prometheus endpoint count what the server did."""

import urllib.request

import numpy as np
from conftest import PacketsModel, batch_with_ids
from prometheus_client.parser import text_string_to_metric_families
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
from xdpml.collector.server import CollectorServer, CollectorSettings

from xdpml.obs.telemetry import Telemetry, TelemetrySettings


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_collector_metrics():
    tel = Telemetry.from_settings(
        TelemetrySettings(service_name="xdpml-collector", prometheus_port=0, prometheus_host="127.0.0.1")
    )
    srv = CollectorServer(PacketsModel(), [], CollectorSettings(listen="127.0.0.1:0"), tel).start()
    try:
        batches = [batch_with_ids(300, i * 300, seed=i) for i in range(3)]
        want_flagged = sum(int(np.sum(b["bidirectional_packets"] / 100.0 >= 0.5)) for b in batches)
        with GrpcExporter(ExporterSettings(target=f"127.0.0.1:{srv.port}", flush_rows=300)) as ex:
            for b in batches:
                assert ex.put(b)
        m = scrape(tel.prometheus_port)
    finally:
        srv.stop(1)
        tel.shutdown()
    assert m[("xdpml_collector_rows_total", (("kind", "flow"),))] == 900
    assert m[("xdpml_collector_batches_total", (("kind", "flow"),))] >= 1
    assert m[("xdpml_collector_scored_total", (("model", "packets"),))] == 900
    flagged = m.get(("xdpml_collector_flagged_total", (("label", "anomaly"), ("model", "packets"))), 0)
    assert flagged == want_flagged
    assert m[("xdpml_collector_model_latency_seconds_count", (("model", "packets"),))] >= 1
