"""Added per-packet cost of a model in the kernel, side by side in one run.

    python -m bench.bench_models [--repeat N]

Run as root. BPF_PROG_TEST_RUN on the TC ingress flow program (SCHED_CLS: no XDP
dispatcher round trip per call) compiled without a model and with -DXDPML_MODEL=1,
each model loaded in turn into the same datapath; per variant, the mean ns per run
over 1,000 distinct 64-byte TCP frames (each repeated N times) and over one frame.
The 'added' column is the model variant minus the no-model program of the same run.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def mean_ns(fd, frames, repeat) -> float:
    from xdpml.datapath.testrun import test_run

    return float(np.mean([test_run(fd, f, repeat=repeat)[1] for f in frames]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--frames", type=int, default=1000)
    a = ap.parse_args()
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.tree import DecisionTreeClassifier

    from bench import model_zoo as zoo
    from bench.bench_datapath import tcp_frames
    from xdpml.config import AgentSettings
    from xdpml.datapath.loader import TC_INGRESS_PROG, Datapath
    from xdpml.models import layout as L
    from xdpml.models.compiler import compile_model
    from xdpml.models.kernel import ModelSlots

    frames = tcp_frames(a.frames)
    _, X = zoo.dataset(20000, seed=1)
    y = zoo.labels(X)
    noise = np.random.default_rng(0).integers(0, 2, len(y))
    Xf = X.astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = [
            ("decision tree depth 10", DecisionTreeClassifier(max_depth=10, random_state=0).fit(Xf, noise)),
            (
                "random forest 10 x depth 8",
                RandomForestClassifier(n_estimators=10, max_depth=8, random_state=0).fit(Xf, y),
            ),
            ("logistic regression, 16 features", LogisticRegression(max_iter=300).fit(Xf, y > 1)),
            ("int8 MLP 16-16-2", MLPClassifier(hidden_layer_sizes=(16,), max_iter=200, random_state=0).fit(Xf, y > 1)),
        ]
    lim = L.Limits(depth=12, trees=16, nodes=8192, leaf_values=8192)
    rows = []
    with Datapath(AgentSettings()) as base:
        fd = base.progs[TC_INGRESS_PROG].fd
        mean_ns(fd, frames[:50], 10)  # create the flows: every measured run is a flow update
        b_dist, b_one = mean_ns(fd, frames, a.repeat), mean_ns(fd, frames[:1], a.repeat * 50)
        rows.append(("flow program, no model (baseline)", b_dist, b_one, "", ""))
        with Datapath(AgentSettings(), model_limits=lim) as dp:
            slots = ModelSlots.of(dp.bpf, lim)
            fdm = dp.progs[TC_INGRESS_PROG].fd
            mean_ns(fdm, frames, 1)
            for name, model in models:
                c = compile_model(model, zoo.NAMES, limits=lim)
                slots.swap(c.pack(lim))
                d, o = mean_ns(fdm, frames, a.repeat), mean_ns(fdm, frames[:1], a.repeat * 50)
                rows.append((name, d, o, f"{d - b_dist:+.0f}", f"{o - b_one:+.0f}"))
    print("| variant | ns/packet, 1000 distinct | ns/packet, one repeated | added (distinct) | added (one) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]} | {r[4]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
