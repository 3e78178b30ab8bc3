"""The Prometheus scrape endpoint serves text that prometheus_client's own parser reads."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xdpml.obs.telemetry import METRICS, Telemetry, TelemetryError, TelemetrySettings

ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(body)}


def samples(family) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def test_scrape_names_types_and_values():
    settings = TelemetrySettings(service_name="xdpml-collector", prometheus_port=0, prometheus_host="127.0.0.1")
    with Telemetry.from_settings(settings) as tel:
        tel.counter("xdpml.collector.batches").add(3, {"kind": "flow"})
        tel.counter("xdpml.collector.flagged").add(2, {"model": "iforest", "label": "anomaly"})
        tel.counter("xdpml.agent.bytes").add(1500, {"interface": "eth0", "direction": "src2dst"})
        tel.histogram("xdpml.collector.model.latency").record(0.02, {"model": "iforest"})
        tel.histogram("xdpml.collector.model.latency").record(0.2, {"model": "iforest"})
        tel.up_down_counter("xdpml.collector.agents").add(1)
        depth = [4]
        tel.observe_gauge("xdpml.agent.queue.depth", lambda: {"grpc": depth[0]})
        fams = scrape(tel.prometheus_port)
        # parser strips _total from counter family names
        assert fams["xdpml_collector_batches"].type == "counter"
        assert samples(fams["xdpml_collector_batches"]) == {("xdpml_collector_batches_total", (("kind", "flow"),)): 3.0}
        assert samples(fams["xdpml_collector_flagged"]) == {
            ("xdpml_collector_flagged_total", (("label", "anomaly"), ("model", "iforest"))): 2.0
        }
        assert fams["xdpml_agent_bytes"].type == "counter"
        h = fams["xdpml_collector_model_latency_seconds"]
        assert h.type == "histogram"
        s = samples(h)
        lab = (("model", "iforest"),)
        assert s[("xdpml_collector_model_latency_seconds_count", lab)] == 2
        assert s[("xdpml_collector_model_latency_seconds_sum", lab)] == pytest.approx(0.22)
        assert s[("xdpml_collector_model_latency_seconds_bucket", (("le", "0.01"), ("model", "iforest")))] == 0
        assert s[("xdpml_collector_model_latency_seconds_bucket", (("le", "0.025"), ("model", "iforest")))] == 1
        assert s[("xdpml_collector_model_latency_seconds_bucket", (("le", "0.25"), ("model", "iforest")))] == 2
        assert fams["xdpml_collector_agents"].type == "gauge"
        assert samples(fams["xdpml_collector_agents"]) == {("xdpml_collector_agents", ()): 1.0}
        assert samples(fams["xdpml_agent_queue_depth"]) == {("xdpml_agent_queue_depth", (("queue", "grpc"),)): 4.0}
        # the callback is read at every scrape, not cached
        depth[0] = 9
        assert samples(scrape(tel.prometheus_port)["xdpml_agent_queue_depth"]) == {
            ("xdpml_agent_queue_depth", (("queue", "grpc"),)): 9.0
        }
        info = samples(fams["target_info"])  # target_info carries the resource
        assert any(dict(k[1]).get("service_name") == "xdpml-collector" for k in info)
        port = tel.prometheus_port
    # the endpoint is gone after shutdown
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_two_instances_in_one_process_do_not_share_series():
    s = TelemetrySettings(prometheus_port=0, prometheus_host="127.0.0.1")
    with Telemetry.from_settings(s) as a, Telemetry.from_settings(s) as b:
        a.counter("xdpml.agent.flows").add(5, {"reason": "idle"})
        b.counter("xdpml.agent.flows").add(1, {"reason": "fin"})
        assert samples(scrape(a.prometheus_port)["xdpml_agent_flows"]) == {
            ("xdpml_agent_flows_total", (("reason", "idle"),)): 5.0
        }
        assert samples(scrape(b.prometheus_port)["xdpml_agent_flows"]) == {
            ("xdpml_agent_flows_total", (("reason", "fin"),)): 1.0
        }


def test_port_in_use_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TelemetryError, match=f"cannot serve metrics on 127.0.0.1:{port}.*--metrics-port"):
            Telemetry.from_settings(TelemetrySettings(prometheus_port=port, prometheus_host="127.0.0.1"))


def test_noop_mode_accepts_everything_and_serves_nothing():
    tel = Telemetry.from_settings(TelemetrySettings())
    assert tel.noop and tel.prometheus_port is None
    tel.counter("xdpml.agent.packets").add(1, {"interface": "x", "direction": "src2dst"})
    tel.histogram("xdpml.agent.batch.latency").record(1.0)
    tel.up_down_counter("xdpml.collector.agents").add(-1)
    tel.observe_gauge("xdpml.agent.queue.depth", lambda: 1)
    assert tel.force_flush()
    tel.shutdown()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.counter("xdpml.agent.nonsense"), "unknown metric 'xdpml.agent.nonsense'"),
        (lambda t: t.counter("xdpml.agent.batch.latency"), "is a histogram, not a counter"),
        (lambda t: t.histogram("xdpml.agent.packets"), "is a counter, not a histogram"),
        (lambda t: t.observe_gauge("xdpml.agent.kernel.events", lambda: 1), "not a observable_gauge"),
    ],
)
def test_misuse_is_rejected_even_in_noop_mode(call, message):
    with pytest.raises(TelemetryError, match=message):
        call(Telemetry.noop_instance())


def test_same_instrument_object_is_returned():
    tel = Telemetry.noop_instance()
    assert tel.counter("xdpml.agent.packets") is tel.counter("xdpml.agent.packets")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prometheus_port": 70000}, "metrics port must be 0..65535"),
        ({"otlp_endpoint": "a:1", "otlp_interval_s": 0}, "export interval"),
        ({"service_name": "", "prometheus_port": 0}, "service name"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(TelemetryError, match=message):
        Telemetry.from_settings(TelemetrySettings(**kwargs))


def _prom_name(spec) -> str:
    """Independent statement of the Prometheus naming rule documented in docs/metrics.md."""
    name = spec.name.replace(".", "_")
    if spec.unit == "s":
        name += "_seconds"
    if spec.kind in ("counter", "observable_counter"):
        name += "_total"
    return name


def test_docs_list_exactly_the_declared_metrics():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(xdpml\.[a-z_.]+)` ", doc, re.M))
    assert documented == set(METRICS), (
        f"undocumented: {sorted(set(METRICS) - documented)}; "
        f"documented but not declared: {sorted(documented - set(METRICS))}"
    )
    for spec in METRICS.values():
        row = re.search(rf"^\| `{re.escape(spec.name)}` .*$", doc, re.M).group(0)
        assert f"`{_prom_name(spec)}`" in row, f"{spec.name}: Prometheus name missing from docs row"
        assert f"`{spec.unit}`" in row, f"{spec.name}: unit missing from docs row"
        for a in spec.attributes:
            assert f"`{a}`" in row, f"{spec.name}: attribute {a} missing from docs row"


def test_every_declared_metric_appears_in_a_scrape_with_the_documented_name():
    with Telemetry.from_settings(TelemetrySettings(prometheus_port=0, prometheus_host="127.0.0.1")) as tel:
        for spec in METRICS.values():
            a = {k: "x" for k in spec.attributes}
            if spec.kind == "counter":
                tel.counter(spec.name).add(1, a)
            elif spec.kind == "up_down_counter":
                tel.up_down_counter(spec.name).add(1, a)
            elif spec.kind == "histogram":
                tel.histogram(spec.name).record(0.1, a)
            elif spec.kind == "observable_gauge":
                tel.observe_gauge(spec.name, lambda a=a: [(1, a)])
            else:
                tel.observe_counter(spec.name, lambda a=a: [(1, a)])
        body = urllib.request.urlopen(f"http://127.0.0.1:{tel.prometheus_port}/metrics").read().decode()
    names = {s.name for f in text_string_to_metric_families(body) for s in f.samples}
    for spec in METRICS.values():
        want = _prom_name(spec) + ("_count" if spec.kind == "histogram" else "")
        assert want in names, f"{spec.name} -> expected {want}"
