"""xdpml.kube.model_source.ConfigMapModel against the fake API server: what it hands over
for each version of the ConfigMap (no datapath: tests/k8s/test_agent_model.py loads them)."""

from __future__ import annotations

import base64
import threading

import pytest

from xdpml.kube.model_source import ConfigMapModel
from xdpml.kube.reflector import Backoff

from .conftest import wait_for

pytestmark = pytest.mark.timeout(60)


class Calls:
    def __init__(self):
        self.lock = threading.Lock()
        self.got: list[tuple[bytes | None, str, str]] = []

    def __call__(self, src, data, problem, version):
        with self.lock:
            self.got.append((data, problem, version))

    def __len__(self):
        with self.lock:
            return len(self.got)


def source(api_client, calls, **kw) -> ConfigMapModel:
    return ConfigMapModel(
        api_client,
        namespace="xdpml",
        name="m",
        key="m.onnx",
        on_model=calls,
        watch_timeout_s=5,
        backoff_factory=lambda: Backoff(base_s=0.05, cap_s=0.2),
        **kw,
    )


def cm(**body) -> dict:
    return {"metadata": {"name": "m", "namespace": "xdpml"}, **body}


def test_versions_handed_over(fake_api, api_client):
    calls = Calls()
    fake_api.create("configmaps", {"metadata": {"name": "other", "namespace": "xdpml"}, "data": {"m.onnx": "x"}})
    src = source(api_client, calls, max_bytes=8).start()
    try:
        wait_for(lambda: len(calls) == 1, 10, "first version")
        assert calls.got[0] == (None, "ConfigMap xdpml/m not found", "")
        raw = bytes(range(256))[:8]  # not UTF-8: binaryData only
        v1 = fake_api.create("configmaps", cm(binaryData={"m.onnx": base64.b64encode(raw).decode()}))
        wait_for(lambda: len(calls) == 2, 10, "binaryData")
        assert calls.got[1] == (raw, "", v1["metadata"]["resourceVersion"])
        same = fake_api.update("configmaps", "xdpml", "m", lambda o: o["metadata"].update(labels={"a": "b"}))
        wait_for(lambda: src.seen == same["metadata"]["resourceVersion"], 10, "same bytes seen")
        v3 = fake_api.update("configmaps", "xdpml", "m", lambda o: o.update(binaryData={}, data={"m.onnx": "text"}))
        wait_for(lambda: len(calls) == 3, 10, "data")
        assert calls.got[2] == (b"text", "", v3["metadata"]["resourceVersion"])
        v4 = fake_api.update("configmaps", "xdpml", "m", lambda o: o.update(data={"m.onnx": "123456789"}))
        wait_for(lambda: len(calls) == 4, 10, "too big")
        assert calls.got[3] == (
            None,
            "ConfigMap xdpml/m key m.onnx: 9 bytes, more than the 8 a model may have",
            v4["metadata"]["resourceVersion"],
        )
        assert (src.data, src.version) == (b"text", v3["metadata"]["resourceVersion"])  # the last good bytes
        fake_api.update("configmaps", "xdpml", "m", lambda o: o.update(data={"x.onnx": "1"}))
        wait_for(lambda: len(calls) == 5, 10, "no key")
        assert calls.got[4][:2] == (None, "ConfigMap xdpml/m key m.onnx: no such key (keys: x.onnx)")
    finally:
        src.stop()


def test_forbidden_is_reported_then_read(fake_api, api_client):
    calls = Calls()
    v1 = fake_api.create("configmaps", cm(data={"m.onnx": "abc"}))
    fake_api.fail_rules[("GET", "/configmaps")] = [403, 2]
    src = source(api_client, calls).start()
    try:
        wait_for(lambda: len(calls) == 2, 10, "refused, then read")
        data, problem, _ = calls.got[0]
        assert data is None and problem.startswith("cannot read ConfigMap xdpml/m: API error 403")
        assert "rbac.modelConfigMaps" in problem
        assert calls.got[1] == (b"abc", "", v1["metadata"]["resourceVersion"])
        q = [r.query for r in fake_api.requests if r.path.endswith("/configmaps")]
        assert q and all(x.get("fieldSelector") == "metadata.name=m" for x in q)
    finally:
        src.stop()
