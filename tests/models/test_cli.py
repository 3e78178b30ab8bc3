"""`xdpml model compile` on real joblib files: report, and one-line refusals."""

import argparse
import json

import joblib
import pytest

from bench import model_zoo as zoo
from xdpml.errors import ModelError
from xdpml.models.cli_commands import add_model_commands


def run(argv):
    ap = argparse.ArgumentParser()
    add_model_commands(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(argv)
    return args.func(args)


def test_compile_reports_size_and_depth(tmp_path, capsys):
    _, X = zoo.dataset(3000, seed=1)
    path = tmp_path / "tree.joblib"
    joblib.dump(zoo.train("tree", X, zoo.labels(X)), path)
    assert run(["model", "compile", str(path), "--features", ",".join(zoo.NAMES)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimator"] == "DecisionTreeClassifier" and out["depth"] <= 10 and out["nodes"] > 1
    assert "-DXDPML_MODEL=1" in out["cflags"]
    levels = -(-out["depth"] // 2) * 2  # one tree: in heap order if its 2^(levels+1) - 1 positions fit the nodes
    assert out["walk"] == {"order": "heap", "levels": levels} and 2 ** (levels + 1) - 1 <= 8192
    few = 1 << (out["nodes"] - 1).bit_length()  # room for its nodes, not for its heap order
    assert few < 2 ** (levels + 1) - 1
    assert run(["model", "compile", str(path), "--features", ",".join(zoo.NAMES), "--max-nodes", str(few)]) == 0
    assert json.loads(capsys.readouterr().out)["walk"] == {"order": "pairs", "levels": -(-out["depth"] // 4) * 4}
    with pytest.raises(ModelError, match="tree depth .* > 4 .*MAX_DEPTH"):
        run(["model", "compile", str(path), "--features", ",".join(zoo.NAMES), "--max-depth", "4"])


def test_bad_files_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        run(["model", "compile", str(tmp_path / "none.joblib"), "--features", "ip_ttl"])
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match="cannot load the model"):
        run(["model", "compile", str(bad), "--features", "ip_ttl"])
