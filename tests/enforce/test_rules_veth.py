"""Rules on a real veth with real traffic: the agent's TC programs, UDP packets sent
from a test namespace and counted by a receiving socket, and the drops counted by
the clsact qdisc (the kernel's own count, independent of xdpml's)."""

import pytest
from netns import make_hosts

from enforce.traffic import Receiver, qdisc_drops, send
from xdpml.datapath.rules import Rule

pytestmark = pytest.mark.root
PORT, SPORT, MARK_SPORT = 9468, 4468, 4469


@pytest.fixture(scope="module")
def veth_agent(enf_dp):
    """The session's compiled datapath, attached on TC both ways to a test host's veth."""
    with make_hosts(68, ipv6=False) as (h,):
        att = enf_dp.attach(h.host_if, hooks="tc", xdp_mode="auto")
        table = enf_dp.rule_table()
        rx = Receiver(h.host_ip, PORT)
        try:
            yield h, enf_dp, table, rx
        finally:
            table.maps.close()
            enf_dp.detach(att)
            rx.close()


def rule_for(h):
    return Rule(
        kind="exact", action="drop", ttl_s=300, src=h.ns_ip, dst=h.host_ip, src_port=SPORT, dst_port=PORT, proto=17
    )


def phase(h, rx, n, tag):
    drops = qdisc_drops(h.host_if)
    send(h, h.host_ip, PORT, n, sport=SPORT, tag=tag)
    send(h, h.host_ip, PORT, 1, sport=MARK_SPORT, tag="M")
    got = rx.take_until_marker()
    return len(got), qdisc_drops(h.host_if) - drops


def test_dry_run_then_enforce_then_kill_switch(veth_agent):
    h, dp, table, rx = veth_agent
    table.flush()
    table.set_mode("dry-run")
    table.add(rule_for(h))
    c0 = dp.counters()

    received, dropped = phase(h, rx, 40, "D")  # dry-run: everything arrives, counted as would-drop
    assert (received, dropped) == (40, 0)
    (row,) = table.rows()
    assert (row.hits, row.dropped) == (40, 40)

    table.set_mode("enforce")
    received, dropped = phase(h, rx, 60, "E")
    assert (received, dropped) == (0, 60)
    (row,) = table.rows()
    assert (row.hits, row.dropped) == (100, 100)

    table.set_kill(True)  # the very next packet passes
    received, dropped = phase(h, rx, 1, "K")
    assert (received, dropped) == (1, 0)
    table.set_kill(False)
    received, dropped = phase(h, rx, 5, "E")
    assert (received, dropped) == (0, 5)

    c1 = dp.counters()
    assert c1["enf_would_drop"] - c0["enf_would_drop"] == 40
    assert c1["enf_dropped"] - c0["enf_dropped"] == 65
    assert c1["enf_kill_passed"] - c0["enf_kill_passed"] == 1  # not the marker: no rule matches it
    table.flush()


def test_allowlisted_address_is_never_dropped(veth_agent):
    h, dp, table, rx = veth_agent
    table.flush()
    table.add(Rule(kind="src", action="drop", ttl_s=300, src=f"{h.ns_ip}/32"))
    table.set_allowlist([f"{h.host_ip}/32"])
    table.set_mode("enforce")
    try:
        received, dropped = phase(h, rx, 30, "A")
        assert (received, dropped) == (30, 0)
        assert table.rows()[0].hits == 0
    finally:
        table.set_allowlist([])
        table.flush()
        table.set_mode("dry-run")
