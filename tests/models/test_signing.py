"""Signed model envelopes (xdpml/models/signing.py) and `xdpml model keygen|sign|verify`:
a trusted key's envelope verifies to the exact bundle; an unknown key, a bad signature,
a changed bundle or manifest, and malformed envelopes are refused with one line."""

import argparse
import json
import os
import stat
import struct

import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from xdpml.errors import ModelError
from xdpml.models import bundle, signing
from xdpml.models.cli_commands import add_model_commands
from xdpml.models.compiler import compile_model


def run(argv):
    ap = argparse.ArgumentParser()
    add_model_commands(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def tree_bytes():
    X = np.array([[80], [443], [22], [53]] * 10)
    y = np.array([0, 0, 1, 2] * 10)
    return bundle.dumps(compile_model(DecisionTreeClassifier(random_state=0).fit(X, y), ["dst_port"]))


@pytest.fixture
def keys(tmp_path):
    a = signing.keygen(str(tmp_path / "a"))
    b = signing.keygen(str(tmp_path / "b"))
    return {n: (signing.load_private_key(p), signing.load_public_key(q)) for n, (p, q) in zip("ab", (a, b))}


def test_keygen_files(tmp_path):
    priv, pub = signing.keygen(str(tmp_path / "k"))
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert open(pub).read().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ModelError, match="exists: not overwriting"):
        signing.keygen(str(tmp_path / "k"))


def test_trusted_key_verifies_to_the_bundle(keys, tree_bytes):
    env = signing.sign(tree_bytes, keys["a"][0], name="tree", version=3)
    m, body = signing.verify(env, [keys["b"][1], keys["a"][1]])
    assert body == tree_bytes
    assert (m.name, m.version, m.key_id) == ("tree", 3, signing.key_id(keys["a"][1]))


def _reframe(env: bytes, old: bytes, new: bytes) -> bytes:
    """The envelope with its manifest edited (and its length field kept right), same signature."""
    _, head, sig, body = signing.peek(env)
    head = head.replace(old, new)
    return signing.MAGIC + struct.pack("<I", len(head)) + head + sig + body


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def test_refusals(keys, tree_bytes):
    env = signing.sign(tree_bytes, keys["a"][0], name="tree", version=3)
    trusted = [keys["a"][1]]
    n = len(signing.MAGIC) + 4 + len(signing.peek(env)[1])
    cases = [
        (env, [keys["b"][1]], "untrusted", "is not trusted"),
        (env, [], "untrusted", "is not trusted"),
        (_flip(env, len(env) - 1), trusted, "bad_signature", "not the one signed"),
        (_flip(env, n + 3), trusted, "bad_signature", "bad signature"),
        (env.replace(b'"version":3', b'"version":4'), trusted, "bad_signature", "bad signature"),
    ]
    for data, tk, reason, match in cases:
        with pytest.raises(signing.SignatureRefused, match=match) as exc:
            signing.verify(data, tk)
        assert exc.value.reason == reason and "\n" not in str(exc.value)
    for data, match in [
        (b"", "bad magic"),
        (tree_bytes, "bad magic"),
        (env[:20], "truncated"),
        (env[: n + 10], "truncated"),
        (_reframe(env, b'"version":3', b'"version":"3"'), "version '3'"),
        (_reframe(env, b'"name"', b'"nome"'), "manifest fields"),
        (_reframe(env, b"{", b"["), "not JSON|manifest fields"),
    ]:
        with pytest.raises(ModelError, match=match) as exc:
            signing.verify(data, trusted)
        assert not isinstance(exc.value, signing.SignatureRefused)
    with pytest.raises(ModelError, match="version 0"):
        signing.sign(tree_bytes, keys["a"][0], name="tree", version=0)


def test_cli_keygen_sign_verify(tmp_path, tree_bytes, capsys):
    b = tmp_path / "tree.xdpml"
    b.write_bytes(tree_bytes)
    assert run(["model", "keygen", "--out", str(tmp_path / "trainer")]) == 0
    assert "mode 0600" in capsys.readouterr().out
    out = tmp_path / "tree.signed"
    assert run(["model", "sign", str(b), "--key", str(tmp_path / "trainer"), "--version", "7", "--out", str(out)]) == 0
    assert "tree v7" in capsys.readouterr().out
    assert run(["model", "verify", str(out), "--trusted-key", str(tmp_path / "trainer.pub")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 7 and shown["model"]["estimator"] == "DecisionTreeClassifier"
    with pytest.raises(ModelError, match="not an Ed25519 public key|not a PEM public key"):
        run(["model", "verify", str(out), "--trusted-key", str(tmp_path / "trainer")])
    junk = tmp_path / "junk.xdpml"
    junk.write_bytes(b"junk")
    with pytest.raises(ModelError, match="model bundle: not an .xdpml file"):
        run(["model", "sign", str(junk), "--key", str(tmp_path / "trainer"), "--version", "1", "--out", str(out)])
    assert signing.peek(out.read_bytes())[0].version == 7  # the refused sign left the old file
