"""End to end: time from a flood's first packet to its first dropped packet.

    python -m bench.bench_loop [--trials N] [--quick] [--markdown]

Run as root. A real `xdpml agent` process with its default settings (hooks auto, scan
every 1 s, early export after 10 packets or 500 ms, idle timeout 120 s) on a test veth,
in enforce mode over mutual TLS to a real collector (gRPC server in this process,
`action=drop`, threshold 0.5) whose model flags a flow once it has 5 packets or more
(score = packets / 10: a stand-in for a model that knows a flood from its first
packets). Each trial floods one new 5-tuple (UDP, 64-byte payload, 1000 packets/s for
2.5 s) from the namespace to an address beyond the node. The sender notes
CLOCK_MONOTONIC before its first packet; the kernel notes the rule's first hit (in
enforce mode, its first drop) on the same clock (bpf_ktime_get_ns), read from the
pinned maps afterwards. Latency = first hit - first packet. A trial whose flood was
never dropped counts as a miss (infinite). Rules are pinned in a private bpffs.

Without early export the flood would be judged at its idle or active timeout (120 s /
30 min while it goes on); there is no baseline to divide by: the goal is absolute
(p99 <= 1 s, issue 11).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

HOST_INDEX = 88
PORT = 9
RATE_PPS = 1000
DURATION_S = 2.5


class FloodModel:
    """score = bidirectional_packets / 10 (flagged from 5 packets at threshold 0.5)."""

    name, version, default_threshold = "packets10", "1", 0.5
    feature_names = ("bidirectional_packets",)

    def score(self, batch):
        from xdpml.collector.models import Scores, feature_matrix

        return Scores(np.minimum(1.0, feature_matrix(batch, self.feature_names)[:, 0] / 10.0))

    def close(self) -> None:
        pass


def _flood(host, dst: str, sport: int) -> int:
    """Send the flood from the namespace; returns CLOCK_MONOTONIC ns before its first packet."""
    code = (
        "import socket,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.bind(('{host.ns_ip}',{sport}))\n"
        f"gap={1e9 / RATE_PPS:.0f}; t0=time.monotonic_ns(); end=t0+{int(DURATION_S * 1e9)}; n=0\n"
        "while True:\n"
        "    now=time.monotonic_ns()\n"
        "    if now>=end: break\n"
        "    if now>=t0+n*gap:\n"
        f"        s.sendto(b'x'*64,('{dst}',{PORT})); n+=1\n"
        "    else: time.sleep(min(0.0005,(t0+n*gap-now)/1e9))\n"
        "print(t0)\n"
    )
    out = host.run(f'{sys.executable} -c "{code}"', capture=True)
    return int(out.strip().splitlines()[-1])


def run(trials: int) -> dict:
    from xdpml.collector.server import CollectorServer, CollectorSettings

    from xdpml.datapath.pins import open_pinned
    from xdpml.datapath.rules import RuleTable
    from xdpml.lab import make_certs, make_hosts
    from xdpml.wire.tls import ServerTls

    work = Path(tempfile.mkdtemp(prefix="xdpml-bench-loop-"))
    bpffs = work / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    pin_dir = str(bpffs / "loop")
    c = make_certs(work, server_name="collector.bench")
    settings = CollectorSettings(
        listen="127.0.0.1:0",
        tls=ServerTls(c["server"], c["server_key"], client_ca_file=c["ca"]),
        action="drop",
        threshold=0.5,
    )
    lat: list[float] = []
    proc = None
    try:
        with make_hosts(HOST_INDEX, ipv6=False) as (h,), CollectorServer(FloodModel(), [], settings) as srv:
            outside = f"{h.ns_ip.rsplit('.', 1)[0]}.99"
            h.run(f"ip neigh replace {outside} lladdr {h.mac(False)} dev eth0")
            xdpml = str(Path(sys.executable).with_name("xdpml"))
            cmd = [xdpml, "agent", "-i", h.host_if, "-o", "/dev/null", "--collector", f"127.0.0.1:{srv.port}"]
            cmd += ["--tls-ca", c["ca"], "--tls-cert", c["client"], "--tls-key", c["client_key"]]
            cmd += ["--tls-server-name", "collector.bench", "--enforce-mode", "enforce", "--pin-dir", pin_dir]
            cmd += ["--summary-interval", "0"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines: list[str] = []
            ready = threading.Event()

            def read():
                for line in proc.stdout:
                    lines.append(line)
                    if "enforcement ready: mode enforce" in line:
                        ready.set()

            threading.Thread(target=read, daemon=True).start()
            if not ready.wait(240):
                raise SystemExit("the agent did not get ready:\n" + "".join(lines[-20:]))
            table = RuleTable(open_pinned(pin_dir), lock_path=pin_dir)
            for i in range(trials):
                sport = 20000 + i
                t0 = _flood(h, outside, sport)
                rows = [r for r in table.rows() if r.src_port == sport and r.action == "drop"]
                if rows and rows[0].first_hit_ns and rows[0].dropped:
                    lat.append((rows[0].first_hit_ns - t0) / 1e9)
                else:
                    lat.append(float("inf"))
                print(f"trial {i + 1}/{trials}: {lat[-1] * 1000:.0f} ms", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["umount", "-l", str(bpffs)], check=False)
    a = np.array(lat)
    ok = a[np.isfinite(a)]
    return {
        "trials": trials,
        "misses": int((~np.isfinite(a)).sum()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "min": float(ok.min()) if len(ok) else float("inf"),
        "mean": statistics.fmean(ok) if len(ok) else float("inf"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="8 trials")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_loop: run as root", file=sys.stderr)
        return 2
    r = run(8 if a.quick else a.trials)
    ms = {k: r[k] * 1000 for k in ("min", "p50", "p90", "p99", "max", "mean")}
    if a.markdown:
        print("| trials | misses | min | p50 | p90 | p99 | max |")
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {r['trials']} | {r['misses']} | {ms['min']:.0f} ms | {ms['p50']:.0f} ms | {ms['p90']:.0f} ms "
            f"| {ms['p99']:.0f} ms | {ms['max']:.0f} ms |"
        )
    else:
        print(
            f"first packet -> drop over {r['trials']} floods: p50 {ms['p50']:.0f} ms, p90 {ms['p90']:.0f} ms, "
            f"p99 {ms['p99']:.0f} ms, max {ms['max']:.0f} ms, misses {r['misses']} (goal p99 <= 1000 ms)"
        )
    return 0 if r["p99"] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
