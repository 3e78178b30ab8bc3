"""A full flow table loses no packet silently: every packet that finds no room is
counted in the kernel's flow_full counter."""

import pytest
from harness import MemorySink
from netns import make_hosts
from test_crosscheck import scapy_send
from xdpml.agent.pipeline import Agent

from xdpml.config import AgentSettings, DatapathSettings, HarvestSettings, InterfaceSettings

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_flow_table_full_is_counted():
    with make_hosts(43, ipv6=False) as (h,):
        sink = MemorySink()
        settings = AgentSettings(
            interfaces=InterfaceSettings(names=[h.host_if]),
            datapath=DatapathSettings(flow_table_size=1024),
            harvest=HarvestSettings(idle_timeout_s=600, interval_s=0.2),
            summary_interval_s=0,
        )
        agent = Agent(settings, interfaces=[h.host_if], sinks=[sink]).start(attach_timeout_s=90)
        try:
            mac_h, mac_n = h.mac(False), h.mac(True)
            scapy_send(
                h,
                f"[Ether(src='{mac_n}', dst='{mac_h}')/IP(src='10.79.0.1', dst='10.79.0.2')"
                f"/UDP(sport=10000 + i, dport=53) for i in range(1100)]",
            )
            counters = agent.datapath.counters()
        finally:
            agent.stop()
    assert counters["pkt_tc_ingress"] == 1100
    assert counters["flow_new"] + counters["flow_full"] == 1100
    assert 900 <= counters["flow_new"] <= 1024 and counters["flow_full"] >= 76
    # at stop every flow that did get an entry is exported
    assert sum(1 for r in sink.rows("flow") if r["src_ip"] == "10.79.0.1") == counters["flow_new"]
