"""`xdpml model compile`: check a scikit-learn model file against the kernel's limits.

The lead registers :func:`add_model_commands` on the top-level subparsers; the
handler raises xdpml.errors types only (the CLI prints them as one line)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xdpml.errors import ModelError
from xdpml.models import layout as L
from xdpml.models.compiler import compile_model


def load_estimator(path: str):
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file {path}: no such file")
    if p.suffix == ".onnx":
        raise ModelError(
            f"{path}: ONNX models cannot be compiled for the kernel yet; export the "
            "scikit-learn estimator with joblib (docs/models.md)"
        )
    if p.suffix not in (".joblib", ".pkl"):
        raise ModelError(f"{path}: expected a .joblib or .pkl file")
    import joblib

    try:
        return joblib.load(p)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from exc


def cmd_compile(args) -> int:
    lim = L.Limits(
        features=args.max_features,
        depth=args.max_depth,
        trees=args.max_trees,
        nodes=args.max_nodes,
        leaf_values=args.max_leaf_values,
        outputs=args.max_outputs,
        layers=args.max_layers,
        width=args.max_width,
    )
    feats = [f.strip() for f in args.features.split(",") if f.strip()]
    model = compile_model(load_estimator(args.model), feats, limits=lim)
    report = model.stats()
    report["slot_bytes"] = L.slot_dtype(lim).itemsize
    report["cflags"] = ["-DXDPML_MODEL=1", *lim.cflags()]
    print(json.dumps(report, indent=2, default=str))
    return 0


def add_model_commands(subparsers) -> None:
    p = subparsers.add_parser("model", help="models in the kernel (docs/models.md)")
    sub = p.add_subparsers(dest="model_cmd", required=True)
    c = sub.add_parser(
        "compile",
        help="check and convert a scikit-learn model for the datapath",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("model", help="MODEL.joblib or MODEL.pkl (a fitted estimator or Pipeline)")
    c.add_argument(
        "--features", required=True, help="comma-separated feature names in the model's input order (docs/models.md)"
    )
    d = L.DEFAULT_LIMITS
    for name in ("features", "depth", "trees", "nodes", "leaf_values", "outputs", "layers", "width"):
        c.add_argument(
            f"--max-{name.replace('_', '-')}",
            type=int,
            default=getattr(d, name),
            help=f"kernel limit -DXDPML_MODEL_MAX_{name.upper()}",
        )
    c.set_defaults(func=cmd_compile)
