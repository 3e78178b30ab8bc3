"""--push-model (collector/push.py): the collector reads only the manifest of the signed
file, re-reads it when it changes, and keeps the last good envelope when the new file is
malformed or missing."""

import numpy as np
from sklearn.tree import DecisionTreeClassifier
from xdpml.collector.push import ModelPush

from xdpml.models import bundle, signing
from xdpml.models.compiler import compile_model


def test_push_file_is_reread_and_a_bad_file_keeps_the_last_good_one(tmp_path):
    X = np.array([[80], [443], [22]] * 5)
    data = bundle.dumps(compile_model(DecisionTreeClassifier().fit(X, [0, 1, 1] * 5), ["dst_port"]))
    key = signing.load_private_key(signing.keygen(str(tmp_path / "k"))[0])
    path = tmp_path / "m.signed"
    push = ModelPush(str(path), check_every_s=0)
    assert push.current() is None  # no file yet: nothing to push
    env1 = signing.sign(data, key, name="tree", version=1)
    path.write_bytes(env1)
    u = push.current()
    assert (u.name, u.version, u.signed) == ("tree", 1, env1)
    env2 = signing.sign(data, key, name="tree", version=2)
    tmp = tmp_path / "new"
    tmp.write_bytes(env2)
    tmp.replace(path)
    assert push.current().version == 2
    tmp.write_bytes(b"not signed at all")
    tmp.replace(path)
    assert push.current().signed == env2  # malformed: the agents keep getting v2
    path.unlink()
    assert push.current().version == 2
