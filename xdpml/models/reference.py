"""The kernel's model walk in numpy, over the packed slot (the very bytes the map holds).

Same integers, same order of operations as bpf/model.h: the parity tests compare
it with scikit-learn on many vectors and with the kernel on crafted packets.
"""

from __future__ import annotations

import numpy as np

from xdpml.models import layout as L


def predict_index(slot: np.ndarray, X, lim: L.Limits) -> np.ndarray:
    """Class index per row of X (int64 [n, n_features], the model's input order)."""
    X = np.asarray(X, dtype=np.int64)
    n = X.shape[0]
    kind, dec = int(slot["kind"]), int(slot["decision"])
    nout = int(slot["n_outputs"])
    if X.shape[1] != int(slot["n_features"]):
        raise ValueError(f"X has {X.shape[1]} columns, the model {int(slot['n_features'])}")
    acc = np.broadcast_to(slot["bias"][:nout].astype(np.int64), (n, nout)).copy()
    rows = np.arange(n)
    if kind == L.KIND_TREES:
        # nodes name features by MF_* id (bpf/model.h reads the feature array by id)
        P = np.zeros((n, L.PF_N), np.int64)
        P[:, slot["feat_id"][: X.shape[1]].astype(np.int64) & (L.PF_N - 1)] = X
        nd = slot["trees"]["node"]
        # the kernel keeps byte offsets (16 x node index, 8 x feature id); masked as it masks them
        feat = (nd["feat_off"].astype(np.int64) & ((L.PF_N - 1) * L.PF_SIZE)) // L.PF_SIZE
        thr = nd["thr"].astype(np.int64)
        left = (nd["left_off"].astype(np.int64) & ((lim.nodes - 1) * L.NODE_SIZE)) // L.NODE_SIZE
        leaf = nd["leaf"].astype(np.int64)
        values = slot["trees"]["leaf"].astype(np.int64)
        cls = np.zeros(n, np.int64)
        # levels walked, as the kernel: one tree in heap order by two levels, trees in pairs by four
        heap = bool(slot["heap"])
        step = 2 if heap else 4
        depth = min(-(-int(slot["depth"]) // step) * step, lim.depth)
        for t in range(int(slot["n_trees"])):
            root = int(slot["trees"]["root"][t]) & (lim.nodes - 1)
            i = np.full(n, root, np.int64)
            for _ in range(depth):
                x = P[rows, feat[i] & (L.PF_N - 1)]
                if heap:  # the children of h at 2h+1, 2h+2 (xor the root: 0 when packed, as the kernel)
                    i = (2 * i + 1 + ((x > thr[i]) ^ root)) & (lim.nodes - 1)
                else:  # at left, left + 1
                    i = (left[i] + (x > thr[i])) & (lim.nodes - 1)
            if not (left[i] == i).all():
                raise ValueError("a tree walk did not end on a leaf")  # never in the kernel: see model.h
            if dec == L.DEC_LEAF:
                cls = leaf[i]
            else:
                acc += values[(leaf[i][:, None] & (lim.leaf_values - 1)) + np.arange(nout)]
        if dec == L.DEC_LEAF:
            return cls
    elif kind == L.KIND_LINEAR:
        w = slot["lin"]["w"][:nout, : X.shape[1]].astype(np.int64)
        acc += X @ w.T
    elif kind == L.KIND_MLP:
        m = slot["mlp"]
        nf = X.shape[1]
        a = (X * m["in_mul"][:nf].astype(np.int64) + m["in_add"][:nf].astype(np.int64)) >> m["in_shift"][:nf].astype(
            np.int64
        )
        a = np.clip(a, -L.ACT_MAX, L.ACT_MAX)
        width_in = nf
        nl = int(slot["n_layers"])
        for li in range(nl):
            wout = int(m["width"][li])
            w = m["w"][li, :width_in, :wout].astype(np.int64)
            z = a @ w + m["bias"][li, :wout].astype(np.int64)
            if li == nl - 1:
                acc = z
            else:
                r = (np.maximum(z, 0) * int(m["mult"][li]) + (1 << (L.MLP_REQ_SHIFT - 1))) >> L.MLP_REQ_SHIFT
                a = np.minimum(r, L.ACT_MAX)
                width_in = wout
    else:
        raise ValueError("empty slot: no model")
    if dec == L.DEC_BINARY:
        return (acc[:, 0] >= 0).astype(np.int64)
    if dec == L.DEC_ARGMAX_LAST0:  # the last class scores 0 and wins only above every other
        acc = np.concatenate([acc, np.zeros((n, 1), np.int64)], axis=1)
    return np.argmax(acc, axis=1).astype(np.int64)
