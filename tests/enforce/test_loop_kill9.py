"""The whole loop, then the agent killed with -9.

A real `xdpml agent` process on a test veth exports flows over mutual TLS to a real
collector that suggests DROP for every flow of 50 packets or more. A burst to an
address that is not the node's becomes a rule and the following packets are dropped
(counted by the clsact qdisc); the same burst to the node's own address is refused
(allowlisted). Then the agent is killed with SIGKILL: its pinned rule keeps dropping
until its expiry and not one packet after it, with nobody left to delete it."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from grpc_fixtures import PacketsModel
from netns import make_hosts, sh
from xdpml.collector.server import CollectorServer, CollectorSettings

from enforce.traffic import Receiver, qdisc_drops, send
from xdpml.datapath.pins import open_pinned
from xdpml.datapath.rules import RuleTable
from xdpml.lab import make_certs
from xdpml.wire.tls import ServerTls

pytestmark = pytest.mark.root
HOST = 70
PORT, MARK_PORT = 9, 9470
FLOOD_SPORT, NODE_SPORT, MARK_SPORT = 4470, 4471, 4472
RULE_TTL = 15.0


class LogWatch:
    def __init__(self, stream):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                hit = next((ln for ln in self.lines if text in ln), None)
                if hit or time.monotonic() > end:
                    return hit or ""
                self.cond.wait(timeout=0.5)


def wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_verdicts_become_rules_that_outlive_a_killed_agent(tmp_path, bpffs):
    pem = make_certs(tmp_path, server_name="collector.test")
    ca_pem, server, client = pem["ca"], (pem["server"], pem["server_key"]), (pem["client"], pem["client_key"])
    pin_dir = os.path.join(bpffs, "loop")
    settings = CollectorSettings(
        listen="127.0.0.1:0", tls=ServerTls(*server, client_ca_file=ca_pem), action="drop", threshold=0.5
    )
    with make_hosts(HOST, ipv6=False) as (h,), CollectorServer(PacketsModel(), [], settings) as srv:
        outside = f"{h.ns_ip.rsplit('.', 1)[0]}.99"  # not an address of this node
        h.run(f"ip neigh replace {outside} lladdr {h.mac(False)} dev eth0")
        xdpml = str(Path(sys.executable).with_name("xdpml"))
        proc = subprocess.Popen(
            [
                xdpml,
                "agent",
                "-i",
                h.host_if,
                "--hooks",
                "tc",
                "--first-n",
                "0",
                "-o",
                "/dev/null",
                "--collector",
                f"127.0.0.1:{srv.port}",
                "--tls-ca",
                ca_pem,
                "--tls-cert",
                client[0],
                "--tls-key",
                client[1],
                "--tls-server-name",
                "collector.test",
                "--enforce-mode",
                "enforce",
                "--pin-dir",
                pin_dir,
                "--idle-timeout",
                "1",
                "--interval",
                "0.2",
                "--rule-ttl",
                str(RULE_TTL),
                # the collector's policy asks for its own TTL (300 s by default): clamped here
                "--max-rule-ttl",
                str(RULE_TTL),
                "--summary-interval",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log = LogWatch(proc.stdout)
        rx = Receiver(h.host_ip, MARK_PORT)
        try:
            assert log.wait_for("enforcement ready: mode enforce", 180), "".join(log.lines)
            table = RuleTable(open_pinned(pin_dir), lock_path=pin_dir)

            send(h, outside, PORT, 100, sport=FLOOD_SPORT, tag="F")  # the "flood"
            send(h, h.host_ip, PORT, 100, sport=NODE_SPORT, tag="N")  # the same, to the node itself
            assert log.wait_for("verdict refused (allowlisted)", 60), "".join(log.lines)
            rows = wait(table.rows, 60, "a rule from the verdict")
            (row,) = rows
            assert (row.src, row.dst, row.src_port, row.dst_port, row.proto, row.action) == (
                h.ns_ip,
                outside,
                FLOOD_SPORT,
                PORT,
                17,
                "drop",
            )
            assert 0 < row.expires_in_s <= RULE_TTL

            def burst(n):
                before = qdisc_drops(h.host_if)
                send(h, outside, PORT, n, sport=FLOOD_SPORT, tag="F")
                send(h, h.host_ip, MARK_PORT, 1, sport=MARK_SPORT, tag="M")
                rx.take_until_marker()
                return qdisc_drops(h.host_if) - before

            assert burst(50) == 50
            assert table.rows()[0].hits == 50

            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert burst(30) == 30  # the kernel goes on without the agent
            (row,) = table.rows()
            assert (row.hits, row.dropped) == (80, 80)
            expires_at = time.monotonic() + row.expires_in_s
            assert row.expires_in_s > 0, "the machine was too slow for the TTL"

            while time.monotonic() < expires_at + 0.05:  # wait for the clock, not for a result
                time.sleep(0.1)
            assert burst(40) == 0  # expired: not one packet dropped, nobody deleted it
            (row,) = table.rows()
            assert (row.hits, row.dropped) == (80, 80) and row.expires_in_s < 0
            table.maps.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            rx.close()
            sh(f"ip link del {h.host_if}", check=False)  # our TC filter goes with the link
