"""Seed 001's Unix-socket output: JSON lines to a consumer, and no stall without one."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from netns import make_hosts

pytestmark = [pytest.mark.root, pytest.mark.slow]
XDPML = str(Path(sys.executable).parent / "xdpml")


def test_flows_stream_to_a_unix_socket_consumer(tmp_path):
    path = str(tmp_path / "ids.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    lines: list[dict] = []

    def consume():
        conn, _ = srv.accept()
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append(json.loads(line))

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    with make_hosts(42) as (h,):
        p = subprocess.Popen(
            [
                XDPML,
                "agent",
                "-i",
                h.host_if,
                "--unix-socket",
                path,
                "--idle-timeout",
                "1",
                "--interval",
                "0.2",
                "--summary-interval",
                "0",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and "attached" not in p.stdout.readline():
                pass
            h.run(f"ping -c 2 -i 0.05 {h.host_ip}", capture=True)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not any(r.get("protocol") == 1 for r in lines):
                time.sleep(0.1)
        finally:
            p.terminate()
            p.wait(30)
    t.join(5)
    icmp = [r for r in lines if r.get("protocol") == 1 and r["src_ip"] == h.ns_ip]
    assert len(icmp) == 1
    assert icmp[0]["record"] == "flow" and icmp[0]["src2dst_packets"] == 2 and icmp[0]["dst2src_packets"] == 2
    assert p.returncode == 0


def test_missing_consumer_drops_and_counts_without_stalling(tmp_path):
    import numpy as np
    from xdpml.agent.export.sinks import UnixSocketSink

    from xdpml.wire.columns import ColumnBatch

    sink = UnixSocketSink(str(tmp_path / "nobody.sock"))
    b = ColumnBatch("flow", {"x": np.arange(5)})
    t0 = time.monotonic()
    for _ in range(100):
        sink.write(b)
    assert time.monotonic() - t0 < 2
    assert sink.dropped == 500 and sink.records == 0
    sink.close()
