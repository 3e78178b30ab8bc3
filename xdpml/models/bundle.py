"""A compiled model as a file (``.xdpml``): data, never code.

A ``.joblib``/``.pkl`` model is a pickle, and loading a pickle runs whatever it
says; a bundle is the :class:`CompiledModel` the kernel runs, as integers:

    MAGIC (8 bytes) | version (u16 LE) | header length (u32 LE) | header (JSON, UTF-8) | arrays

The header holds the model's metadata (kind, decision, estimator, feature names,
class labels as JSON ints or strings, n_outputs, frac_bits, depth, MLP layer
multipliers, notes) and, per array, its name, dtype, shape and byte range in the
arrays part (raw little-endian). :func:`loads` checks everything it reads (magic,
version, sizes, dtypes, shapes, every index in range, feature names) and raises a
one-line ModelError, so a corrupt or truncated file is refused, never a traceback."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from xdpml.errors import ModelError
from xdpml.models import layout as L
from xdpml.models.compiler import CompiledModel
from xdpml.models.features import resolve

MAGIC = b"XDPMLMOD"
VERSION = 1
SUFFIX = ".xdpml"
_HEAD = struct.Struct("<HI")
MAX_HEADER = 1 << 20
MAX_ARRAYS_BYTES = 64 << 20
_DTYPES: dict[str, np.dtype] = {"i8": np.dtype("<i8"), "i1": np.dtype("i1")}
_TREE_ARRAYS = ("roots", "node_feat", "node_thr", "node_left", "node_leaf", "leaf_values")
_MLP_INPUTS = ("in_mul", "in_add", "in_shift")


def _label(v):
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ModelError(f"class label {v!r} ({type(v).__name__}): a bundle holds integer or string labels")
    return v


def dumps(model: CompiledModel) -> bytes:
    """CompiledModel -> bundle bytes."""
    arrays: list[tuple[str, Any]] = [("bias", model.bias)]
    if model.kind == L.KIND_TREES:
        arrays += [(n, getattr(model, n)) for n in _TREE_ARRAYS]
    elif model.kind == L.KIND_LINEAR:
        arrays.append(("weights", model.weights))
    elif model.kind == L.KIND_MLP:
        arrays += [(n, getattr(model, n)) for n in _MLP_INPUTS]
        for i, (w, b, _) in enumerate(model.layers):
            arrays += [(f"layer{i}.w", w), (f"layer{i}.bias", b)]
    else:
        raise ModelError(f"model kind {model.kind}: nothing to write")
    index, blobs, offset = [], [], 0
    for name, arr in arrays:
        a = np.asarray(arr)
        code = "i1" if a.dtype == np.int8 else "i8"
        raw = np.ascontiguousarray(a, dtype=_DTYPES[code]).tobytes()
        index.append({"name": name, "dtype": code, "shape": list(a.shape), "offset": offset, "nbytes": len(raw)})
        blobs.append(raw)
        offset += len(raw)
    header = {
        "kind": int(model.kind),
        "decision": int(model.decision),
        "estimator": str(model.estimator),
        "features": [f.name for f in model.features],
        "classes": [_label(c) for c in model.classes],
        "n_outputs": int(model.n_outputs),
        "frac_bits": int(model.frac_bits),
        "depth": int(model.depth),
        "layer_mult": [int(m) for _, _, m in model.layers],
        "notes": [str(n) for n in model.notes],
        "arrays": index,
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + _HEAD.pack(VERSION, len(head)) + head + b"".join(blobs)


def _bad(what: str) -> ModelError:
    return ModelError(f"model bundle: {what}")


def _int(h: dict, key: str, lo: int, hi: int) -> int:
    v = h.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{key} {v!r}: expected an integer in [{lo}, {hi}]")
    return v


def _header(data: bytes) -> tuple[dict, memoryview]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad("not bytes")
    view = memoryview(data)
    start = len(MAGIC) + _HEAD.size
    if len(view) < start or bytes(view[: len(MAGIC)]) != MAGIC:
        raise _bad("not an .xdpml file (bad magic or too short)")
    version, hlen = _HEAD.unpack(view[len(MAGIC) : start])
    if version != VERSION:
        raise _bad(f"format version {version}, this agent reads version {VERSION}")
    if hlen > MAX_HEADER or start + hlen > len(view):
        raise _bad(f"header of {hlen} bytes, {len(view) - start} in the file (truncated?)")
    try:
        h = json.loads(bytes(view[start : start + hlen]).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"header is not JSON ({exc})") from None
    if not isinstance(h, dict):
        raise _bad("header is not a JSON object")
    return h, view[start + hlen :]


def _arrays(h: dict, body: memoryview) -> dict[str, np.ndarray]:
    index = h.get("arrays")
    if not isinstance(index, list):
        raise _bad("no array index")
    if len(body) > MAX_ARRAYS_BYTES:
        raise _bad(f"{len(body)} bytes of arrays > {MAX_ARRAYS_BYTES}")
    out: dict[str, np.ndarray] = {}
    end = 0
    for e in index:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise _bad("malformed array entry")
        name = e["name"]
        dt = _DTYPES.get(str(e.get("dtype")))
        shape = e.get("shape")
        if dt is None:
            raise _bad(f"array {name}: dtype {e.get('dtype')!r}, expected i8 or i1")
        if (
            not isinstance(shape, list)
            or len(shape) > 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_ARRAYS_BYTES for s in shape)
        ):
            raise _bad(f"array {name}: bad shape {shape!r}")
        off, nbytes = e.get("offset"), e.get("nbytes")
        if off != end or nbytes != math.prod(shape) * dt.itemsize:
            raise _bad(f"array {name}: offset/size {off!r}/{nbytes!r} do not match its shape and position")
        if off + nbytes > len(body):
            raise _bad(f"array {name} ends at byte {off + nbytes}, the file has {len(body)} (truncated?)")
        if name in out:
            raise _bad(f"array {name} twice")
        out[name] = np.frombuffer(body[off : off + nbytes], dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
        end = off + nbytes
    if end != len(body):
        raise _bad(f"{len(body) - end} bytes after the last array")
    return out


def _need(arrs: dict, name: str, shape: tuple, dtype: str = "i8") -> np.ndarray:
    a = arrs.get(name)
    if a is None:
        raise _bad(f"array {name} missing")
    if a.dtype != _DTYPES[dtype] or a.shape != shape:
        raise _bad(f"array {name}: {a.dtype.str} {list(a.shape)}, expected {dtype} {list(shape)}")
    return a


def _in_range(name: str, a: np.ndarray, lo: int, hi: int) -> None:
    if a.size and (int(a.min()) < lo or int(a.max()) >= hi):
        raise _bad(f"{name} out of range: values must be in [{lo}, {hi})")


def loads(data: bytes, *, limits: L.Limits = L.DEFAULT_LIMITS) -> CompiledModel:
    """Bundle bytes -> CompiledModel, checked against ``limits``; ModelError (one line) on
    anything malformed."""
    h, body = _header(data)
    arrs = _arrays(h, body)
    kind = _int(h, "kind", L.KIND_TREES, L.KIND_MLP)
    decision = _int(h, "decision", L.DEC_LEAF, L.DEC_ARGMAX_LAST0)
    n_out = _int(h, "n_outputs", 1, 1 << 16)
    frac = _int(h, "frac_bits", 0, 62)
    depth = _int(h, "depth", 0, 1 << 16)
    names, classes = h.get("features"), h.get("classes")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _bad("features: expected a list of feature names")
    feats = resolve(names)
    nf = len(feats)
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in classes)
    ):
        raise _bad("classes: expected a list of integer or string labels")
    if len({str(c) for c in classes}) != len(classes):
        raise _bad("classes: a label twice")
    want_out = {L.DEC_BINARY: 1, L.DEC_ARGMAX_LAST0: len(classes) - 1}.get(decision, len(classes))
    if n_out != want_out or n_out < 1:
        raise _bad(f"n_outputs {n_out} does not fit {len(classes)} classes with decision {decision}")
    est, notes, mults = h.get("estimator"), h.get("notes", []), h.get("layer_mult", [])
    if not isinstance(est, str) or not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _bad("estimator/notes: expected strings")
    if decision == L.DEC_LEAF and kind != L.KIND_TREES:
        raise _bad("decision leaf is for trees only")
    if decision == L.DEC_ARGMAX_LAST0 and kind != L.KIND_TREES:
        raise _bad("decision argmax-last0 is for forests only")
    m = CompiledModel(
        kind=kind,
        decision=decision,
        estimator=est,
        features=feats,
        classes=list(classes),
        n_outputs=n_out,
        frac_bits=frac,
        bias=_need(arrs, "bias", (n_out,)),
        depth=depth,
        notes=list(notes),
    )
    expect = {"bias"}
    if kind == L.KIND_TREES:
        lists: dict[str, Any] = {k: arrs.get(k) for k in ("roots", "node_feat", "leaf_values")}
        for k, a in lists.items():
            if a is None or a.ndim != 1:
                raise _bad(f"array {k} missing or not a list")
            _need(arrs, k, a.shape)
        n, leaf_values = len(lists["node_feat"]), lists["leaf_values"]
        if not n or not len(lists["roots"]):
            raise _bad("trees: no roots or no nodes")
        for k in ("node_thr", "node_left", "node_leaf"):
            _need(arrs, k, (n,))
        _in_range("roots", arrs["roots"], 0, n)
        _in_range("node_left", arrs["node_left"], 0, n)
        _in_range("node_feat", arrs["node_feat"], 0, nf)
        if decision == L.DEC_LEAF:
            _in_range("node_leaf (a class)", arrs["node_leaf"], 0, len(classes))
        else:
            _in_range("node_leaf", arrs["node_leaf"], 0, max(len(leaf_values) - n_out + 1, 0) or 1)
            if len(leaf_values) < n_out:
                raise _bad(f"{len(leaf_values)} leaf values < {n_out} outputs")
        for k in _TREE_ARRAYS:
            setattr(m, k, arrs[k])
        expect.update(_TREE_ARRAYS)
    elif kind == L.KIND_LINEAR:
        m.weights = _need(arrs, "weights", (n_out, nf))
        expect.add("weights")
    else:
        if not isinstance(mults, list) or not mults or not all(isinstance(x, int) for x in mults):
            raise _bad("layer_mult: expected a list of integers, one per MLP layer")
        for k in _MLP_INPUTS:
            setattr(m, k, _need(arrs, k, (nf,)))
        _in_range("in_shift", arrs["in_shift"], 0, 63)
        width = nf
        for i, mult in enumerate(mults):
            w = arrs.get(f"layer{i}.w")
            if w is None or w.ndim != 2 or w.shape[0] != width:
                raise _bad(f"MLP layer {i}: weights missing or not {width} inputs wide")
            _need(arrs, f"layer{i}.w", w.shape, "i1")
            b = _need(arrs, f"layer{i}.bias", (w.shape[1],))
            m.layers.append((w, b, mult))
            expect.update((f"layer{i}.w", f"layer{i}.bias"))
            width = w.shape[1]
        if width != n_out:
            raise _bad(f"MLP: last layer has {width} outputs, the model {n_out}")
        expect.update(_MLP_INPUTS)
    extra = sorted(set(arrs) - expect)
    if extra:
        raise _bad(f"unexpected array(s) {', '.join(extra)}")
    m.check(limits)
    return m


def read(path: str, *, limits: L.Limits = L.DEFAULT_LIMITS) -> CompiledModel:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ARRAYS_BYTES + MAX_HEADER + 64)
    except OSError as exc:
        raise ModelError(f"model file {path}: {exc.strerror}") from None
    try:
        return loads(data, limits=limits)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
