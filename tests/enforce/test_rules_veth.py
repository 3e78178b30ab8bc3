"""Rules on a real veth with real traffic: the agent's TC programs, UDP packets sent
from a test namespace and counted by a receiving socket, and the drops counted by
the clsact qdisc (the kernel's own count, independent of xdpml's)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from agent.config import AgentSettings, DatapathSettings, EnforceSettings, HarvestSettings, InterfaceSettings
from agent.enforce.table import Rule
from agent.pipeline import Agent
from harness import MemorySink
from netns import make_hosts

pytestmark = pytest.mark.root
PORT, SPORT, MARK_SPORT = 9468, 4468, 4469


def send(host, dst, n, *, sport, tag):
    """n UDP datagrams from the namespace, payload tag + sequence number."""
    code = (f"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{host.ns_ip}', {sport}))\n"
            f"for i in range({n}): s.sendto(b'{tag}%06d' % i, ('{dst}', {PORT}))")
    host.run(f"{sys.executable} -c \"{code}\"")


def qdisc_drops(ifname: str) -> int:
    out = subprocess.run(["tc", "-s", "-j", "qdisc", "show", "dev", ifname], check=True, capture_output=True,
                         text=True).stdout
    return sum(q.get("drops", 0) for q in json.loads(out) if q.get("kind") == "clsact")


class Receiver:
    def __init__(self, ip):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.s.bind((ip, PORT))

    def take_until_marker(self, timeout=20.0) -> list[bytes]:
        """Everything received up to the marker datagram, which is sent after the packets
        under test on the same path: once it is here, they were all processed."""
        got = []
        self.s.settimeout(timeout)
        while True:
            data = self.s.recv(2048)
            if data.startswith(b"M"):
                return got
            got.append(data)


@pytest.fixture(scope="module")
def veth_agent(bpffs):
    with make_hosts(68, ipv6=False) as (h,):
        settings = AgentSettings(
            interfaces=InterfaceSettings(names=[h.host_if], hooks="tc"),
            datapath=DatapathSettings(first_n=0), harvest=HarvestSettings(idle_timeout_s=60, interval_s=0.5),
            enforce=EnforceSettings(pin_dir=os.path.join(bpffs, "veth")), summary_interval_s=0)
        agent = Agent(settings, interfaces=[h.host_if], sinks=[MemorySink()]).start(attach_timeout_s=120)
        table = agent.datapath.rule_table()
        rx = Receiver(h.host_ip)
        try:
            yield h, agent, table, rx
        finally:
            table.maps.close()
            agent.stop()
            rx.s.close()


def rule_for(h):
    return Rule(kind="exact", action="drop", ttl_s=300, src=h.ns_ip, dst=h.host_ip, src_port=SPORT, dst_port=PORT,
                proto=17)


def phase(h, rx, n, tag):
    drops = qdisc_drops(h.host_if)
    send(h, h.host_ip, n, sport=SPORT, tag=tag)
    send(h, h.host_ip, 1, sport=MARK_SPORT, tag="M")
    got = rx.take_until_marker()
    return len(got), qdisc_drops(h.host_if) - drops


def test_dry_run_then_enforce_then_kill_switch(veth_agent):
    h, agent, table, rx = veth_agent
    table.flush()
    table.set_mode("dry-run")
    table.add(rule_for(h))
    c0 = agent.datapath.counters()

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

    c1 = agent.datapath.counters()
    assert c1["enf_would_drop"] - c0["enf_would_drop"] == 40
    assert c1["enf_dropped"] - c0["enf_dropped"] == 65
    assert c1["enf_kill_passed"] - c0["enf_kill_passed"] == 2  # the packet and its marker
    table.flush()


def test_allowlisted_address_is_never_dropped(veth_agent):
    h, agent, table, rx = veth_agent
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
