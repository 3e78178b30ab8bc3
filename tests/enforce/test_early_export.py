"""Early export on real veths: a flow's snapshot (expiration id 3) after K packets or
T ms, once per flow, only to the sinks that take early records; its final record
later, with every packet. Packet counts are the datagrams the test sent."""

import time

import pytest
from harness import MemorySink, flow_between
from netns import make_hosts
from xdpml.agent.pipeline import Agent

from enforce.traffic import send
from xdpml.config import AgentSettings, EnforceSettings, HarvestSettings, InterfaceSettings

pytestmark = [pytest.mark.root, pytest.mark.slow]
EARLY, IDLE, STOP = 3, 0, -1


class EarlySink(MemorySink):
    early = True  # as the collector sink: takes early snapshots too


def start(ifname: str, **harvest):
    settings = AgentSettings(
        interfaces=InterfaceSettings(names=[ifname]),
        harvest=HarvestSettings(**harvest),
        enforce=EnforceSettings(pin_dir=""),
        summary_interval_s=0,
    )
    early, local = EarlySink(), MemorySink()
    agent = Agent(settings, interfaces=[ifname], sinks=[early, local]).start(attach_timeout_s=90)
    return agent, early, local


def stop(agent):
    agent.stop()
    assert not agent.running
    if agent.error is not None:
        raise agent.error


def rows_of(sink, pred, expiration):
    return [r for r in sink.rows("flow") if pred(r) and r["expiration_id"] == expiration]


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def host():
    with make_hosts(61) as hosts:
        yield hosts[0]


def test_packet_trigger_snapshot_then_final(host):
    """K = 8: after exactly 8 datagrams the snapshot holds 8 packets; 12 more, then the
    idle timeout: the final record holds 20. The local sink never sees the snapshot."""
    agent, early, local = start(host.host_if, early_packets=8, early_ms=0, idle_timeout_s=1.5, interval_s=0.2)
    try:
        flow = flow_between(host.ns_ip, host.host_ip, 17, 47001)
        send(host, host.host_ip, 47001, 8, sport=47101, tag="E")
        wait_for(lambda: rows_of(early, flow, EARLY))
        snap = rows_of(early, flow, EARLY)
        assert [r["bidirectional_packets"] for r in snap] == [8]
        assert snap[0]["src2dst_packets"] == 8 and snap[0]["src_port"] == 47101
        send(host, host.host_ip, 47001, 12, sport=47101, tag="F")
        wait_for(lambda: rows_of(local, flow, IDLE))
        assert [r["bidirectional_packets"] for r in rows_of(local, flow, IDLE)] == [20]
        assert [r["bidirectional_packets"] for r in rows_of(early, flow, IDLE)] == [20]
        assert len(rows_of(early, flow, EARLY)) == 1  # one snapshot per flow
        assert not [r for r in local.rows("flow") if r["expiration_id"] == EARLY]
        assert agent.totals.early >= 1
    finally:
        stop(agent)


def test_age_trigger_in_the_kernel(host):
    """T = 300 ms, no packet trigger, no scan before the end (60 s interval): a packet
    arriving 300+ ms after the first makes the kernel send the notice; the snapshot
    holds all 3 packets. The final record (agent stop) holds the same 3."""
    agent, early, local = start(host.host_if, early_packets=0, early_ms=300, idle_timeout_s=60, interval_s=60)
    try:
        flow = flow_between(host.ns_ip, host.host_ip, 17, 47002)
        t0 = time.monotonic()
        send(host, host.host_ip, 47002, 2, sport=47102, tag="A")
        while time.monotonic() - t0 < 0.45:  # the traffic's own timing: the third packet comes late
            time.sleep(0.05)
        assert not rows_of(early, flow, EARLY)  # a quiet flow gets nothing before a scan
        send(host, host.host_ip, 47002, 1, sport=47102, tag="B")
        wait_for(lambda: rows_of(early, flow, EARLY))
        assert [r["bidirectional_packets"] for r in rows_of(early, flow, EARLY)] == [3]
        assert agent.datapath.counters()["early_sent"] >= 1
    finally:
        stop(agent)
    assert [r["bidirectional_packets"] for r in rows_of(local, flow, STOP)] == [3]
    assert len(rows_of(early, flow, EARLY)) == 1
    assert not [r for r in local.rows("flow") if r["expiration_id"] == EARLY]


def test_age_trigger_in_the_scan_once(host):
    """A quiet flow (2 packets, then nothing) gets its snapshot from the regular scan once
    it is T old; a packet after that makes the kernel send a notice too, which the agent
    recognises: still one snapshot. Final record at the idle timeout: 3 packets."""
    agent, early, local = start(host.host_if, early_packets=0, early_ms=300, idle_timeout_s=2.0, interval_s=0.2)
    try:
        flow = flow_between(host.ns_ip, host.host_ip, 17, 47003)
        send(host, host.host_ip, 47003, 2, sport=47103, tag="Q")
        wait_for(lambda: rows_of(early, flow, EARLY))
        assert [r["bidirectional_packets"] for r in rows_of(early, flow, EARLY)] == [2]
        sent_before = agent.datapath.counters()["early_sent"]
        send(host, host.host_ip, 47003, 1, sport=47103, tag="R")
        wait_for(lambda: agent.datapath.counters()["early_sent"] > sent_before)  # the kernel's notice
        wait_for(lambda: rows_of(local, flow, IDLE))
        assert [r["bidirectional_packets"] for r in rows_of(local, flow, IDLE)] == [3]
        assert len(rows_of(early, flow, EARLY)) == 1
    finally:
        stop(agent)


def test_early_off_compiles_out(host):
    """K = 0 and T = 0: no notices, no snapshots, flows as before."""
    agent, early, local = start(host.host_if, early_packets=0, early_ms=0, idle_timeout_s=1.0, interval_s=0.2)
    try:
        flow = flow_between(host.ns_ip, host.host_ip, 17, 47004)
        send(host, host.host_ip, 47004, 30, sport=47104, tag="O")
        wait_for(lambda: rows_of(local, flow, IDLE))
        assert [r["bidirectional_packets"] for r in rows_of(local, flow, IDLE)] == [30]
        assert not [r for r in early.rows("flow") if r["expiration_id"] == EARLY]
        assert agent.datapath.counters()["early_sent"] == 0
    finally:
        stop(agent)
