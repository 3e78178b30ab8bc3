"""The agent after faults and careless use: kill -9 then restart, cleanup of one
interface while other agents run, an interface deleted and re-added, the exit code
of a run that delivered nothing, loopback-only endpoints, and the summary's `lost`."""

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from grpc_fixtures import free_port
from harness import MemorySink, flow_between, running_agent
from netns import _teardown, create_host, make_hosts, sh
from prometheus_client.parser import text_string_to_metric_families
from test_crosscheck import scapy_send
from xdpml.agent.pipeline import Agent, register_observables

from xdpml.config import AgentSettings, DatapathSettings, HarvestSettings, InterfaceSettings
from xdpml.datapath.loader import owner_alive, prog_name, xdp_state
from xdpml.errors import DataLoss
from xdpml.obs.telemetry import Telemetry, TelemetrySettings

pytestmark = [pytest.mark.root, pytest.mark.slow]
XDPML = str(Path(sys.executable).parent / "xdpml")
ATTACHED = re.compile(r" attached \S+ \((physical|veth|virtual)\): ")  # the loader's line per interface


def tc_filters(dev: str, direction: str) -> str:
    return sh(f"tc filter show dev {dev} {direction}", capture=True, check=False)


class Started:
    """An `xdpml agent` process whose log lines (stdout) are collected."""

    def __init__(self, *args: str, output: str = "/dev/null") -> None:
        self.p = subprocess.Popen(
            [XDPML, "agent", *args, "-o", output, "--summary-interval", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.p.stdout], daemon=True).start()
        want = sum(1 for a in args if a == "-i")
        if self.wait_for(ATTACHED, count=want) < want:
            self.p.kill()
            raise AssertionError("agent did not attach: " + "".join(self.seen) + self.p.stderr.read())

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait_for(self, pattern: re.Pattern, *, count: int = 1, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        n = sum(bool(pattern.search(x)) for x in self.seen)
        while n < count and time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.p.poll() is not None:
                    break
                continue
            self.seen.append(line)
            n += bool(pattern.search(line))
        return n

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        rc = self.p.wait(90)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return rc


def test_restart_after_kill_9_takes_over_its_own_attachments():
    with make_hosts(56) as (h,):
        first = Started("-i", h.host_if, "--hooks", "xdp+tc", "--xdp-mode", "generic")
        old_xdp = xdp_state(h.host_if)[0]
        os.kill(first.pid, signal.SIGKILL)
        first.p.wait(10)
        assert prog_name(xdp_state(h.host_if)[0]) == "xdpml_xdp"  # left attached by the dead agent
        second = Started("-i", h.host_if, "--hooks", "xdp+tc", "--xdp-mode", "generic")
        try:
            took = [x for x in second.seen if "took over" in x]
            assert len(took) == 1 and h.host_if in took[0] and f"program {old_xdp}" in took[0]
            new_xdp = xdp_state(h.host_if)[0]
            assert new_xdp != old_xdp and prog_name(new_xdp) == "xdpml_xdp"
            egress = tc_filters(h.host_if, "egress")
            # the new filter names its owner: the new datapath, whose id is its XDP program's
            assert egress.count("xdpml_tc_egress@") == 1 and f"xdpml_tc_egress@{new_xdp} " in egress
            assert owner_alive(new_xdp) == (True, second.pid) and owner_alive(old_xdp) == (False, 0)
        finally:
            assert second.stop() == 0
        assert xdp_state(h.host_if) == (0, "")
        assert "xdpml" not in tc_filters(h.host_if, "egress") + tc_filters(h.host_if, "ingress")


@pytest.fixture(scope="module")
def foreign_tc():
    from bcc import BPF

    b = BPF(text=b"int other_tc(struct __sk_buff *skb) { return -1; }")
    fn = b.load_func(b"other_tc", BPF.SCHED_CLS)
    yield fn
    b.cleanup()


def test_cleanup_of_one_interface_while_another_agent_runs(foreign_tc):
    from pyroute2 import IPRoute

    with make_hosts(57, 58) as (live, dead):
        with IPRoute() as ipr:  # another tool's filter beside ours on the interface to clean
            idx = ipr.link_lookup(ifname=dead.host_if)[0]
            ipr.tc("add", "clsact", idx)
            ipr.tc(
                "add-filter",
                "bpf",
                idx,
                ":1",
                fd=foreign_tc.fd,
                name="other_tc",
                prio=1,
                classid=1,
                direct_action=True,
                parent=0xFFFFFFF2,
            )
        running = Started("-i", live.host_if)
        try:
            killed = Started("-i", dead.host_if)
            os.kill(killed.pid, signal.SIGKILL)
            killed.p.wait(10)
            # a second agent may not take a live agent's interface
            r = subprocess.run(
                [XDPML, "agent", "-i", live.host_if, "-o", "/dev/null", "--duration", "1"],
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert r.returncode == 1
            assert f"another running xdpml agent (pid {running.pid})" in r.stdout
            r = subprocess.run([XDPML, "cleanup", "--interface", dead.host_if], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert f"removed {dead.host_if}: tc ingress filter" in r.stdout
            assert f"removed {dead.host_if}: tc egress filter" in r.stdout
            assert "xdpml" not in tc_filters(dead.host_if, "ingress") + tc_filters(dead.host_if, "egress")
            assert "other_tc" in tc_filters(dead.host_if, "ingress")
            r = subprocess.run([XDPML, "cleanup", "--interface", live.host_if], capture_output=True, text=True)
            assert r.returncode == 1 and f"pid {running.pid}" in r.stderr and "removed" not in r.stdout
            owner = int(re.search(r"xdpml_tc_egress@(\d+) ", tc_filters(live.host_if, "egress")).group(1))
            assert owner_alive(owner) == (True, running.pid)  # untouched, and its agent answers
            # From a PID namespace that cannot see the agent's process (a pod without hostPID):
            # still recognised as live through its abstract socket, and left alone.
            r = subprocess.run(
                ["unshare", "--pid", "--fork", "--mount-proc", XDPML, "cleanup", "--interface", live.host_if],
                capture_output=True,
                text=True,
            )
            assert r.returncode == 1 and "in a PID namespace not visible here" in r.stderr, r.stderr
            assert owner_alive(owner) == (True, running.pid)
            assert f"xdpml_tc_egress@{owner} " in tc_filters(live.host_if, "egress")
        finally:
            assert running.stop() == 0
        assert "xdpml" not in tc_filters(live.host_if, "egress") + tc_filters(live.host_if, "ingress")


def test_deleted_and_readded_interface_is_attached_again(caplog):
    caplog.set_level(logging.INFO, logger="xdpml.agent")
    with make_hosts(54) as (h,), running_agent([h.host_if]) as (agent, sink):
        old_index = agent.datapath.attachments[0].ifindex
        h.run(f"ping -c 2 -i 0.05 {h.host_ip}", capture=True)
        assert len(sink.wait_rows("flow", flow_between(h.ns_ip, h.host_ip, 1))) == 1
        _teardown(h)  # the veth pair and the namespace are gone...
        create_host(54)  # ...and back, with the same names and a new ifindex
        new_index = socket.if_nametoindex(h.host_if)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(a.ifindex == new_index for a in list(agent.datapath.attachments)):
            time.sleep(0.05)
        assert [a.ifindex for a in agent.datapath.attachments] == [new_index] != [old_index]
        assert "xdpml_tc_egress" in tc_filters(h.host_if, "egress")
        h.run(f"ping -c 3 -i 0.05 {h.host_ip}", capture=True)
        rows = sink.wait_rows(
            "flow", lambda r: flow_between(h.ns_ip, h.host_ip, 1)(r) and r["src2dst_packets"] == 3, count=1
        )
        assert len(rows) == 1 and rows[0]["dst2src_packets"] == 3 and rows[0]["interface"] == h.host_if
    text = caplog.text
    assert f"{h.host_if} was deleted (ifindex {old_index})" in text
    assert f"{h.host_if} is back (ifindex {new_index}): attached again" in text
    assert f"final: attached 1 of 1 interfaces ({h.host_if})" in text


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_summary_lost_equals_the_metric_and_xdp_on_a_veth_says_generic(caplog):
    caplog.set_level(logging.INFO)
    with make_hosts(55, ipv6=False) as (h,):
        tel = Telemetry.from_settings(
            TelemetrySettings(service_name="xdpml-agent", prometheus_port=0, prometheus_host="127.0.0.1")
        )
        settings = AgentSettings(
            interfaces=InterfaceSettings(names=[h.host_if], hooks="xdp"),
            datapath=DatapathSettings(flow_table_size=1024),
            harvest=HarvestSettings(idle_timeout_s=600, interval_s=0.2),
            summary_interval_s=0,
        )
        agent = Agent(settings, interfaces=[h.host_if], sinks=[MemorySink()], telemetry=tel)
        register_observables(tel, lambda: agent)
        try:
            agent.start(attach_timeout_s=90)
            assert agent.datapath.attachments[0].hooks == ["xdp:generic"]
            mac_h, mac_n = h.mac(False), h.mac(True)
            scapy_send(
                h,
                f"[Ether(src='{mac_n}', dst='{mac_h}')/IP(src='10.79.0.1', dst='10.79.0.2')"
                f"/UDP(sport=10000 + i, dport=53) for i in range(1100)]",
            )
            agent.stop()
            m = scrape(tel.prometheus_port)
        finally:
            agent.stop()
            tel.shutdown()
    kernel = agent.totals.kernel
    assert kernel["pkt_xdp"] == 1100
    lost_metric = sum(v for (name, _), v in m.items() if name == "xdpml_agent_lost_total")
    final = [r.getMessage() for r in caplog.records if r.getMessage().startswith("final: ")]
    assert len(final) == 1
    lost_summary = int(re.search(r"\| lost (\d+) \|", final[0]).group(1))
    assert lost_summary == lost_metric == kernel["flow_full"] + kernel["flow_busy"] >= 1100 - 1024
    assert m[("xdpml_agent_lost_total", (("source", "flow_table"),))] == lost_metric
    said = [r.getMessage() for r in caplog.records if "generic mode" in r.getMessage()]
    assert len(said) == 1 and h.host_if in said[0] and "--hooks tc" in said[0]


def _ready(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200:
                return True
        except urllib.error.HTTPError as exc:
            assert exc.code == 503  # not ready yet; anything else is a bug
        time.sleep(0.1)
    return False


def test_an_agent_that_delivered_nothing_exits_with_data_loss_and_serves_loopback_only(tmp_path):
    health, metrics, collector = free_port(), free_port(), free_port()  # nothing listens on the collector
    out = tmp_path / "local.jsonl"
    with make_hosts(59) as (h,):
        agent = Started(
            "-i",
            h.host_if,
            "--collector",
            f"127.0.0.1:{collector}",
            "-w",
            "2",
            "--health-port",
            str(health),
            "--metrics-port",
            str(metrics),
            output=str(out),
        )
        try:
            h.run(f"ping -c 3 -i 0.05 {h.host_ip}", capture=True)
            # ready once every interface is attached and the enforcement tables are set up,
            # which comes after the loader's per-interface lines: poll as a kubelet would
            assert _ready(health, 60)
            assert urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).status == 200
            for port in (health, metrics):  # standalone: not reachable from the test host's side
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((h.host_ip, port), timeout=5).close()
        finally:
            rc = agent.stop()
        stderr = agent.p.stderr.read()
    records = [json.loads(x) for x in out.read_text().splitlines()]
    flows = sum(r["record"] == "flow" for r in records)
    assert flows >= 1 and any(r["record"] == "window" for r in records)
    assert rc == DataLoss.exit_code
    # only the flows went to the collector (it scores flows); windows stayed local
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and f"grpc: 0 of {flows} rows delivered" in lines[0], stderr
