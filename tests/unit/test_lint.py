"""The linters contributors run (.pre-commit-config.yaml) pass on the whole tree: ruff's
lint and format checks, and mypy over the library layers (wire, obs, datapath, kube, models,
errors, config; the agent, collector and CLI packages are a follow-up)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MYPY_MODULES = (
    "xdpml.errors",
    "xdpml.config",
    "xdpml.wire",
    "xdpml.obs",
    "xdpml.datapath",
    "xdpml.kube",
    "xdpml.models",
)


def test_ruff_check():
    r = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = subprocess.run(
        [str(BIN / "ruff"), "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_on_the_library_layers():
    args = ["--follow-imports=silent", *[a for m in MYPY_MODULES for a in ("-p", m)]]
    r = subprocess.run(
        [str(ROOT / "scripts" / "mypy.sh"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
