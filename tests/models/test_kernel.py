"""The kernel's class (real XDP flow program compiled with -DXDPML_MODEL=1, run by
BPF_PROG_TEST_RUN on packets crafted by scapy) equals the Python walk of the same slot
and scikit-learn's predict, for every model kind; swaps and the empty slot."""

import numpy as np
import pytest

from bench import model_packets as packets
from bench import model_zoo as zoo
from xdpml.config import AgentSettings
from xdpml.datapath.loader import XDP_PROG, Datapath
from xdpml.datapath.testrun import test_run as prog_test_run
from xdpml.errors import ModelError
from xdpml.models import layout as L
from xdpml.models.compiler import compile_model
from xdpml.models.kernel import ModelSlots
from xdpml.models.reference import predict_index

pytestmark = pytest.mark.root
LIM = L.Limits(trees=32, depth=12, nodes=4096, leaf_values=8192)
N_KERNEL = 600  # packets through the kernel per model kind (the Python walk sees 100,000)
XDP_PASS = 2


@pytest.fixture(scope="module")
def dp():
    with Datapath(AgentSettings(), model_limits=LIM) as d:
        yield d


@pytest.fixture(scope="module")
def slots(dp):
    return ModelSlots.of(dp.bpf, LIM)


@pytest.fixture(scope="module")
def traffic():
    _, X = zoo.dataset(6000, seed=1)
    f, Xk = zoo.dataset(N_KERNEL, seed=7)
    frames = [packets.frame(f, i) for i in range(N_KERNEL)]
    return X, zoo.labels(X), Xk, frames


def kernel_classes(dp, slots, frames) -> np.ndarray:
    """Class index of each frame as the kernel counted it (-1: not classified)."""
    fd = dp.progs[XDP_PROG].fd
    out = np.empty(len(frames), np.int64)
    err0 = dp.counters()["model_err"]
    for i, fr in enumerate(frames):
        before = slots.class_counts()
        rc, _ = prog_test_run(fd, fr)
        assert rc == XDP_PASS
        delta = slots.class_counts() - before
        assert delta.sum() == 1, delta
        k = int(np.flatnonzero(delta)[0])
        out[i] = -1 if k == LIM.outputs else k
    assert dp.counters()["model_err"] == err0
    return out


@pytest.mark.parametrize("kind", zoo.KINDS)
def test_kernel_class_equals_walk_and_sklearn(dp, slots, traffic, kind):
    X, y, Xk, frames = traffic
    model = zoo.train(kind, X, y)
    c = compile_model(model, zoo.NAMES, limits=LIM)
    packed = c.pack(LIM)
    slots.swap(packed)
    got = kernel_classes(dp, slots, frames)
    walk = predict_index(packed, Xk, LIM)
    assert (got == walk).all(), [(i, got[i], walk[i]) for i in np.flatnonzero(got != walk)[:10]]
    want = model.predict(Xk.astype(np.float64))
    agree = c.label(got) == want
    if kind in zoo.EXACT or kind in zoo.SUMS:
        assert agree.all(), np.flatnonzero(~agree)
    elif kind in zoo.LINEAR:
        outside = zoo.decision_values(model, Xk) > c.margin(Xk)
        assert agree[outside].all()
    else:
        assert agree.mean() >= 0.99
    assert len(set(got)) > 1


def test_tcp_flag_bits_in_header_order(dp, slots):
    """A tree on tcp_cwr alone (bit 7 of TCP byte 13) and one on tcp_fin (bit 0):
    a byte-swapped or mis-shifted flag read would send these packets the other way."""
    from sklearn.tree import DecisionTreeClassifier

    for name in ("tcp_cwr", "tcp_fin", "tcp_ece"):
        feats = [name]
        col = packets.feature_matrix(zoo_fields(), feats)
        model = DecisionTreeClassifier(max_depth=1).fit(col.astype(float), col[:, 0])
        c = compile_model(model, feats, limits=LIM)
        slots.swap(c.pack(LIM))
        f = zoo_fields()
        frs = [packets.frame(f, i) for i in range(200)]
        got = kernel_classes(dp, slots, frs)
        assert (c.label(got) == col[:200, 0]).all(), name
        assert 0 < col[:200, 0].sum() < 200


def zoo_fields():
    f = packets.random_fields(400, np.random.default_rng(11))
    f["proto"] = np.full(400, 6)
    f["v6"] = np.zeros(400, bool)
    return f


def test_swap_flips_and_empty_slot_counts(dp, slots, traffic):
    X, y, Xk, frames = traffic
    tree = compile_model(zoo.train("tree", X, y), zoo.NAMES, limits=LIM)
    first = slots.swap(tree.pack(LIM, model_id=7))
    assert slots.active() == first and int(slots.read_slot(first)["model_id"]) == 7
    with pytest.raises(ModelError, match="is active"):
        slots.write_slot(first, tree.pack(LIM))
    empty = slots.unload()
    assert empty == first ^ 1 and slots.active() == empty
    got = kernel_classes(dp, slots, frames[:50])
    assert (got == -1).all()  # counted as seen while empty, never classified
    back = slots.swap(tree.pack(LIM))
    assert back == first
    assert (kernel_classes(dp, slots, frames[:50]) == predict_index(tree.pack(LIM), Xk[:50], LIM)).all()


@pytest.mark.parametrize("kind", ["tree", "forest"])
def test_onnx_model_in_the_kernel_equals_onnxruntime(dp, slots, traffic, kind, tmp_path):
    """An sklearn-onnx file compiled for the kernel: its classes through
    BPF_PROG_TEST_RUN equal onnxruntime's on the same feature vectors."""
    ort = pytest.importorskip("onnxruntime")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    from xdpml.models.cli_commands import compile_file

    X, y, Xk, frames = traffic
    est = (
        DecisionTreeClassifier(max_depth=10, random_state=0)
        if kind == "tree"
        else RandomForestClassifier(n_estimators=8, max_depth=8, random_state=0)
    ).fit(X.astype(np.float32), y)
    m = skl2onnx.to_onnx(est, X[:1].astype(np.float32), options={id(est): {"zipmap": False}})
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    c = compile_file(str(path), zoo.NAMES, LIM)
    slots.swap(c.pack(LIM))
    got = c.label(kernel_classes(dp, slots, frames))
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = s.run(None, {s.get_inputs()[0].name: Xk.astype(np.float32)})[0]
    assert (np.asarray(got) == want).all(), np.flatnonzero(np.asarray(got) != want)[:10]
    assert len(set(want.tolist())) > 1


def test_packet_without_a_flow_entry_is_not_classified():
    """LIM's build stores the class through flow_account()'s pointer (LIM.flow_ptr): a packet
    whose flow the full table refused (counted flow_full) is then not classified; every
    packet whose flow has an entry is, exactly once."""
    from bench.bench_datapath import tcp_frames
    from xdpml.config import DatapathSettings

    assert LIM.flow_ptr
    frames = tcp_frames(1300)  # one distinct TCP flow each
    with Datapath(AgentSettings(datapath=DatapathSettings(flow_table_size=1024)), model_limits=LIM) as d:
        s = ModelSlots.of(d.bpf, LIM)
        _, X = zoo.dataset(2000, seed=1)
        s.swap(compile_model(zoo.train("tree", X, zoo.labels(X)), zoo.NAMES, limits=LIM).pack(LIM))
        fd = d.progs[XDP_PROG].fd
        refused = classified = 0
        for fr in frames:
            full0, c0 = d.counters()["flow_full"], s.class_counts().sum()
            rc, _ = prog_test_run(fd, fr)
            assert rc == XDP_PASS
            full, got = d.counters()["flow_full"] - full0, s.class_counts().sum() - c0
            assert (full, got) in ((0, 1), (1, 0)), (full, got)
            refused += full
            classified += got
    assert refused >= 1300 - 1024 and classified + refused == 1300, (refused, classified)


@pytest.mark.parametrize(("kind", "n_in", "hidden"), [("logistic", 5, None), ("mlp", 6, 5), ("mlp", 3, 7)])
def test_fewer_inputs_than_the_slots(dp, slots, traffic, kind, n_in, hidden):
    """Linear models read four inputs per compare and the MLP every input slot of a
    layer (the packed weights past the inputs are 0): a model on 5, 6 or 3 inputs,
    with a hidden layer narrower than the slots, gets the same classes in the kernel
    as in the Python walk and (outside the margin, or >= 99%) in scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, Xk, frames = traffic
    Xf = X[:, :n_in].astype(np.float64)
    est = (
        LogisticRegression(max_iter=1000)
        if kind == "logistic"
        else MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=600, random_state=0)
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_pipeline(StandardScaler(), est).fit(Xf, y)
    c = compile_model(model, zoo.NAMES[:n_in], limits=LIM)
    packed = c.pack(LIM)
    slots.swap(packed)
    got = kernel_classes(dp, slots, frames)
    walk = predict_index(packed, Xk[:, :n_in], LIM)
    assert (got == walk).all(), [(i, got[i], walk[i]) for i in np.flatnonzero(got != walk)[:10]]
    want = model.predict(Xk[:, :n_in].astype(np.float64))
    agree = c.label(got) == want
    if kind == "logistic":
        outside = zoo.decision_values(model, Xk[:, :n_in]) > c.margin(Xk[:, :n_in])
        assert outside.mean() > 0.5 and agree[outside].all()
    else:
        assert agree.mean() >= 0.99
    assert len(set(got)) > 1


def test_every_packet_feature_as_a_model_reads_it(dp, slots):
    """The kernel computes only the feature groups a model reads (bpf/model.h MODEL_FG_*,
    the slot's fskip): for every packet feature, a model of that one input (every other
    group skipped), and models of 16 inputs at a time (nothing skipped), sampling each
    decision; the records' inputs equal the values computed from the header fields
    (bench/model_packets.py), packet by packet."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from xdpml.agent.events import RecordBuffer

    from xdpml.models import features as F
    from xdpml.models.kernel import event_type

    n = 150
    f, _ = zoo.dataset(n, seed=13)
    frames = [packets.frame(f, i) for i in range(n)]
    names = [x.name for x in F.FEATURES if not x.flow]
    want = packets.feature_matrix(f, names)
    labels = np.random.default_rng(0).integers(0, 2, n)
    events = RecordBuffer(dp.bpf, "model_events", event_type(LIM))
    fd = dp.progs[XDP_PROG].fd
    sets = [names[i : i + LIM.features] for i in range(0, len(names), LIM.features)] + [[c] for c in names]
    slots.set_sampling(1)
    try:
        for cols in sets:
            idx = [names.index(c) for c in cols]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence on raw columns: any weights will do
                model = LogisticRegression().fit(want[:, idx].astype(np.float64), labels)
            packed = compile_model(model, cols, limits=LIM).pack(LIM)
            groups = {bit for bit, members in F.GROUPS.items() if set(cols) & set(members)}
            assert int(packed["fskip"]) == sum(F.GROUPS) - sum(groups)
            slots.swap(packed)
            dp.bpf.ring_buffer_consume()
            events.take()
            for fr in frames:
                assert prog_test_run(fd, fr)[0] == XDP_PASS
            dp.bpf.ring_buffer_consume()
            got = events.take()
            assert len(got) == n, (cols, len(got))
            x = got["x"][:, : len(cols)]
            bad = np.flatnonzero((x != want[:, idx]).any(axis=1))
            assert not len(bad), (cols, [(int(i), x[i].tolist(), want[i, idx].tolist()) for i in bad[:5]])
    finally:
        slots.set_sampling(0)


@pytest.mark.parametrize(("depth", "heap"), [(10, 1), (12, 0)])
def test_one_tree_in_heap_order_or_in_pairs(dp, slots, traffic, depth, heap):
    """One tree of depth 10 is walked in heap order (2047 positions <= 4096 nodes), one of
    depth 12 (8191 positions) as nodes in pairs: both classify as predict does."""
    from sklearn.tree import DecisionTreeClassifier

    X, _, Xk, frames = traffic
    noise = np.random.default_rng(depth).integers(0, 3, len(X))  # a tree grown to its max depth
    model = DecisionTreeClassifier(max_depth=depth, random_state=0).fit(X.astype(float), noise)
    c = compile_model(model, zoo.NAMES, limits=LIM)
    packed = c.pack(LIM)
    assert c.depth == depth and int(packed["heap"]) == heap
    slots.swap(packed)
    got = kernel_classes(dp, slots, frames)
    assert (c.label(got) == model.predict(Xk.astype(np.float64))).all()
    assert len(set(got)) == 3
