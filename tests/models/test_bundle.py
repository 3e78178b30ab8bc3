"""Compiled model bundles (.xdpml, xdpml/models/bundle.py): every model kind the compiler
supports round-trips to the same slot bytes; corrupt, truncated or hostile bundles are
refused with one line (never a traceback, never a pickle); the CLI writes and loads them."""

import argparse
import json
import struct

import joblib
import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from bench import model_zoo as zoo
from xdpml.errors import ModelError
from xdpml.models import bundle
from xdpml.models import layout as L
from xdpml.models.cli_commands import add_model_commands, compile_file
from xdpml.models.compiler import compile_model

LIM = L.Limits(trees=32, depth=12, nodes=4096, leaf_values=8192)


@pytest.fixture(scope="module")
def data():
    _, X = zoo.dataset(3000, seed=1)
    return X, zoo.labels(X)


@pytest.fixture(scope="module")
def tree_bundle(data):
    X, y = data
    return bundle.dumps(compile_model(zoo.train("tree", X, y), zoo.NAMES, limits=LIM))


def run(argv):
    ap = argparse.ArgumentParser()
    add_model_commands(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("kind", zoo.KINDS)
def test_round_trip_packs_the_same_slot(data, kind):
    X, y = data
    c = compile_model(zoo.train(kind, X, y), zoo.NAMES, limits=LIM)
    back = bundle.loads(bundle.dumps(c), limits=LIM)
    acts = {str(c.classes[-1]): "alert"}
    assert back.pack(LIM, model_id=7, actions=acts).tobytes() == c.pack(LIM, model_id=7, actions=acts).tobytes()
    assert back.stats() == c.stats() and back.notes == c.notes
    assert [type(a) for a in back.classes] == [type(np.asarray(c.classes).tolist()[0])] * len(c.classes)


def test_string_labels_stay_strings():
    X = np.array([[80], [443], [22], [53]] * 10)
    y = np.array(["web", "web", "ssh", "dns"] * 10)
    c = compile_model(DecisionTreeClassifier(random_state=0).fit(X, y), ["dst_port"], limits=LIM)
    back = bundle.loads(bundle.dumps(c), limits=LIM)
    assert back.classes == ["dns", "ssh", "web"]
    assert back.pack(LIM, actions={"ssh": "drop"}).tobytes() == c.pack(LIM, actions={"ssh": "drop"}).tobytes()


def _rewrite(data: bytes, edit) -> bytes:
    """The bundle with its JSON header changed by edit(header)."""
    n = len(bundle.MAGIC)
    _, hlen = struct.unpack("<HI", data[n : n + 6])
    h = json.loads(data[n + 6 : n + 6 + hlen])
    edit(h)
    head = json.dumps(h).encode()
    return data[:n] + struct.pack("<HI", bundle.VERSION, len(head)) + head + data[n + 6 + hlen :]


def _set(key, value):
    return lambda h: h.__setitem__(key, value)


def _array(name, key, value):
    def edit(h):
        next(a for a in h["arrays"] if a["name"] == name)[key] = value

    return edit


def _body_poke(data: bytes, name: str, value: int) -> bytes:
    """The bundle with the first element of array ``name`` set to ``value``."""
    n = len(bundle.MAGIC)
    _, hlen = struct.unpack("<HI", data[n : n + 6])
    h = json.loads(data[n + 6 : n + 6 + hlen])
    off = n + 6 + hlen + next(a for a in h["arrays"] if a["name"] == name)["offset"]
    return data[:off] + struct.pack("<q", value) + data[off + 8 :]


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: b"", "bad magic or too short"),
        (lambda d: b"PK\x03\x04" + d[4:], "bad magic"),
        (lambda d: d[:10], "bad magic or too short"),
        (lambda d: d[:20], "truncated"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\0", "bytes after the last array"),
        (lambda d: d[:8] + struct.pack("<H", 9) + d[10:], "format version 9"),
        (lambda d: d[:14] + b"x" + d[15:], "header is not JSON"),
        (lambda d: _rewrite(d, _set("features", ["ip_ttl", "no_such_feature"] + zoo.NAMES[2:])), "no_such_feature"),
        (lambda d: _rewrite(d, _set("kind", 9)), r"kind 9: expected an integer in \[1, 3\]"),
        (lambda d: _rewrite(d, _set("classes", [])), "classes"),
        (lambda d: _rewrite(d, _set("n_outputs", 5)), "n_outputs 5"),
        (lambda d: _rewrite(d, _set("decision", 4)), r"decision 4: expected an integer in \[0, 3\]"),
        (lambda d: _rewrite(d, _set("decision", 3)), "n_outputs 4 does not fit 4 classes with decision 3"),
        (
            lambda d: _rewrite(d, lambda h: h.update(kind=2, decision=3, n_outputs=len(h["classes"]) - 1)),
            "argmax-last0 is for forests only",
        ),
        (lambda d: _rewrite(d, _array("node_thr", "dtype", "f8")), "dtype 'f8'"),
        (lambda d: _rewrite(d, _array("node_thr", "dtype", "O")), "dtype 'O'"),
        (lambda d: _rewrite(d, _array("node_thr", "shape", [3])), "offset/size"),
        (lambda d: _rewrite(d, _array("node_thr", "shape", [-1])), "bad shape"),
        (lambda d: _rewrite(d, lambda h: h["arrays"].pop()), "leaf_values missing"),
        (lambda d: _body_poke(d, "node_left", 1 << 20), r"node_left out of range"),
        (lambda d: _body_poke(d, "roots", -1), r"roots out of range"),
        (lambda d: _body_poke(d, "node_feat", 99), r"node_feat out of range"),
        (lambda d: _rewrite(d, _set("depth", 99)), r"tree depth 99 > 12"),
    ],
)
def test_damaged_bundles_are_refused_in_one_line(tree_bundle, damage, match):
    with pytest.raises(ModelError, match=match) as exc:
        bundle.loads(damage(tree_bundle), limits=LIM)
    assert "\n" not in str(exc.value)


def test_every_truncation_is_refused(tree_bundle):
    for n in range(0, len(tree_bundle), max(1, len(tree_bundle) // 400)):
        with pytest.raises(ModelError):
            bundle.loads(tree_bundle[:n], limits=LIM)


def test_limits_are_checked_on_read(tree_bundle):
    with pytest.raises(ModelError, match="tree depth .* > 4 .*MAX_DEPTH"):
        bundle.loads(tree_bundle, limits=L.Limits(depth=4))


def test_cli_compile_out_then_load_the_bundle(tmp_path, data, capsys):
    X, y = data
    src = tmp_path / "forest.joblib"
    joblib.dump(zoo.train("forest", X, y), src)
    out = tmp_path / "forest.xdpml"
    assert run(["model", "compile", str(src), "--features", ",".join(zoo.NAMES), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bundle"] == {"file": str(out), "bytes": out.stat().st_size}
    assert not out.read_bytes().startswith(b"\x80")  # not a pickle
    # the bundle is a model file like the others: compile reads it, with or without --features
    want = compile_file(str(src), zoo.NAMES, LIM).pack(LIM).tobytes()
    assert compile_file(str(out), "", LIM).pack(LIM).tobytes() == want
    assert compile_file(str(out), zoo.NAMES, LIM).pack(LIM).tobytes() == want
    with pytest.raises(ModelError, match="the bundle's features are"):
        compile_file(str(out), ["ip_ttl"], LIM)
    assert run(["model", "compile", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["estimator"] == "RandomForestClassifier"
    with pytest.raises(ModelError, match="expected a .xdpml file"):
        run(["model", "compile", str(src), "--features", ",".join(zoo.NAMES), "--out", str(tmp_path / "x.bin")])
    with pytest.raises(ModelError, match="no such file"):
        compile_file(str(tmp_path / "none.xdpml"), "", LIM)
    bad = tmp_path / "bad.xdpml"
    bad.write_bytes(out.read_bytes()[:100])
    with pytest.raises(ModelError, match=r"bad.xdpml: model bundle: .*truncated"):
        compile_file(str(bad), "", LIM)
