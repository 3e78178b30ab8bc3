"""Pass rules that keep their flows out of the export, on a real veth: the matched
flow's packets pass (the rule counts every one) and no record of it goes out; the
flow next to it is exported as before; a pass rule without the flag excludes nothing."""

import time

import pytest
from harness import MemorySink, flow_between
from netns import make_hosts
from xdpml.agent.pipeline import Agent

from enforce.traffic import send
from xdpml.config import AgentSettings, EnforceSettings, HarvestSettings, InterfaceSettings
from xdpml.datapath.rules import Rule
from xdpml.errors import ConfigError

pytestmark = [pytest.mark.root, pytest.mark.slow]


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def pass_rule(h, sport: int, *, no_export: bool = False) -> Rule:
    """A pass rule for the UDP flow from h's namespace, source port ``sport``, to port
    47200 of the node."""
    return Rule(
        kind="exact",
        action="pass",
        ttl_s=120,
        src=h.ns_ip,
        dst=h.host_ip,
        src_port=sport,
        dst_port=47200,
        proto=17,
        no_export=no_export,
    )


def test_no_export_pass_rule(tmp_path):
    with make_hosts(64, ipv6=False) as (h,):
        settings = AgentSettings(
            interfaces=InterfaceSettings(names=[h.host_if]),
            harvest=HarvestSettings(idle_timeout_s=1.0, interval_s=0.2, early_packets=0, early_ms=0),
            enforce=EnforceSettings(pin_dir=""),
            summary_interval_s=0,
        )
        sink = MemorySink()
        agent = Agent(settings, interfaces=[h.host_if], sinks=[sink]).start(attach_timeout_s=90)
        try:
            table = agent.datapath.rule_table()
            hidden = table.add(pass_rule(h, 47201, no_export=True))
            shown = table.add(pass_rule(h, 47202))
            send(h, h.host_ip, 47200, 25, sport=47201, tag="H")
            send(h, h.host_ip, 47200, 15, sport=47202, tag="S")
            send(h, h.host_ip, 47200, 5, sport=47203, tag="P")
            plain = flow_between(h.ns_ip, h.host_ip, 17, 47203)
            wait_for(lambda: sink.wait_rows("flow", plain, timeout=0.1))
            shown_rows = sink.wait_rows("flow", lambda r: r["src_port"] == 47202 and r["dst_port"] == 47200)
            assert [r["bidirectional_packets"] for r in shown_rows] == [15]
            assert [r["bidirectional_packets"] for r in sink.rows("flow") if plain(r)] == [5]
            # the hidden flow left the table (idle) without a record; its rule saw every packet
            wait_for(lambda: agent._harvester.stats_not_exported >= 1)
            assert not [r for r in sink.rows("flow") if r["src_port"] == 47201 or r["dst_port"] == 47201]
            rows = {r.slot: r for r in table.rows()}
            assert rows[hidden].hits == 25 and rows[hidden].no_export
            assert rows[shown].hits == 15 and not rows[shown].no_export
        finally:
            agent.stop()
        assert agent.error is None
    assert not [r for r in sink.rows("flow") if r["src_port"] == 47201]  # not at agent stop either


def test_only_pass_rules_can_hide_flows():
    with pytest.raises(ConfigError, match="only a pass rule"):
        Rule(kind="src", action="drop", ttl_s=5, src="10.0.0.0/8", no_export=True).validate()
