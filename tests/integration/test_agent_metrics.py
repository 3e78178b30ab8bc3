"""The agent's OpenTelemetry metrics on the Prometheus endpoint match what it did."""

import urllib.request

import pytest
from harness import MemorySink, flow_between
from netns import make_hosts
from prometheus_client.parser import text_string_to_metric_families
from xdpml.agent.pipeline import Agent, register_observables

from xdpml.config import AgentSettings, HarvestSettings, InterfaceSettings
from xdpml.obs.telemetry import Telemetry, TelemetrySettings

pytestmark = [pytest.mark.root, pytest.mark.slow]


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_agent_metrics_on_prometheus_endpoint():
    # IPv6 stays on: a fresh veth sends neighbour discovery / MLD packets of its own, and
    # those background flows must be counted like any other, not hidden.
    with make_hosts(41) as (h,):
        tel = Telemetry.from_settings(
            TelemetrySettings(service_name="xdpml-agent", prometheus_port=0, prometheus_host="127.0.0.1")
        )
        sink = MemorySink()
        agent = Agent(
            AgentSettings(
                interfaces=InterfaceSettings(names=[h.host_if]),
                harvest=HarvestSettings(idle_timeout_s=1, interval_s=0.2),
                summary_interval_s=0,
            ),
            interfaces=[h.host_if],
            sinks=[sink],
            telemetry=tel,
        )
        register_observables(tel, lambda: agent)
        agent.start(attach_timeout_s=90)
        try:
            h.run(f"ping -c 3 -i 0.05 -s 100 {h.host_ip}", capture=True)
            rows = sink.wait_rows("flow", flow_between(h.ns_ip, h.host_ip, 1))
            assert len(rows) == 1
            # one more flow, still in the table when the agent stops (or idled out just before)
            h.run(f"bash -c 'echo x > /dev/udp/{h.host_ip}/9'", capture=True)
            live = scrape(tel.prometheus_port)  # gauges and kernel counters need the running datapath
            kernel = agent.datapath.counters()
        finally:
            agent.stop()
        try:
            # The agent has stopped: every flow is exported and no counter moves any more, so the
            # cumulative metrics and the rows describe the same moment.
            m = scrape(tel.prometheus_port)
        finally:
            tel.shutdown()
    all_rows = sink.rows("flow")
    assert len(all_rows) >= 2  # the ping flow, the UDP flow, and whatever the host sent itself
    assert any(r["protocol"] == 17 and r["dst_port"] == 9 for r in all_rows)
    reason = {0: "idle", 1: "active", 2: "tcp_end", -1: "agent_stop"}  # docs/features.md, expiration_id
    by_reason: dict[str, int] = {}
    for r in all_rows:
        by_reason[reason[r["expiration_id"]]] = by_reason.get(reason[r["expiration_id"]], 0) + 1
    metric_by_reason = {
        dict(labels)["reason"]: v for (name, labels), v in m.items() if name == "xdpml_agent_flows_total"
    }
    assert metric_by_reason == by_reason
    iface = (("direction", "src2dst"), ("interface", h.host_if))
    assert m[("xdpml_agent_packets_total", iface)] == sum(r["src2dst_packets"] for r in all_rows)
    assert m[("xdpml_agent_bytes_total", iface)] == sum(r["src2dst_bytes"] for r in all_rows)
    assert m[("xdpml_agent_exported_total", (("kind", "flow"), ("sink", "MemorySink")))] == len(all_rows)
    seen = live[("xdpml_agent_kernel_events_total", (("kind", "pkt_tc_ingress"),))]
    assert 3 <= seen <= kernel["pkt_tc_ingress"]  # the 3 requests enter the host side; replies leave
    assert live[("xdpml_agent_kernel_events_total", (("kind", "pkt_tc_egress"),))] >= 3
    assert live[("xdpml_agent_attached", (("hook", "tc"), ("mode", "ingress")))] == 1
