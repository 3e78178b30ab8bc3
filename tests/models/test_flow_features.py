"""Flow features at the k-th packet (-DXDPML_MODEL_FLOW_K, default 4): the kernel
classifies a flow once, on its flow entry's statistics so far, and stores the class
in the entry; the exported flow row carries it (model_class).

Flows of scapy-built TCP frames (both directions, random sizes and flags, random gaps)
run through the XDP program with BPF_PROG_TEST_RUN. A tree and a forest are trained on
`kernel_view` of the exported columns of a first set of flows, then loaded as they are;
on a second set, the kernel's class of every k-packet flow equals scikit-learn's
predict on that flow's exported row. The packet and byte counts of the rows are checked
against what was sent (counted here), so the rows are the statistics at packet k."""

import time

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether, Raw
from sklearn.ensemble import RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier
from xdpml.agent.features import flow_columns

from xdpml.config import AgentSettings, EnforceSettings
from xdpml.datapath.loader import XDP_PROG, Datapath
from xdpml.datapath.maps import FlowMap
from xdpml.datapath.testrun import test_run as run_packet
from xdpml.models import layout as L
from xdpml.models.compiler import compile_model
from xdpml.models.features import kernel_view
from xdpml.models.kernel import ModelSlots

pytestmark = pytest.mark.root
K = 4
LIM = L.Limits(trees=16, depth=12, nodes=4096, leaf_values=8192)
NAMES = [
    "bidirectional_packets",
    "src2dst_packets",
    "dst2src_packets",
    "src2dst_bytes",
    "dst2src_bytes",
    "src2dst_mean_ps",
    "dst2src_mean_ps",
    "bidirectional_mean_ps",
    "src2dst_max_ps",
    "dst2src_min_ps",
    "bidirectional_duration_ms",
    "bidirectional_mean_piat_ms",
    "bidirectional_min_piat_ms",
    "bidirectional_max_piat_ms",
    "src2dst_syn_packets",
    "dst2src_ack_packets",
]
A, B = "10.99.1.1", "10.99.2.2"
FLAGS = ["S", "A", "PA", "FA", "R", "SA"]


@pytest.fixture(scope="module")
def dp():
    s = AgentSettings(enforce=EnforceSettings(pin_dir=""))
    with Datapath(s, model_limits=LIM) as d:
        yield d


def send_flows(dp, rng, n_flows, base_port, sizes_out):
    """n_flows TCP flows A:port -> B:80; flow i gets 2..6 packets (mostly K). Returns
    {src port: (packets sent, s2d packets, d2s packets, s2d bytes, d2s bytes)}."""
    fd = dp.progs[XDP_PROG].fd
    sent = {}
    for i in range(n_flows):
        sport = base_port + i
        n = int(rng.choice([2, 3, K, K, K, K, 5, 6]))
        c = [0, 0, 0, 0]
        for j in range(n):
            rev = j > 0 and rng.random() < 0.4
            ip = IP(src=B, dst=A) if rev else IP(src=A, dst=B)
            tcp = TCP(sport=80, dport=sport) if rev else TCP(sport=sport, dport=80)
            tcp.flags = "S" if j == 0 else FLAGS[int(rng.integers(0, len(FLAGS)))]
            frame = bytes(Ether() / ip / tcp / Raw(b"x" * int(rng.integers(0, 600))))
            run_packet(fd, frame)
            c[int(rev)] += 1
            c[2 + int(rev)] += len(frame)
            time.sleep(float(rng.uniform(0, 0.003)))  # gaps: the inter-arrival features vary
        sent[sport] = (n, *c)
    return sent


def drain(dp):
    fm = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
    keys, values = fm.drain()
    cols = flow_columns(keys, values, expiration=np.zeros(len(keys), np.int8), mono_to_unix_ns=0, first_n=dp.first_n)
    return cols.columns


def labels(X):
    c = {n: X[:, i] for i, n in enumerate(NAMES)}
    y = (c["src2dst_mean_ps"] > np.median(c["src2dst_mean_ps"])).astype(int)
    y += 2 * (c["bidirectional_mean_piat_ms"] > np.median(c["bidirectional_mean_piat_ms"]))
    y[(c["dst2src_packets"] >= 2) & (c["dst2src_min_ps"] < 300)] = 3
    return y


@pytest.mark.parametrize("kind", ["tree", "forest"])
def test_kernel_class_at_packet_k_equals_sklearn_on_the_exported_row(dp, kind):
    rng = np.random.default_rng(11 if kind == "tree" else 12)
    slots = ModelSlots.of(dp.bpf, LIM)
    slots.unload()
    drain(dp)
    send_flows(dp, rng, 300, 20000, None)
    train = drain(dp)
    Xt = kernel_view(train, NAMES)
    if kind == "tree":
        est = DecisionTreeClassifier(max_depth=8, random_state=0).fit(Xt, labels(Xt))
    else:
        est = RandomForestClassifier(n_estimators=8, max_depth=6, random_state=0).fit(Xt, labels(Xt))
    c = compile_model(est, NAMES, limits=LIM)
    slots.swap(c.pack(LIM))

    sent = send_flows(dp, rng, 400, 30000, None)
    cols = drain(dp)
    rows = {int(p): i for i, p in enumerate(cols["src_port"]) if int(p) in sent}
    assert len(rows) == len(sent)
    exact = [rows[p] for p, s in sent.items() if s[0] == K]
    assert len(exact) > 100
    # the rows are the statistics at packet k, as counted while sending
    for p, s in sent.items():
        if s[0] == K:
            i = rows[p]
            got = tuple(
                int(cols[n][i]) for n in ("src2dst_packets", "dst2src_packets", "src2dst_bytes", "dst2src_bytes")
            )
            assert got == s[1:], (p, got, s)
    X = kernel_view({n: np.asarray(v)[exact] for n, v in cols.items() if np.asarray(v).ndim == 1}, NAMES)
    want = np.searchsorted(est.classes_, est.predict(X))
    got = np.asarray(cols["model_class"])[exact]
    bad = [(int(cols["src_port"][exact[j]]), int(got[j]), int(want[j])) for j in np.flatnonzero(got != want)]
    assert not bad, f"{len(bad)} of {len(exact)} flows differ (port, kernel, sklearn): {bad[:10]}"
    assert len(set(want.tolist())) >= 3, "the model barely splits these flows"
    # fewer than k packets: never classified; more: classified (once, at packet k)
    short = [rows[p] for p, s in sent.items() if s[0] < K]
    longer = [rows[p] for p, s in sent.items() if s[0] > K]
    assert (np.asarray(cols["model_class"])[short] == -1).all()
    assert (np.asarray(cols["model_class"])[longer] >= 0).all()
    slots.unload()


def test_flow_k_is_a_setting():
    """ModelSettings.flow_k (agent --model-flow-k, AgentConfig model.flowPackets) compiles
    k in: with k = 2 a flow is classified at its 2nd packet, on the statistics then (a
    tree: class 0 iff bidirectional_packets <= 2, so every classified flow is class 0;
    at the default k = 4 it would be class 1); 1-packet flows are never classified."""
    from xdpml.config import ModelSettings

    s = AgentSettings(enforce=EnforceSettings(pin_dir=""), model=ModelSettings(slots=True, flow_k=2))
    xs = np.arange(1, 10).reshape(-1, 1)
    est = DecisionTreeClassifier(random_state=0).fit(xs, (xs[:, 0] > 2).astype(int))
    with Datapath(s, model_limits=LIM) as d:
        slots = ModelSlots.of(d.bpf, LIM)
        slots.swap(compile_model(est, ["bidirectional_packets"], limits=LIM).pack(LIM))
        fd = d.progs[XDP_PROG].fd
        sent = {}
        for i, n in enumerate([1, 2, 3, 5] * 5):
            for _ in range(n):
                run_packet(fd, bytes(Ether() / IP(src=A, dst=B) / TCP(sport=41000 + i, dport=80, flags="A")))
            sent[41000 + i] = n
        cols = drain(d)
    got = {int(p): int(c) for p, c in zip(cols["src_port"], cols["model_class"]) if int(p) in sent}
    assert got == {p: (-1 if n < 2 else 0) for p, n in sent.items()}, got
