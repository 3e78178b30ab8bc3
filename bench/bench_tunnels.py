"""Per-packet cost of tunnel decapsulation (bpf/tunnel.h), BPF_PROG_TEST_RUN.

    python -m bench.bench_tunnels [--flows N] [--repeat R] [--rounds K]

Run as root. One compiled XDP flow program (default settings: every tunnel kind on),
fed the same inner packets (Ethernet/IPv4/UDP, 32 payload bytes, N distinct flows)
bare and wrapped in VXLAN, IP-in-IP, GRE with a key and GTP-U; and the same program
compiled with every tunnel kind off, on the bare packets: what tunnel support costs a
packet that is not tunnelled. All variants are measured in the same run, rounds
interleaved; each value is the median over rounds of the mean over the N frames.
Every program sits in the XDP dispatcher (attached to an idle veth in the bench's own
namespace) as under a real driver, see bench/bench_datapath.py.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack

import numpy as np

from bench.bench_datapath import dispatcher_slots

XDP_PASS = 2


def inner(i: int):
    from scapy.layers.inet import IP, UDP

    return IP(src=f"10.1.{(i >> 8) & 255}.{i & 255}", dst="10.2.0.1") / UDP(sport=10000 + i, dport=53) / (b"p" * 32)


def frames(n: int) -> dict[str, list[bytes]]:
    from scapy.contrib.gtp import GTP_U_Header
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import GRE, Ether
    from scapy.layers.vxlan import VXLAN

    eth = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    outer = IP(src="192.0.2.1", dst="192.0.2.2")
    return {
        "bare": [bytes(Ether(**eth) / inner(i)) for i in range(n)],
        "vxlan": [
            bytes(Ether(**eth) / outer / UDP(sport=40000 + i, dport=4789) / VXLAN(vni=42) / Ether(**eth) / inner(i))
            for i in range(n)
        ],
        "ipip": [bytes(Ether(**eth) / outer / inner(i)) for i in range(n)],
        "gre key": [bytes(Ether(**eth) / outer / GRE(key_present=1, key=7) / inner(i)) for i in range(n)],
        "gtpu": [
            bytes(Ether(**eth) / outer / UDP(sport=2152, dport=2152) / GTP_U_Header(teid=9) / inner(i))
            for i in range(n)
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--base-bpf-dir",
        default="",
        help="also measure the bare packets on the programs of this bpf/ directory (e.g. a checkout "
        "of the branch before tunnels), compiled with the same settings",
    )
    a = ap.parse_args()

    from xdpml.config import AgentSettings, TunnelSettings
    from xdpml.datapath.loader import XDP_PROG, Datapath
    from xdpml.datapath.testrun import test_run
    from xdpml.lab import SLOT

    def settings(on: bool) -> AgentSettings:
        s = AgentSettings()
        s.enforce.pin_dir = ""
        if not on:
            s.tunnels = TunnelSettings(
                vxlan=False, geneve=False, ipip=False, gre=False, gtpu=False, wireguard=False, esp=False
            )
        return s

    fr = frames(a.flows)
    with ExitStack() as stack:
        attach = stack.enter_context(dispatcher_slots(f"xdpml-bench-tun-s{SLOT}"))
        on = stack.enter_context(Datapath(settings(True)))
        off = stack.enter_context(Datapath(settings(False)))
        attach(on.progs[XDP_PROG])
        attach(off.progs[XDP_PROG])
        variants = [("tunnels off, bare", off, "bare")] + [(f"tunnels on, {k}", on, k) for k in fr]
        if a.base_bpf_dir:
            import os

            os.environ["XDPML_BPF_DIR"] = a.base_bpf_dir
            try:
                base = stack.enter_context(Datapath(settings(True)))
            finally:
                del os.environ["XDPML_BPF_DIR"]
            attach(base.progs[XDP_PROG])
            variants.insert(0, ("base bpf dir, bare", base, "bare"))
        for _, d, k in variants:  # warm-up: creates the flows
            for f in fr[k]:
                assert test_run(d.progs[XDP_PROG].fd, f)[0] == XDP_PASS
        rounds: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        for _ in range(a.rounds):
            for name, d, k in variants:
                per = [test_run(d.progs[XDP_PROG].fd, f, repeat=a.repeat)[1] for f in fr[k]]
                rounds[name].append(float(np.mean(per)))
        c = on.counters()
        med = {name: statistics.median(v) for name, v in rounds.items()}
    bare = med["tunnels on, bare"]
    print(f"BPF_PROG_TEST_RUN, {a.flows} distinct inner flows, repeat {a.repeat}, {a.rounds} rounds")
    print(f"{'variant':28} {'ns/pkt':>8} {'vs bare (tunnels on)':>22}  frame bytes")
    for name, _, k in variants:
        print(f"{name:28} {med[name]:8.1f} {med[name] - bare:+20.1f} ns  {len(fr[k][0])}")
    print(f"tunnel support on a bare packet: {bare - med['tunnels off, bare']:+.1f} ns")
    goal = med["tunnels on, vxlan"] - bare
    print(f"VXLAN decapsulation added: {goal:+.1f} ns (goal <= 15 ns: {'met' if goal <= 15 else 'NOT met'})")
    print(f"counters: tun_decap {c['tun_decap']}, flow_new {c['flow_new']}")


if __name__ == "__main__":
    main()
