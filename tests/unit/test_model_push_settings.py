"""Where an agent's trusted model keys come from: `--model-trusted-key` (repeatable,
absolute paths) and AgentConfig `spec.model.trustedKeys`; trusting a key compiles the
model slots in (pushed models need them); a bundle is a model file like the others."""

import pytest

from xdpml.cli import build_parser, settings_from_args
from xdpml.config import ConfigError, ModelSettings
from xdpml.kube.agentconfig import parse_spec

BASE = {"interfaces": [{"names": ["pod-veths"], "hooks": "tc"}]}


def test_cli_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = build_parser().parse_args(
        ["agent", "-i", "eth0", "--model-trusted-key", "a.pub", "--model-trusted-key", "/k/b.pub"]
    )
    m = settings_from_args(a).model
    assert m.trusted_keys == [str(tmp_path / "a.pub"), "/k/b.pub"] and m.enabled
    assert not settings_from_args(build_parser().parse_args(["agent", "-i", "eth0"])).model.trusted_keys


def test_agentconfig_trusted_keys():
    m = parse_spec(dict(BASE, model={"trustedKeys": ["/etc/xdpml/keys/trainer.pub"]})).settings.model
    assert m.trusted_keys == ["/etc/xdpml/keys/trainer.pub"] and m.enabled
    assert parse_spec(BASE).settings.model.trusted_keys == []
    with pytest.raises(ConfigError, match="trustedKeys"):
        parse_spec(dict(BASE, model={"trustedKeys": ["relative.pub"]}))
    assert parse_spec(dict(BASE, model={"file": "/m/tree.xdpml"})).settings.model.file == "/m/tree.xdpml"


def test_bundle_is_a_model_file():
    ModelSettings(file="/m/tree.xdpml").validate()
    with pytest.raises(ConfigError, match=r"\.joblib, \.pkl, \.onnx or \.xdpml"):
        ModelSettings(file="/m/tree.bin").validate()
