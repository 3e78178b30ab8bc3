"""The agent container's start command, run for real (as the kubelet would) in a private
mount namespace laid out like the image: /opt/xdpml holds the repo, /lib/modules is
either the host's (kernelHeaders.fromHost) or the image's own, empty one. Checks the
kernel-header choice, that host headers are never touched, and that the agent gets
exactly the rendered arguments through `exec`."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_chart import CHART, agent_pod, load_values

ROOT = Path(__file__).resolve().parents[2]
KREL = os.uname().release

pytestmark = pytest.mark.root


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


needs_ns = pytest.mark.skipif(not _can_unshare(), reason="needs root and mount namespaces")


def run_start(tmp_path: Path, values: dict, *, empty_lib_modules: bool) -> subprocess.CompletedProcess:
    _, c = agent_pod(values)
    fake = tmp_path / "bin"
    fake.mkdir()
    # Stands in for the real CLI: records the argv it was started with.
    (fake / "xdpml").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT/args"\n')
    (fake / "xdpml").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    cmd = " ".join(shlex.quote(a) for a in c["command"] + c["args"])
    script = f"""
set -e
mount -t tmpfs tmpfs /opt
mkdir /opt/xdpml
mount --bind {shlex.quote(str(ROOT))} /opt/xdpml
{"mount -t tmpfs tmpfs /lib/modules" if empty_lib_modules else ""}
set +e
( exec {cmd} )
rc=$?
echo "rc=$rc" > {out}/rc
readlink /lib/modules/{KREL}/build > {out}/build 2>/dev/null || true
exit $rc
"""
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out)}
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def host_has_headers() -> bool:
    b = Path(f"/lib/modules/{KREL}/build")
    return (b / "include/generated/autoconf.h").exists() or (b / "include/linux/kconfig.h").exists()


def debian_headers_present() -> bool:
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    return bool(arch) and any(Path("/usr/src").glob(f"linux-headers-*-{arch}"))


@needs_ns
@pytest.mark.skipif(
    not debian_headers_present(),
    reason="no Debian linux-headers-<arch> in /usr/src (the image has them; "
    "kernel-headers.sh would apt-get install them here)",
)
def test_image_headers_linked_when_host_has_none(tmp_path):
    values = {"agent": {"kernelHeaders": {"fromHost": False}}}
    r = run_start(tmp_path, values, empty_lib_modules=True)
    assert r.returncode == 0, r.stderr
    assert "[headers] fallback: Debian headers" in r.stderr and f"linked for kernel {KREL}" in r.stderr
    build = (tmp_path / "out" / "build").read_text().strip()
    assert build.startswith("/usr/src/linux-headers-") and build.endswith("-amd64")
    _, c = agent_pod(values)
    assert (tmp_path / "out" / "args").read_text().splitlines() == c["args"]


@needs_ns
def test_from_host_without_headers_fails_with_advice(tmp_path):
    r = run_start(tmp_path, {}, empty_lib_modules=True)
    assert r.returncode == 1
    assert "set agent.kernelHeaders.fromHost=false" in r.stderr
    assert not (tmp_path / "out" / "args").exists()  # the agent never started
    assert (tmp_path / "out" / "build").read_text() == ""  # and nothing was linked


@needs_ns
@pytest.mark.skipif(not host_has_headers(), reason="this host has no kernel headers for its kernel")
def test_from_host_uses_host_headers_untouched(tmp_path):
    before = os.readlink(f"/lib/modules/{KREL}/build")
    r = run_start(tmp_path, load_values(CHART / "ci" / "tls-values.yaml"), empty_lib_modules=False)
    assert r.returncode == 0, r.stderr
    assert "[headers] host kernel headers:" in r.stderr
    assert os.readlink(f"/lib/modules/{KREL}/build") == before
    _, c = agent_pod(load_values(CHART / "ci" / "tls-values.yaml"))
    assert (tmp_path / "out" / "args").read_text().splitlines() == c["args"]
