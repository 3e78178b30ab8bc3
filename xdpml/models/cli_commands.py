"""`xdpml model compile|load|show|swap|unload`: check a scikit-learn model file against
the kernel's limits, and change the model of a running agent.

`compile` needs nothing running. The others work on the model slots a running agent
pinned under its --pin-dir (``<pin dir>/model``, see xdpml/models/kernel.py): no
recompile, no re-attach. Handlers raise xdpml.errors types only (one line from the CLI)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xdpml.config import parse_model_action
from xdpml.errors import ConfigError, ModelError
from xdpml.models import bundle, kernel
from xdpml.models import layout as L
from xdpml.models.compiler import compile_model

MODEL_HELP = (
    "MODEL.joblib or MODEL.pkl (a fitted estimator or Pipeline), MODEL.onnx (a tree ensemble classifier), "
    "or MODEL.xdpml (a compiled bundle, `xdpml model compile --out`)"
)

# the largest limits a datapath can be built with: a bundle within them is well-formed
WIDEST = L.Limits(
    features=1024, depth=4096, trees=4096, nodes=0x8000, leaf_values=0x8000, outputs=4096, layers=1024, width=4096
)


def load_estimator(path: str):
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file {path}: no such file")
    if p.suffix == ".onnx":
        from xdpml.models.onnx_trees import load_onnx

        return load_onnx(str(p))
    if p.suffix == bundle.SUFFIX:
        raise ModelError(f"{path}: a compiled bundle, not an estimator (compile_file reads it)")
    if p.suffix not in (".joblib", ".pkl"):
        raise ModelError(f"{path}: expected a .joblib, .pkl, .onnx or .xdpml file")
    import joblib

    try:
        return joblib.load(p)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from exc


def model_features(est, features: str | list[str] | None) -> list[str]:
    """The model's input columns: as given (comma-separated), else the names the
    estimator was fitted on (a pandas DataFrame's columns)."""
    if isinstance(features, str):
        features = [f.strip() for f in features.split(",") if f.strip()]
    if features:
        return list(features)
    last = est.steps[-1][1] if hasattr(est, "steps") else est
    names = getattr(est, "feature_names_in_", None)
    if names is None:
        names = getattr(last, "feature_names_in_", None)
    if names is None:
        raise ModelError(
            "the model does not name its input columns (fitted on an array): give --features A,B,... in its input order"
        )
    return [str(n) for n in names]


def parse_actions(items) -> dict[str, str]:
    """["CLASS=ACTION", ...] -> {class label: action}; ModelError on a malformed item."""
    out: dict[str, str] = {}
    for it in items or ():
        label, sep, act = str(it).partition("=")
        if not sep or not label or act.partition(":")[0] not in L.ACTIONS:
            raise ModelError(
                f"--action {it!r}: expected CLASS=ACTION, ACTION one of pass, alert, drop, rate-limit:PPS[:BURST]"
            )
        try:
            parse_model_action(act)
        except ConfigError as exc:
            raise ModelError(f"--action {it!r}: {exc}") from None
        out[label] = act
    return out


def compile_file(path: str, features: str | list[str] | None, limits: L.Limits):
    """A model file -> CompiledModel checked against ``limits`` (ModelError otherwise).
    A bundle (.xdpml) names its features: ``features``, if given, must be the same."""
    if Path(path).suffix == bundle.SUFFIX:
        if not Path(path).is_file():
            raise ModelError(f"model file {path}: no such file")
        m = bundle.read(path, limits=limits)
        want = [f.strip() for f in features.split(",") if f.strip()] if isinstance(features, str) else features
        if want and want != [f.name for f in m.features]:
            raise ModelError(
                f"{path}: the bundle's features are {','.join(f.name for f in m.features)}, not {','.join(want)}"
            )
        return m
    est = load_estimator(path)
    return compile_model(est, model_features(est, features), limits=limits)


def cmd_compile(args) -> int:
    from xdpml.models.compiler import heap_levels
    from xdpml.models.cost import estimate_ns

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
    model = compile_file(args.model, args.features, lim)
    report = model.stats()
    report["slot_bytes"] = L.slot_dtype(lim).itemsize
    report["estimated_cost"] = estimate_ns(model, lim)  # per classified packet (xdpml/models/cost.py)
    if model.kind == L.KIND_TREES:  # how bpf/model.h walks it with these limits (docs/models.md "The walk")
        levels = heap_levels(model, lim)
        report["walk"] = (
            {"order": "heap", "levels": levels}
            if levels is not None
            else {"order": "pairs", "levels": -(-model.depth // 4) * 4}
        )
    report["cflags"] = ["-DXDPML_MODEL=1", *lim.cflags()]
    if args.out:
        if not args.out.endswith(bundle.SUFFIX):
            raise ModelError(f"--out {args.out}: expected a {bundle.SUFFIX} file")
        data = bundle.dumps(model)
        try:
            Path(args.out).write_bytes(data)
        except OSError as exc:
            raise ModelError(f"--out {args.out}: {exc.strerror}") from None
        report["bundle"] = {"file": args.out, "bytes": len(data)}
    print(json.dumps(report, indent=2, default=str))
    return 0


def _slots(args):
    return kernel.ModelSlots.pinned(args.pin_dir)


def describe_slot(v, lim: L.Limits) -> dict:
    """One slot's header as `show` prints it."""
    from xdpml.models.features import FEATURES

    kind = int(v["kind"])
    out: dict = {"kind": {0: "empty", 1: "trees", 2: "linear", 3: "mlp"}.get(kind, f"unknown {kind}")}
    if not kind:
        return out
    n = int(v["n_features"])
    out.update(
        {
            "model_id": int(v["model_id"]),
            "features": [FEATURES[int(i)].name if int(i) < len(FEATURES) else int(i) for i in v["feat_id"][:n]],
            "outputs": int(v["n_outputs"]),
        }
    )
    if kind == 1:
        out.update({"trees": int(v["n_trees"]), "depth": int(v["depth"])})
    if kind == 3:
        out["layers"] = int(v["n_layers"])
    return out


def cmd_load(args) -> int:
    slots = _slots(args)
    try:
        model = compile_file(args.model, args.features, slots.limits)
        acts = parse_actions(args.action)
        slot = slots.swap(model.pack(slots.limits, actions=acts))
        mid = int(slots.read_slot(slot)["model_id"])
    finally:
        slots.close()
    what = ", ".join(f"class {k}: {v}" for k, v in acts.items()) or "every class passes"
    print(
        f"model {mid} ({model.estimator}, {model.n_features} features; {what}) loaded into slot {slot} and active; "
        "the previous model stays in the other slot (`xdpml model swap` goes back)"
    )
    return 0


def _action_text(name: str, ns: int, burst_ns: int) -> str:
    """rate-limit as given on the command line (rate-limit:PPS:BURST)."""
    if name != "rate-limit" or not ns:
        return name
    return f"rate-limit:{round(1e9 / ns)}:{burst_ns // ns}"


def cmd_show(args) -> int:
    slots = _slots(args)
    try:
        ctl = slots.ctl()
        out = {
            "active": int(ctl.active) & 1,
            "models_loaded": int(ctl.seq),
            "limits": dict(zip(kernel.LIMIT_ORDER, (int(x) for x in ctl.limits))),
        }
        rows = []
        for i in (0, 1):
            d = describe_slot(slots.read_slot(i), slots.limits)
            counts = slots.class_counts(i)
            d["classified"] = {str(k): int(c) for k, c in enumerate(counts[:-1]) if c}
            d["unclassified_while_empty"] = int(counts[-1])
            if d["kind"] != "empty":
                names = {v: k for k, v in L.ACTIONS.items()}
                v = slots.read_slot(i)
                d["actions"] = [
                    _action_text(names.get(int(a), str(int(a))), int(v["rl_ns"][c]), int(v["rl_burst_ns"][c]))
                    for c, a in enumerate(v["action"][: d["outputs"]])
                ]
            d["action_counts"] = slots.action_counts(i)
            rows.append(d)
        out["slots"] = rows
    finally:
        slots.close()
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def cmd_swap(args) -> int:
    slots = _slots(args)
    try:
        slot = slots.back()
        mid = int(slots.read_slot(slot)["model_id"])
    finally:
        slots.close()
    print(f"slot {slot} (model {mid}) is active again")
    return 0


def cmd_unload(args) -> int:
    slots = _slots(args)
    try:
        slot = slots.unload()
    finally:
        slots.close()
    print(f"empty slot {slot} active: packets are no longer classified (`xdpml model swap` goes back)")
    return 0


def cmd_keygen(args) -> int:
    from xdpml.models import signing

    priv, pub = signing.keygen(args.out)
    kid = signing.key_id(signing.load_public_key(pub))
    print(f"key {kid}: private {priv} (mode 0600, keep it with the trainer), public {pub} (--model-trusted-key)")
    return 0


def cmd_sign(args) -> int:
    from xdpml.models import signing

    try:
        data = Path(args.bundle).read_bytes()
    except OSError as exc:
        raise ModelError(f"bundle {args.bundle}: {exc.strerror}") from None
    bundle.loads(data, limits=WIDEST)  # well-formed; the agent checks its own limits
    name = args.name or Path(args.bundle).name.removesuffix(bundle.SUFFIX)
    env = signing.sign(data, signing.load_private_key(args.key), name=name, version=args.version)
    try:
        Path(args.out).write_bytes(env)
    except OSError as exc:
        raise ModelError(f"--out {args.out}: {exc.strerror}") from None
    m = signing.peek(env)[0]
    print(f"{args.out}: {m.name} v{m.version}, bundle sha256 {m.sha256[:16]}..., key {m.key_id}")
    return 0


def cmd_verify(args) -> int:
    from xdpml.models import signing

    try:
        env = Path(args.signed).read_bytes()
    except OSError as exc:
        raise ModelError(f"{args.signed}: {exc.strerror}") from None
    m, body = signing.verify(env, [signing.load_public_key(k) for k in args.trusted_key])
    model = bundle.loads(body, limits=WIDEST)
    print(json.dumps({**m.__dict__, "model": model.stats()}, indent=2, default=str))
    return 0


def add_model_commands(subparsers) -> None:
    from xdpml.config import EnforceSettings

    p = subparsers.add_parser("model", help="models in the kernel (docs/models.md)")
    sub = p.add_subparsers(dest="model_cmd", required=True)
    pin_default = EnforceSettings().pin_dir
    for name, hlp, func in (
        ("load", "compile a model and make it the running agent's, live (into the idle slot, then flip)", cmd_load),
        ("show", "the running agent's two slots: active one, models, packets per class", cmd_show),
        ("swap", "make the other slot active again (the model loaded before)", cmd_swap),
        ("unload", "stop classifying (an empty slot becomes active)", cmd_unload),
    ):
        q = sub.add_parser(name, help=hlp, description=hlp)
        if name == "load":
            q.add_argument("model", help=MODEL_HELP)
            q.add_argument(
                "--features",
                default="",
                help="comma-separated feature names in the model's input order (default: the names it was fitted on)",
            )
            q.add_argument(
                "--action",
                action="append",
                default=[],
                metavar="CLASS=ACTION",
                help="what packets of a class do: pass (default), alert (counted), drop (only in enforce mode, "
                "never an allowlisted address, never with the kill switch on: `xdpml rules mode|kill`), "
                "rate-limit:PPS[:BURST] (the same, for packets beyond PPS per second with bursts of BURST, "
                "default PPS); repeatable",
            )
        if name == "show":
            q.add_argument("--json", action="store_true", help="one line of JSON")
        q.add_argument(
            "--pin-dir",
            default=pin_default,
            help="the agent's --pin-dir, slots under PIN_DIR/model (default: %(default)s)",
        )
        q.set_defaults(func=func)
    c = sub.add_parser(
        "compile",
        help="check and convert a scikit-learn model for the datapath; prints its size, depth, cflags and "
        "estimated ns per classified packet (JSON)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("model", help=MODEL_HELP)
    c.add_argument(
        "--features",
        default="",
        help="comma-separated feature names in the model's input order (docs/models.md; "
        "default: the names it was fitted on)",
    )
    c.add_argument(
        "--out",
        default="",
        metavar="FILE.xdpml",
        help="write the compiled model as a bundle: data, not code (no pickle); loads with `xdpml model load`, "
        "--model, spec.model.file, or a signed push (docs/models.md)",
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
    k = sub.add_parser(
        "keygen",
        help="a new Ed25519 key pair to sign models with (offline, where models are trained)",
        description="writes NAME (private key, PEM, mode 0600) and NAME.pub (the agents' --model-trusted-key)",
    )
    k.add_argument("--out", required=True, metavar="NAME", help="private key file; the public key is NAME.pub")
    k.set_defaults(func=cmd_keygen)
    g = sub.add_parser(
        "sign",
        help="sign a bundle (.xdpml) with a name and version, for the collector to push (docs/models.md)",
    )
    g.add_argument("bundle", help="MODEL.xdpml (`xdpml model compile --out`)")
    g.add_argument("--key", required=True, help="private key (`xdpml model keygen`)")
    g.add_argument(
        "--version",
        required=True,
        type=int,
        help="integer, larger than any version signed before: agents refuse a version <= the one they run",
    )
    g.add_argument("--name", default="", help="model name in the logs (default: the bundle's file name)")
    g.add_argument("--out", required=True, metavar="SIGNED", help="the signed envelope (the collector's --push-model)")
    g.set_defaults(func=cmd_sign)
    v = sub.add_parser("verify", help="check a signed model as an agent would, and print its manifest")
    v.add_argument("signed", help="signed envelope (`xdpml model sign --out`)")
    v.add_argument("--trusted-key", action="append", required=True, metavar="FILE.pub", help="repeatable")
    v.set_defaults(func=cmd_verify)
