"""The agent's OpenTelemetry metrics on the Prometheus endpoint match what it did."""
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentSettings, HarvestSettings, InterfaceSettings
from agent.pipeline import Agent, register_observables
from harness import MemorySink, flow_between
from netns import make_hosts
from xdpml.telemetry import Telemetry, TelemetrySettings

pytestmark = [pytest.mark.root, pytest.mark.slow]


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_agent_metrics_on_prometheus_endpoint():
    with make_hosts(41) as (h,):
        tel = Telemetry.from_settings(TelemetrySettings(service_name="xdpml-agent", prometheus_port=0,
                                                        prometheus_host="127.0.0.1"))
        sink = MemorySink()
        agent = Agent(AgentSettings(interfaces=InterfaceSettings(names=[h.host_if]),
                                    harvest=HarvestSettings(idle_timeout_s=1, interval_s=0.2), summary_interval_s=0),
                      interfaces=[h.host_if], sinks=[sink], telemetry=tel)
        register_observables(tel, lambda: agent)
        agent.start(attach_timeout_s=90)
        try:
            h.run(f"ping -c 3 -i 0.05 -s 100 {h.host_ip}", capture=True)
            rows = sink.wait_rows("flow", flow_between(h.ns_ip, h.host_ip, 1))
            assert len(rows) == 1
            m = scrape(tel.prometheus_port)
            kernel = agent.datapath.counters()
        finally:
            agent.stop()
            tel.shutdown()
    iface = (("direction", "src2dst"), ("interface", h.host_if))
    flows_idle = m[("xdpml_agent_flows_total", (("reason", "idle"),))]
    assert flows_idle == len(sink.rows("flow")) >= 1
    assert m[("xdpml_agent_packets_total", iface)] == sum(r["src2dst_packets"] for r in sink.rows("flow"))
    assert m[("xdpml_agent_bytes_total", iface)] == sum(r["src2dst_bytes"] for r in sink.rows("flow"))
    assert m[("xdpml_agent_exported_total", (("kind", "flow"), ("sink", "MemorySink")))] == flows_idle
    seen = m[("xdpml_agent_kernel_events_total", (("kind", "pkt_tc_ingress"),))]
    assert 3 <= seen <= kernel["pkt_tc_ingress"]  # the 3 requests enter the host side; replies leave
    assert m[("xdpml_agent_kernel_events_total", (("kind", "pkt_tc_egress"),))] >= 3
    assert m[("xdpml_agent_attached", (("hook", "tc"), ("mode", "ingress")))] == 1
