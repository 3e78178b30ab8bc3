"""Packaging and layers: one import namespace, the BPF sources in the wheel, the import
contract (lint-imports) kept, nothing importing the tests.

The package maps the top-level folders agent/, collector/ and bpf/ into ``xdpml`` (setuptools
package-dir), which only an installed copy shows whole: so these tests install the project,
without dependencies, into a temporary folder and look at that.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    # from a copy, so the build leaves nothing (build/, *.egg-info) in the source tree
    src = tmp_path_factory.mktemp("src") / "xdpml"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "*.egg-info", "__pycache__", "tests", "docs", "helm", "bench"
        ),
    )
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return target


def _package_folders() -> dict[str, Path]:
    """Every folder with an __init__.py, by its name in the xdpml namespace."""
    out = {"xdpml.bpf": ROOT / "bpf"}
    for top, name in (("xdpml", "xdpml"), ("agent", "xdpml.agent"), ("collector", "xdpml.collector")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            out[".".join((name, *rel))] = init.parent
    return out


def test_pyproject_lists_every_package():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == set(_package_folders())


def test_only_xdpml_is_installed_at_the_top(installed):
    tops = {p.name for p in installed.iterdir()} - {"bin"}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"xdpml"}


def test_bpf_sources_ship_and_the_loader_finds_them(installed):
    shipped = {p.name for p in (installed / "xdpml" / "bpf").iterdir()}
    assert {p.name for p in (ROOT / "bpf").iterdir() if p.suffix in (".c", ".h")} <= shipped
    code = "from xdpml.datapath.source import bpf_dir, program_text; print(bpf_dir()); print(len(program_text()))"
    env = {k: v for k, v in os.environ.items() if k != "XDPML_BPF_DIR"}
    env["PYTHONPATH"] = str(installed)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    where, size = r.stdout.split()
    assert Path(where) == installed / "xdpml" / "bpf" and int(size) > 1000


def test_import_contract_is_kept(installed):
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run(
        [str(exe), str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=installed,
        env=dict(os.environ, PYTHONPATH=str(installed)),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_nothing_outside_tests_imports_tests():
    pattern = re.compile(r"^\s*(from|import)\s+(tests|netns|harness|grpc_fixtures)\b|sys\.path\.(insert|append)")
    offenders = []
    for folder in ("xdpml", "agent", "collector", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
