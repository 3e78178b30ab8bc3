"""Datapath benchmarks: kernel cost per packet, drain rate, user CPU per packet.

    python -m bench.bench_datapath [--quick] [--section kernel|drain|cpu|all]

Run as root (BPF, network namespaces). Each section measures the xdpml datapath
and its baseline in the same run, so the ratio holds on whatever machine runs it:

kernel  BPF_PROG_TEST_RUN on 64-byte TCP frames of 1,000 distinct flows, the
        compiled XDP flow program (and variants) against a trivial XDP_PASS program
        compiled here. Repeats re-run the same frame, so after a warm-up round that
        creates the 1,000 flows every measured run takes the flow *update* path:
        the steady state of a live flow.
drain   a flow table filled with N synthetic flows (BPF_MAP_UPDATE_BATCH from
        numpy), emptied into feature columns by FlowMap.drain() +
        features.flow_columns(); baseline: BCC's items_lookup_and_delete_batch().
cpu     user+system CPU time of the consuming process per packet, for the same
        UDP traffic (iperf3 at a fixed packet rate inside a test namespace):
        the xdpml agent (flows only) against a seed-000-style consumer that pushes
        every packet through a ring buffer to a Python callback.

Traffic only ever goes between the root namespace and the bench's own test
namespace (xdpml.lab); the namespace, its veth and everything attached to
it are removed on exit, failure included.
"""

from __future__ import annotations

import argparse
import ctypes as C
import errno
import json
import os
import platform
import resource
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
HOST_INDEX = 90  # test host xdpml-test-90 / xdpt90 / 10.201.90.0/24; tests use lower indices
IPERF_PORT = 5290
XDP_PASS = 2


@dataclass(frozen=True)
class Params:
    flows: int = 1000  # distinct flows for the per-packet cost
    repeat: int = 5000  # BPF_PROG_TEST_RUN repeat per frame (plain variants)
    ring_repeat: int = 500  # repeat for variants that write a ring buffer (it must not fill)
    rounds: int = 5  # measured rounds, variants interleaved in each
    drain_flows: int = 200_000
    drain_table: int = 262_144
    drain_rounds: int = 5
    cpu_packets: int = 400_000
    cpu_pps: int = 50_000


FULL = Params()
QUICK = Params(
    repeat=2000, ring_repeat=100, rounds=3, drain_flows=50_000, drain_table=65_536, drain_rounds=3, cpu_packets=100_000
)


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args, **kw) -> None:
        self.rows.append(Row(*args, **kw))

    def text(self) -> str:
        head = ("section", "measurement", "value", "baseline", "ratio", "goal", "note")
        body = [
            (r.section, r.name, f"{_fmt(r.value)} {r.unit}", r.baseline, r.ratio, r.goal, r.note) for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"* {n}" for n in self.notes])

    def markdown(self) -> str:
        out = [
            "| section | measurement | value | baseline (same run) | ratio | goal | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            out.append(
                f"| {r.section} | {r.name.strip()} | {_fmt(r.value)} {r.unit} | {r.baseline} | "
                f"{r.ratio} | {r.goal} | {r.note} |"
            )
        return "\n".join(out + [""] + [f"- {n}" for n in self.notes])


def _fmt(v: float) -> str:
    if v >= 1e5:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


# ---------------------------------------------------------------------------
# 1. kernel cost per packet


def tcp_frames(n: int) -> list[bytes]:
    """n 64-byte Ethernet/IPv4/TCP frames (ACK, 10 payload bytes), one distinct flow each."""
    eth = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
    frames = []
    for i in range(n):
        src = bytes([10, 1, (i >> 8) & 0xFF, i & 0xFF])
        dst = bytes([10, 2, 0, 1])
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 50, i & 0xFFFF, 0x4000, 64, 6, 0, src, dst))
        words = struct.unpack("!10H", ip)
        csum = sum(words)
        csum = (csum & 0xFFFF) + (csum >> 16)
        csum = (csum & 0xFFFF) + (csum >> 16)
        ip[10:12] = struct.pack("!H", ~csum & 0xFFFF)
        tcp = struct.pack("!HHIIBBHHH", 10000 + i, 443, 1000, 2000, 5 << 4, 0x10, 65535, 0, 0)
        frame = eth + bytes(ip) + tcp + bytes(10)
        assert len(frame) == 64
        frames.append(frame)
    return frames


TRIVIAL_XDP = b"int bench_xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"
BENCH_NS = f"xdpml-bench-{HOST_INDEX}"
CLONE_NEWNET = 0x40000000
XDP_FLAGS_DRV_MODE = 1 << 2


@contextmanager
def dispatcher_slots(ns: str = BENCH_NS):
    """Yield attach(prog_fn): keeps a program in the kernel's XDP dispatcher.

    BPF_PROG_TEST_RUN with repeat > 1 on XDP puts the program into the XDP
    dispatcher and takes it out again, and each change waits for an RCU grace
    period (~20 ms of wall time per call here, no CPU). A program attached in
    driver mode somewhere stays in the dispatcher, so the calls are then cheap, and
    the program is called the way a driver calls it. The attachments live on idle,
    down veths in the bench's own namespace (no traffic, and out of reach of
    `xdpml cleanup`, which only looks at the root namespace); deleting the
    namespace removes them."""
    from bcc import BPF

    libc = C.CDLL(None, use_errno=True)
    subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL, check=False)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    count = 0

    def attach(fn) -> None:
        nonlocal count
        name = f"xb{count}"
        count += 1
        subprocess.run(["ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
        own = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(C.get_errno(), "setns into the bench namespace")
            try:
                BPF.attach_xdp(name.encode(), fn, XDP_FLAGS_DRV_MODE)
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(C.get_errno(), "setns back to the original namespace")
        finally:
            os.close(own)
            os.close(target)

    try:
        yield attach
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


# Stages of the flow program, cut out of the real source with markers (kernel
# breakdown). Anchors are exact lines of bpf/xdp_flow.c and bpf/flow.h; if they
# change, the breakdown is skipped with a note rather than measuring something else.
STAGE_ANCHORS = {
    "xdp_clock": "    __u64 now = bpf_ktime_get_ns();\n",
    "flow_lock": "    bpf_spin_lock(&v->lock);\n",
}
STAGES = (
    ("parse only (no clock, no table)", "BENCH_STAGE_PARSE"),
    ("parse + clock read", "BENCH_STAGE_CLOCK"),
    ("parse + clock + flow hash lookup", "BENCH_STAGE_LOOKUP"),
    ("parse + clock + lookup + spin lock/unlock", "BENCH_STAGE_LOCK"),
)


def staged_source() -> str | None:
    """The datapath source with #ifdef cut points, or None if the anchors moved."""
    from xdpml.datapath.source import program_text

    src = program_text()
    x = src.find("int xdpml_xdp(")
    if x < 0:
        return None
    head, body = src[:x], src[x:]  # head: the headers (flow.h); body: the XDP entry onwards
    if STAGE_ANCHORS["xdp_clock"] not in body or STAGE_ANCHORS["flow_lock"] not in head:
        return None
    body = body.replace(
        STAGE_ANCHORS["xdp_clock"],
        (
            "#ifdef BENCH_STAGE_PARSE\n    return XDP_PASS;\n#endif\n"
            + STAGE_ANCHORS["xdp_clock"]
            # keep the clock read alive without touching the table
            + "#ifdef BENCH_STAGE_CLOCK\n    count_n(C_GSO_SEGS, now & 1);\n    return XDP_PASS;\n#endif\n"
        ),
        1,
    )
    head = head.replace(
        STAGE_ANCHORS["flow_lock"],
        (
            "#ifdef BENCH_STAGE_LOOKUP\n    return 0;\n#endif\n"
            + STAGE_ANCHORS["flow_lock"]
            + "#ifdef BENCH_STAGE_LOCK\n    bpf_spin_unlock(&v->lock);\n    return 0;\n#endif\n"
        ),
        1,
    )
    return head + body


def default_cflags() -> list[str]:
    """The -D flags xdpml/datapath/loader.py passes for default settings."""
    from xdpml.config import DatapathSettings

    d = DatapathSettings()
    return [
        f"-DXDPML_FLOW_TABLE_SIZE={d.flow_table_size}",
        f"-DXDPML_FIRST_N={d.first_n}",
        "-DXDPML_SAMPLE_RATE=0",
        "-DXDPML_WINDOW=0",
        f"-DXDPML_RINGBUF_PAGES={max(1, d.ringbuf_kib // 4)}",
        "-Wno-unused-function",
    ]


@dataclass
class Variant:
    name: str
    fd: int
    repeat: int
    consume: object = None  # callable emptying the variant's ring buffers between rounds
    counters: object = None  # callable -> kernel counters
    round_means: list[float] = field(default_factory=list)


def _noop_event(_ctx, _data, _size) -> int:
    return 0  # an int: returning None costs ~0.5 us per event in BCC


def bench_kernel(p: Params, report: Report) -> None:
    from bcc import BPF

    from xdpml.config import AgentSettings, DatapathSettings, HarvestSettings, WindowSettings
    from xdpml.datapath.loader import XDP_PROG, Datapath
    from xdpml.datapath.testrun import test_run

    frames = tcp_frames(p.flows)
    with ExitStack() as stack:
        attach = stack.enter_context(dispatcher_slots())  # left last: detaches everything
        trivial = BPF(text=TRIVIAL_XDP)
        stack.callback(trivial.cleanup)
        tfn = trivial.load_func(b"bench_xdp_pass", BPF.XDP)
        attach(tfn)
        variants = [Variant("trivial XDP_PASS", tfn.fd, p.repeat), Variant("trivial XDP_PASS", tfn.fd, p.ring_repeat)]
        # the ring variants' buffers hold a whole round of records (no reservation failures)
        specs = [
            ("xdpml flow, first_n 10 (default)", dict(), 0, p.repeat),
            # the default has the early-export trigger compiled in (bpf/flow.h): its cost
            ("xdpml flow, early export off", dict(_early_off=True), 0, p.repeat),
            ("xdpml flow, first_n 0", dict(first_n=0), 0, p.repeat),
            ("xdpml flow, no flow lock (--no-flow-lock)", dict(flow_lock=False), 0, p.repeat),
            ("xdpml flow + 1/100 sampling", dict(sample_rate=100, ringbuf_kib=65536), 0, p.repeat),
            ("xdpml flow + window records", dict(ringbuf_kib=65536), 100, p.ring_repeat),
        ]
        for name, dp_kw, window, repeat in specs:
            early_off = dp_kw.pop("_early_off", False)
            harvest = HarvestSettings(early_packets=0, early_ms=0) if early_off else HarvestSettings()
            dp = Datapath(
                AgentSettings(
                    datapath=DatapathSettings(**dp_kw), window=WindowSettings(packets=window), harvest=harvest
                )
            )
            stack.callback(dp.close)
            maps = [
                m
                for m in ("win_events", "pkt_events")
                if (m == "win_events" and dp.window) or (m == "pkt_events" and dp.sample_rate)
            ]
            for m in maps:
                dp.bpf[m.encode()].open_ring_buffer(_noop_event)
            attach(dp.progs[XDP_PROG])
            variants.append(
                Variant(
                    name,
                    dp.progs[XDP_PROG].fd,
                    repeat,
                    consume=dp.bpf.ring_buffer_consume if maps else None,
                    counters=dp.counters,
                )
            )
        staged = staged_source()
        if staged is None:
            report.notes.append(
                "kernel: breakdown skipped: the cut points in bpf/ moved "
                "(update STAGE_ANCHORS in bench/bench_datapath.py)"
            )
        else:
            for name, macro in STAGES:
                b = BPF(text=staged.encode(), cflags=default_cflags() + [f"-D{macro}"])
                stack.callback(b.cleanup)
                fn = b.load_func(XDP_PROG.encode(), BPF.XDP)
                attach(fn)
                variants.append(Variant(f"stage: {name}", fn.fd, p.repeat))

        # warm-up round: creates every flow (first run of each frame), warms caches
        for v in variants:
            for f in frames:
                rc, _ = test_run(v.fd, f, repeat=1)
                if rc != XDP_PASS:
                    raise RuntimeError(f"{v.name} returned {rc}, not XDP_PASS")
            if v.consume:
                v.consume()
        for _ in range(p.rounds):
            for v in variants:  # interleaved: drift hits every variant alike
                per = np.empty(len(frames))
                for i, f in enumerate(frames):
                    per[i] = test_run(v.fd, f, repeat=v.repeat)[1]
                if v.consume:
                    v.consume()
                v.round_means.append(float(per.mean()))

        base = {
            p.repeat: statistics.median(variants[0].round_means),
            p.ring_repeat: statistics.median(variants[1].round_means),
        }
        for v in variants:
            med = statistics.median(v.round_means)
            spread = f"rounds {min(v.round_means):.1f}..{max(v.round_means):.1f} ns"
            if v.name.startswith("trivial"):
                report.add("kernel", f"{v.name}, repeat {v.repeat}", med, "ns/pkt", note=spread)
                continue
            ratio = med / base[v.repeat]
            goal = ""
            if v.name.startswith("stage:"):
                report.add(
                    "kernel",
                    f"{v.name}, repeat {v.repeat}",
                    med,
                    "ns/pkt",
                    baseline=f"{base[v.repeat]:.1f} ns trivial",
                    ratio=f"{ratio:.2f}x",
                    note=spread,
                )
                continue
            if "default" in v.name:
                goal = f"<= 3x: {'met' if ratio <= 3 else 'NOT met'}"
            report.add(
                "kernel",
                f"{v.name}, repeat {v.repeat}",
                med,
                "ns/pkt",
                baseline=f"{base[v.repeat]:.1f} ns trivial",
                ratio=f"{ratio:.2f}x",
                goal=goal,
                note=spread,
            )
            if v.counters:
                c = v.counters()
                lost = c["flow_full"] + c["flow_busy"] + c["rb_win_full"] + c["rb_pkt_full"]
                if c["flow_new"] != p.flows or lost:
                    report.notes.append(
                        f"kernel: {v.name}: flow_new {c['flow_new']} (want {p.flows}), "
                        f"losses {lost}: the measurement is not the steady state"
                    )
        report.notes.append(
            f"kernel: BPF_PROG_TEST_RUN, {p.flows} distinct 64-byte TCP frames, each run "
            f"`repeat` times per round, {p.rounds} rounds after a warm-up round that creates the "
            "flows; value = median over rounds of the mean over the frames (the kernel reports "
            "whole ns per run). Repeats re-run the same frame, so every measured run is the flow "
            "update path of a live flow with its entry hot in cache; a real NIC interleaving "
            "many flows adds cache misses on the hash bucket and value. Every program is also "
            "attached in driver mode to an idle veth, so it sits in the kernel's XDP dispatcher "
            "as under a real driver (otherwise each repeated test run waits ~20 ms for RCU). "
            "The 'stage:' rows are the same source cut short after each step (bench-only "
            "#ifdefs), to show where the nanoseconds go."
        )


# ---------------------------------------------------------------------------
# 2. drain rate

BPF_MAP_UPDATE_BATCH = 26


def update_batch(fd: int, keys: np.ndarray, values: np.ndarray) -> None:
    """Insert every (key, value) with one BPF_MAP_UPDATE_BATCH syscall."""
    from xdpml.datapath import syscalls
    from xdpml.datapath.maps import _BatchAttr

    attr = _BatchAttr(keys=keys.ctypes.data, values=values.ctypes.data, count=len(keys), map_fd=fd)
    rc = syscalls.bpf(BPF_MAP_UPDATE_BATCH, attr)
    if rc < 0:
        err = -rc
        raise OSError(err, f"BPF_MAP_UPDATE_BATCH: {os.strerror(err)} after {attr.count} of {len(keys)}")


def drain_into(fd: int, keys: np.ndarray, values: np.ndarray, *, chunk: int = 8192) -> int:
    """Lookup-and-delete every entry straight into preallocated, reused arrays (no
    per-chunk copies): the kernel's floor for draining. Returns the entries read."""
    from xdpml.datapath import syscalls
    from xdpml.datapath.maps import BPF_F_LOCK, BPF_MAP_LOOKUP_AND_DELETE_BATCH, _BatchAttr

    cur_in, cur_out = (C.c_uint8 * 64)(), (C.c_uint8 * 64)()
    total, in_ptr = 0, 0
    while total < len(keys):
        attr = _BatchAttr(
            in_batch=in_ptr,
            out_batch=C.addressof(cur_out),
            keys=keys.ctypes.data + total * keys.dtype.itemsize,
            values=values.ctypes.data + total * values.dtype.itemsize,
            count=min(chunk, len(keys) - total),
            map_fd=fd,
            elem_flags=BPF_F_LOCK,
        )
        rc = syscalls.bpf(BPF_MAP_LOOKUP_AND_DELETE_BATCH, attr)
        total += attr.count
        if rc < 0:
            err = -rc
            if err == errno.ENOENT:
                break
            raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(err)}")
        cur_in, cur_out = cur_out, cur_in
        in_ptr = C.addressof(cur_in)
    return total


def synthetic_flows(
    n: int, key_dtype: np.dtype, value_dtype: np.dtype, *, first_n: int, now_ns: int
) -> tuple[np.ndarray, np.ndarray]:
    """n distinct IPv4 TCP flows with plausible, self-consistent counters."""
    rng = np.random.default_rng(7)
    keys = np.zeros(n, key_dtype)
    i = np.arange(n, dtype=np.uint32)
    lo = keys["lo_ip"]
    lo[:, 10:12] = 0xFF
    lo[:, 12] = 10
    lo[:, 13] = (i >> 16) & 0xFF
    lo[:, 14] = (i >> 8) & 0xFF
    lo[:, 15] = i & 0xFF
    hi = keys["hi_ip"]
    hi[:, 10:12] = 0xFF
    hi[:, 12:16] = (10, 255, 0, 1)
    keys["lo_port"] = 32768 + (i % 28000)
    keys["hi_port"] = 443
    keys["proto"] = 6
    keys["ip_version"] = 4
    keys["ifindex"] = 1

    v = np.zeros(n, value_dtype)
    v["init_lo_to_hi"] = 1
    v["tcp_flags_or"] = 0x1B
    v["end_flags"] = 3
    dur = rng.integers(1_000_000, 5_000_000_000, n, dtype=np.uint64)
    start = np.uint64(now_ns) - dur - np.uint64(1_000_000_000)
    v["first_ns"] = start
    v["last_ns"] = start + dur
    for d in range(2):
        s = v["dir"][:, d]
        pk = rng.integers(1, 200, n, dtype=np.uint64)
        size = rng.integers(60, 1514, n, dtype=np.uint64)
        s["packets"] = pk
        s["bytes"] = pk * size
        s["first_ns"] = start + np.uint64(d * 100_000)
        s["last_ns"] = start + dur
        s["size_sumsq"] = pk * size * size
        s["size_min"] = size
        s["size_max"] = size
        iat = dur // np.maximum(pk, 1)
        s["iat_sum_ns"] = iat * (pk - 1)
        sq = iat.astype(np.float64) ** 2 * (pk - 1).astype(np.float64)  # ns^2, 128 bits in the kernel
        s["iat_sumsq_hi"] = np.floor(sq / 2.0**64).astype(np.uint64)
        s["iat_sumsq_lo"] = (sq - s["iat_sumsq_hi"] * 2.0**64).astype(np.uint64)
        s["iat_min_ns"] = iat
        s["iat_max_ns"] = iat
        s["flag_count"][:, 4] = pk  # ACK
        s["init_window"] = 64240
        s["ttl"] = 64
        v["dir"][:, d] = s
    total = v["dir"]["packets"].sum(axis=1)
    iat = v["iat"]
    iat["sum_ns"] = dur
    iat["min_ns"] = dur // total
    iat["max_ns"] = dur // total
    v["iat"] = iat
    if first_n:
        v["n_seq"] = first_n
        seq = v["seq"]
        seq["size"] = rng.integers(60, 1514, (n, first_n), dtype=np.uint16)
        seq["piat_us"] = rng.integers(0, 100_000, (n, first_n), dtype=np.uint32)
        seq["dir"] = np.arange(first_n) % 2
        seq["flags"] = 0x10
        v["seq"] = seq
    return keys, v


def bench_drain(p: Params, report: Report) -> None:
    from xdpml.cli.memory import tune_malloc

    tune_malloc()  # as the CLI does for the agent (xdpml/cli/__init__.py): feature arrays reuse heap pages
    from xdpml.agent.features import flow_columns
    from xdpml.agent.harvest import Harvester, mono_to_unix_offset_ns

    from xdpml.config import AgentSettings, DatapathSettings, HarvestSettings
    from xdpml.datapath.loader import Datapath
    from xdpml.datapath.maps import FlowMap

    first_n = 10
    n = p.drain_flows
    settings = AgentSettings(datapath=DatapathSettings(flow_table_size=p.drain_table, first_n=first_n))
    with Datapath(settings) as dp:
        fd = dp.flow_map_fd()
        table = FlowMap(fd, key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
        keys, values = synthetic_flows(
            n, dp.types.key_dtype, dp.types.value_dtype, first_n=first_n, now_ns=time.monotonic_ns()
        )
        want_packets = int(values["dir"]["packets"].sum())
        offset = mono_to_unix_offset_ns()
        ifnames = {1: "lo"}
        bcc_table = dp.bpf[b"flows"]

        def fill() -> None:
            table.drain()
            update_batch(fd, keys, values)

        t_drain, t_cols, t_bcc, t_scan, t_floor, t_per_if, t_merged = [], [], [], [], [], [], []
        floor_keys = np.zeros(p.drain_table, dp.types.key_dtype)  # zeroed: pages already faulted in
        floor_values = np.zeros(p.drain_table, dp.types.value_dtype)
        for _ in range(p.drain_rounds):
            fill()
            t0 = time.thread_time()
            k, v = table.drain()
            t1 = time.thread_time()
            batch = flow_columns(
                k, v, expiration=np.zeros(len(k), np.int8), mono_to_unix_ns=offset, ifnames=ifnames, first_n=first_n
            )
            t2 = time.thread_time()
            if len(k) != n or len(batch) != n or int(batch.columns["bidirectional_packets"].sum()) != want_packets:
                raise RuntimeError(f"drain returned {len(k)} flows / {len(batch)} rows, want {n}")
            t_drain.append(t1 - t0)
            t_cols.append(t2 - t1)

            fill()
            t0 = time.thread_time()
            got = sum(1 for _ in bcc_table.items_lookup_and_delete_batch())
            t_bcc.append(time.thread_time() - t0)
            if got != n:
                raise RuntimeError(f"BCC batch drain returned {got} flows, want {n}")

            fill()
            t0 = time.thread_time()
            got = drain_into(fd, floor_keys, floor_values)
            t_floor.append(time.thread_time() - t0)
            if got != n:
                raise RuntimeError(f"direct batch drain returned {got} flows, want {n}")

            # the agent's own path for expired flows: read_all + one lookup-and-delete per flow
            fill()
            harvester = Harvester(
                table, settings=HarvestSettings(), first_n=first_n, mono_to_unix_ns=offset, ifnames=ifnames
            )
            t0 = time.thread_time()
            out = harvester.scan(now_ns=time.monotonic_ns() + 10**12)  # all idle
            t_scan.append(time.thread_time() - t0)
            if out is None or len(out) != n:
                raise RuntimeError("harvester scan did not export every flow")

            # every conversation seen on two interfaces: n/2 conversations, n kernel records
            two = keys[np.arange(n) // 2 * 2].copy()
            two["ifindex"] = np.where(np.arange(n) % 2 == 0, 1, 2)
            two_v = values.copy()
            two_v["dir"]["seen_at"] = 1
            for record_per, times in (("interface", t_per_if), ("conversation", t_merged)):
                table.drain()
                update_batch(fd, two, two_v)
                harvester = Harvester(
                    table,
                    settings=HarvestSettings(record_per=record_per),
                    first_n=first_n,
                    mono_to_unix_ns=offset,
                    ifnames={1: "veth-a", 2: "veth-b"},
                    ifkinds={1: "veth", 2: "veth"},
                )
                t0 = time.thread_time()
                out = harvester.scan(now_ns=time.monotonic_ns() + 10**12)
                times.append(time.thread_time() - t0)
                want = n if record_per == "interface" else (n + 1) // 2
                if out is None or len(out) != want:
                    raise RuntimeError(f"harvester scan ({record_per}) gave {0 if out is None else len(out)} rows")
        table.drain()

    med = statistics.median
    rate = n / med([a + b for a, b in zip(t_drain, t_cols)])
    bcc_rate = n / med(t_bcc)
    report.add(
        "drain",
        f"FlowMap.drain() + flow_columns(), {n:,} flows",
        rate,
        "flows/s",
        baseline=f"BCC items_lookup_and_delete_batch() {bcc_rate:,.0f} flows/s (no features)",
        ratio=f"{rate / bcc_rate:.1f}x",
        goal=f">= 1,000,000: {'met' if rate >= 1e6 else 'NOT met'}",
    )
    report.add("drain", "  of which FlowMap.drain() (batch syscalls)", n / med(t_drain), "flows/s")
    report.add("drain", "  of which flow_columns() (numpy)", n / med(t_cols), "flows/s")
    report.add(
        "drain",
        "  kernel floor: lookup-and-delete batches into one reused buffer",
        n / med(t_floor),
        "flows/s",
        note="no copies, no features",
    )
    report.add("drain", "Harvester.scan(), all idle (read_all + take per flow + features)", n / med(t_scan), "flows/s")
    per_if, merged = n / med(t_per_if), n / med(t_merged)
    report.add(
        "drain",
        f"Harvester.scan(), all idle, {n // 2:,} conversations each on 2 interfaces, one row per conversation",
        merged,
        "records/s",
        baseline=f"one row per interface {per_if:,.0f} records/s",
        ratio=f"{merged / per_if:.2f}x",
        note="kernel records taken per second of harvester CPU",
    )
    report.notes.append(
        f"drain: flow table of {p.drain_table:,} entries, first_n {first_n}, filled with {n:,} "
        "synthetic flows by BPF_MAP_UPDATE_BATCH before each timed drain (fill not timed); "
        f"median of {p.drain_rounds} rounds, one Python thread, timed by the thread's own CPU clock "
        "(user + system, CLOCK_THREAD_CPUTIME_ID), so other processes on the machine do not "
        "inflate it. The BCC baseline only iterates its (key, value) ctypes pairs."
    )


# ---------------------------------------------------------------------------
# 3. user CPU per packet: agent vs seed-000-style per-packet ring buffer

SEED_BASELINE_C = b"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>

struct pkt {
    u64 ts;
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u32 len;
    u32 payload;
    u8 proto;
    u8 pad[7];
};
BPF_RINGBUF_OUTPUT(events, 4096);
BPF_ARRAY(stats, u64, 2); /* 0: packets seen, 1: ring buffer full */

static __always_inline int one(struct __sk_buff *skb)
{
    u32 i0 = 0, i1 = 1;
    u64 *seen = stats.lookup(&i0);
    if (seen)
        __sync_fetch_and_add(seen, 1);
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return TC_ACT_UNSPEC;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return TC_ACT_UNSPEC;
    struct pkt *e = events.ringbuf_reserve(sizeof(struct pkt));
    if (!e) {
        u64 *full = stats.lookup(&i1);
        if (full)
            __sync_fetch_and_add(full, 1);
        return TC_ACT_UNSPEC;
    }
    e->ts = bpf_ktime_get_ns();
    e->saddr = ip->saddr;
    e->daddr = ip->daddr;
    e->sport = 0;
    e->dport = 0;
    e->len = skb->len;
    e->payload = 0;
    e->proto = ip->protocol;
    __u16 *ports = (void *)ip + ip->ihl * 4;
    if ((ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_TCP) && (void *)(ports + 2) <= end) {
        e->sport = ntohs(ports[0]);
        e->dport = ntohs(ports[1]);
    }
    events.ringbuf_submit(e, 0);
    return TC_ACT_UNSPEC;
}
int bench_seed_in(struct __sk_buff *skb) { return one(skb); }
int bench_seed_out(struct __sk_buff *skb) { return one(skb); }
"""


class _SeedPkt(C.Structure):
    _fields_ = [
        ("ts", C.c_uint64),
        ("saddr", C.c_uint32),
        ("daddr", C.c_uint32),
        ("sport", C.c_uint16),
        ("dport", C.c_uint16),
        ("len", C.c_uint32),
        ("payload", C.c_uint32),
        ("proto", C.c_uint8),
        ("pad", C.c_uint8 * 7),
    ]


def _cpu_s() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime, r.ru_stime


def _child_protocol(start, stop) -> None:
    """READY is printed by start(); GO and STOP come on stdin; a JSON line goes back."""
    start()
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        raise SystemExit("bench child: expected GO")
    u0, s0 = _cpu_s()
    if sys.stdin.readline().strip() != "STOP":
        raise SystemExit("bench child: expected STOP")
    extra = stop()
    u1, s1 = _cpu_s()
    print(json.dumps({"user_s": u1 - u0, "sys_s": s1 - s0, **extra}), flush=True)


def child_agent(iface: str) -> None:
    """The xdpml agent, flows only, default settings, a sink that keeps nothing."""
    from xdpml.agent.pipeline import Agent

    from xdpml.config import AgentSettings, InterfaceSettings

    class CountSink:
        rows = 0

        def write(self, batch) -> None:
            self.rows += len(batch)

        def close(self) -> None:
            pass

    sink = CountSink()
    settings = AgentSettings(interfaces=InterfaceSettings(names=[iface]), summary_interval_s=0)
    agent = Agent(settings, interfaces=[iface], sinks=[sink])

    def start():
        agent.start()

    def stop():
        agent.stop()
        if agent.error is not None:
            raise agent.error
        k = agent.totals.kernel
        return {
            "seen": k.get("pkt_tc_ingress", 0) + k.get("pkt_tc_egress", 0) + k.get("pkt_xdp", 0),
            "lost": sum(k.get(n, 0) for n in ("flow_full", "flow_busy")),
            "flows": sink.rows,
        }

    _child_protocol(start, stop)


def child_seed(iface: str) -> None:
    """Seed-000 style: every packet through a ring buffer to a Python callback that
    decodes it and buffers it into windows of 100 packets (no statistics computed)."""
    from bcc import BPF
    from pyroute2 import IPRoute

    from xdpml.datapath.loader import CLSACT_EGRESS, CLSACT_INGRESS, socket_ifindex

    b = BPF(text=SEED_BASELINE_C)
    fin = b.load_func(b"bench_seed_in", BPF.SCHED_CLS)
    fout = b.load_func(b"bench_seed_out", BPF.SCHED_CLS)
    ifindex = socket_ifindex(iface)
    window: list[tuple] = []
    counts = {"events": 0, "windows": 0}

    def on_event(_ctx, data, _size) -> int:
        e = C.cast(data, C.POINTER(_SeedPkt)).contents
        window.append((e.ts, e.len, e.saddr, e.daddr, e.sport, e.dport, e.proto))
        if len(window) == 100:
            counts["windows"] += 1
            window.clear()
        counts["events"] += 1
        return 0

    b[b"events"].open_ring_buffer(on_event)
    done = threading.Event()

    def poll():
        while not done.is_set():
            b.ring_buffer_poll(100)

    t = threading.Thread(target=poll, daemon=True)

    def start():
        with IPRoute() as ipr:
            ipr.tc("add", "clsact", ifindex)
            for parent, fn in ((CLSACT_INGRESS, fin), (CLSACT_EGRESS, fout)):
                ipr.tc(
                    "add-filter",
                    "bpf",
                    ifindex,
                    ":1",
                    fd=fn.fd,
                    name=fn.name.decode(),
                    parent=parent,
                    prio=1,
                    classid=1,
                    direct_action=True,
                )
        t.start()

    def stop():
        done.set()
        t.join(10)
        b.ring_buffer_consume()
        stats = b[b"stats"]
        seen, full = (int(stats[C.c_int(i)].value) for i in (0, 1))
        with IPRoute() as ipr:
            ipr.tc("del", "clsact", ifindex)
        b.cleanup()
        return {"seen": seen, "lost": full, "events": counts["events"]}

    _child_protocol(start, stop)


@contextmanager
def _child(kind: str, iface: str):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_datapath", "--child", kind, "--iface", iface],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # the agent detaches on SIGTERM; the namespace goes anyway
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box or not box[0]:
        raise RuntimeError(f"bench child {proc.args[-3]} gave no answer (exit {proc.poll()}); see stderr")
    return box[0].strip()


def _if_packets(iface: str) -> int:
    base = Path("/sys/class/net") / iface / "statistics"
    return int((base / "rx_packets").read_text()) + int((base / "tx_packets").read_text())


def _one_consumer(kind: str, host, p: Params) -> dict:
    rate_bits = p.cpu_pps * 22 * 8  # iperf3 -b counts UDP payload bits; 22 B payload = 64 B frame
    with _child(kind, host.host_if) as proc:
        if _readline(proc, 180) != "READY":
            raise RuntimeError(f"bench child {kind} did not attach")
        server = subprocess.Popen(
            ["iperf3", "-s", "-1", "-B", host.host_ip, "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            before = _if_packets(host.host_if)
            proc.stdin.write("GO\n")
            proc.stdin.flush()
            t0 = time.monotonic()
            host.run(
                f"iperf3 -c {host.host_ip} -p {IPERF_PORT} -u -l 22 -b {rate_bits} "
                f"-k {p.cpu_packets} --connect-timeout 3000 >/dev/null"
            )
            time.sleep(0.5)  # let the consumer catch up before the count is closed
            wall = time.monotonic() - t0
            packets = _if_packets(host.host_if) - before
        finally:
            server.terminate()
            server.wait(10)
        proc.stdin.write("STOP\n")
        proc.stdin.flush()
        out = json.loads(_readline(proc, 60))
        proc.wait(30)
    out.update(packets=packets, wall_s=wall)
    return out


def bench_cpu(p: Params, report: Report) -> None:
    from xdpml.lab import make_hosts

    with make_hosts(HOST_INDEX) as (host,):
        agent = _one_consumer("agent", host, p)
        seed = _one_consumer("seed", host, p)
    res = {}
    for name, r in (("agent", agent), ("seed", seed)):
        cpu = r["user_s"] + r["sys_s"]
        res[name] = cpu / max(r["packets"], 1) * 1e9
        r["cpu_s"] = cpu
    ratio = res["seed"] / res["agent"] if res["agent"] else float("inf")
    report.add(
        "cpu",
        "xdpml agent (flows only), CPU per packet",
        res["agent"],
        "ns/pkt",
        baseline=f"seed-000-style ring buffer to Python {res['seed']:.0f} ns/pkt",
        ratio=f"{ratio:.0f}x less",
    )
    report.add("cpu", "seed-000-style per-packet ring buffer, CPU per packet", res["seed"], "ns/pkt")
    for name, r in (("agent", agent), ("seed", seed)):
        report.notes.append(
            f"cpu: {name}: {r['packets']:,} packets (interface counters) in {r['wall_s']:.1f} s, "
            f"consumer CPU {r['user_s']:.3f} s user + {r['sys_s']:.3f} s system, BPF program saw "
            f"{r['seen']:,}, lost {r['lost']}"
            + (f", {r['flows']} flow rows exported" if "flows" in r else f", {r['events']:,} events decoded")
        )
    report.notes.append(
        f"cpu: iperf3 UDP, 64-byte frames at {p.cpu_pps:,} packets/s, {p.cpu_packets:,} packets from "
        f"the test namespace to the root namespace over veth {HOST_INDEX}; each consumer in its own "
        "process, attached on TC ingress+egress of the same veth in turn; CPU = getrusage of that "
        "process from GO to its final drain. The agent's cost is per scan (1 s), not per packet, "
        "so its ns/packet falls as the rate rises; the baseline's callback only decodes and "
        "buffers packets, so the seed's real cost (statistics per window) is higher still."
    )


# ---------------------------------------------------------------------------


def machine() -> str:
    return f"{os.cpu_count()} vCPU, kernel {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_datapath",
        description="Datapath benchmarks (kernel cost per packet, drain rate, user CPU per packet), "
        "each against its baseline in the same run. Needs root.",
        epilog="examples:\n  python -m bench.bench_datapath\n  python -m bench.bench_datapath --quick --section kernel",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smaller runs (under a minute)")
    ap.add_argument("--section", choices=("kernel", "drain", "cpu", "all"), default="all")
    ap.add_argument("--child", choices=("agent", "seed"), help=argparse.SUPPRESS)
    ap.add_argument("--iface", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        (child_agent if args.child == "agent" else child_seed)(args.iface)
        return 0
    if os.geteuid() != 0:
        print(
            "error: the datapath benchmarks load BPF programs and create network namespaces: run as root",
            file=sys.stderr,
        )
        return 2
    # SIGTERM unwinds like Ctrl-C, so every finally block runs: namespaces deleted,
    # child consumers stopped, programs detached
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    p = QUICK if args.quick else FULL
    report = Report()
    t0 = time.monotonic()
    sections = ("kernel", "drain", "cpu") if args.section == "all" else (args.section,)
    for s in sections:
        ts = time.monotonic()
        print(f"[bench] {s} ...", file=sys.stderr, flush=True)
        try:
            {"kernel": bench_kernel, "drain": bench_drain, "cpu": bench_cpu}[s](p, report)
        except Exception as exc:
            print(f"error: section {s} failed: {exc}", file=sys.stderr)
            report.notes.append(f"{s}: FAILED: {exc}")
        print(f"[bench] {s} done in {time.monotonic() - ts:.0f} s", file=sys.stderr, flush=True)
    cmd = (
        "python -m bench.bench_datapath"
        + (" --quick" if args.quick else "")
        + (f" --section {args.section}" if args.section != "all" else "")
    )
    print(f"\n{machine()}; `{cmd}` took {time.monotonic() - t0:.0f} s\n")
    print(report.text())
    print("\n--- markdown ---\n")
    print(report.markdown())
    return 1 if any("FAILED" in n for n in report.notes) else 0


if __name__ == "__main__":
    sys.exit(main())
