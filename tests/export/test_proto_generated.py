"""The committed generated code in xdpml/wire/v1 is exactly what the pinned generator writes."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pinned_grpcio_tools() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"grpcio-tools==([0-9.]+)"', text)
    assert m, "pyproject.toml must pin grpcio-tools=="
    return m.group(1)


def test_generator_is_the_pinned_version():
    from importlib.metadata import version

    assert version("grpcio-tools") == _pinned_grpcio_tools()


def test_generated_code_matches_proto_files(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)], check=True, env=env)
    fresh = sorted(p.name for p in (tmp_path / "xdpml" / "wire" / "v1").iterdir())
    committed = sorted(
        p.name
        for p in (ROOT / "xdpml" / "wire" / "v1").iterdir()
        if p.name != "__init__.py" and p.suffix in (".py", ".pyi")
    )
    assert fresh == committed
    protos = sorted(p.stem for p in (ROOT / "proto" / "xdpml" / "wire" / "v1").glob("*.proto"))
    assert fresh == sorted(f"{s}{suffix}" for s in protos for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    for name in fresh:
        assert (tmp_path / "xdpml" / "wire" / "v1" / name).read_bytes() == (
            ROOT / "xdpml" / "wire" / "v1" / name
        ).read_bytes(), f"xdpml/wire/v1/{name} is stale: run scripts/gen-proto.sh and commit"
