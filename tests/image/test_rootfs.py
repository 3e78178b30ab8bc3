"""The two images, built and run for real without a Docker engine: scripts/build-rootfs.py
builds each Dockerfile target's root filesystem (debootstrap of the base, then the
target's own COPY/ENV/RUN steps in a chroot) and runs it as a container would. The
agent from its root filesystem, with the host mounts the DaemonSet gives it and the
DaemonSet's own start command, attaches to a veth and exports real flows to the
collector from its root filesystem (as uid 10001), which scores them; the collector also
scores a synthetic batch with a port scan. Each root filesystem's size is printed, and
the agent's must not hold scikit-learn, scipy or pyarrow."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from grpc_fixtures import free_port
from netns import make_hosts
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
from xdpml.agent.export.synthetic import flow_batch

from xdpml.wire.columns import ip_to_str

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "scripts" / "build-rootfs.py"
COLLECTOR_ONLY = ("sklearn", "scipy", "pyarrow", "onnxruntime", "joblib")
PINGS = 5


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Both targets built side by side (their downloads overlap), on a tmpfs: no disk
    traffic, and a removal that takes no time (deleting ~2 GB of small files takes minutes
    on a busy disk)."""
    out = tmp_path_factory.mktemp("rootfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6g,mode=0755", "xdpml-rootfs", str(out)], check=True)
    try:
        yield from _build_both(out)
    finally:
        subprocess.run(["umount", "-l", str(out)], check=True)


def _build_both(out: Path):
    procs = {}
    for target in ("agent", "collector"):
        log = open(out / f"{target}.log", "w")
        procs[target] = subprocess.Popen(
            [sys.executable, str(BUILDER), "build", target, "--out", str(out / target)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()
    configs = {}
    for target, p in procs.items():
        stdout, _ = p.communicate(timeout=1200)
        assert p.returncode == 0, (out / f"{target}.log").read_text()[-3000:]
        configs[target] = json.loads(stdout.splitlines()[-1])
    yield configs


def run_args(rootfs: str, *args: str, binds: tuple[str, ...] = (), entrypoint: str | None = None) -> list[str]:
    cmd = [sys.executable, str(BUILDER), "run", rootfs]
    for b in binds:
        cmd += ["--bind", b]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return [*cmd, "--", *args]


def python_in(config: dict, code: str) -> str:
    r = subprocess.run(
        run_args(config["rootfs"], "-c", code, entrypoint="python"), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


FIND = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))"


def importable(config: dict, *modules: str) -> set[str]:
    r = subprocess.run(
        run_args(config["rootfs"], "-c", FIND, *modules, entrypoint="python"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def distributions(rootfs: str) -> set[str]:
    """Python distributions installed anywhere in the root filesystem (dist-info/egg-info)."""
    names = set()
    for d in Path(rootfs).glob("**/*-packages/*"):
        m = re.fullmatch(r"(.+?)-[0-9][^-]*\.(dist|egg)-info", d.name)
        if m:
            names.add(m.group(1).lower().replace("_", "-"))
    return names


def test_sizes_and_package_sets(images, capsys):
    agent, coll = images["agent"], images["collector"]
    with capsys.disabled():
        for c in (agent, coll):
            print(
                f"\n[rootfs] {c['target']}: {c['size_bytes'] / 1e6:.0f} MB "
                f"({(c['size_bytes'] - c['base_size_bytes']) / 1e6:.0f} MB over the "
                f"{c['base_size_bytes'] / 1e6:.0f} MB debootstrap base), built in {c['build_seconds']:.0f} s"
            )
    # the agent: BCC and its own libraries, none of the collector's
    assert importable(agent, "bcc", "pyroute2", "kubernetes", "yaml", "xdpml.datapath.loader", *COLLECTOR_ONLY) == {
        "bcc",
        "pyroute2",
        "kubernetes",
        "yaml",
        "xdpml.datapath.loader",
    }
    assert not distributions(agent["rootfs"]) & {"scikit-learn", "scipy", "pyarrow", "onnxruntime", "joblib"}
    # the collector: the models and Parquet, nothing of BCC or Kubernetes
    assert importable(coll, "sklearn", "pyarrow", "onnxruntime", "joblib", "bcc", "pyroute2", "kubernetes") == {
        "sklearn",
        "pyarrow",
        "onnxruntime",
        "joblib",
    }
    assert not Path(coll["rootfs"], "usr/lib/python3/dist-packages/bcc").exists()
    # what the chart relies on: the agent runs as root, the collector as uid 10001
    assert agent["user"] == "root" and coll["user"] == "10001:10001"
    assert python_in(coll, "import os; print(os.getuid(), os.getgid())") == "10001 10001"
    assert agent["env"]["XDPML_BPF_DIR"] == "/opt/xdpml/bpf"
    assert Path(agent["rootfs"], "opt/xdpml/bpf/xdp_flow.c").exists()
    assert not Path(agent["rootfs"], "opt/xdpml/tests").exists()  # .dockerignore honoured
    assert list(Path(agent["rootfs"], "usr/src").glob("linux-headers-*-amd64"))  # the headers fallback
    # the other side's command in an image says in one line what is missing
    for config, cmd, missing in (
        (agent, ["collector", "--listen", "127.0.0.1:0"], "grpc_health"),
        (coll, ["agent", "-i", "lo", "--duration", "1"], ("bcc", "pyroute2")),
    ):
        r = subprocess.run(run_args(config["rootfs"], *cmd), capture_output=True, text=True, timeout=120)
        assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        # the first agent-only module the command imports: bcc (Debian) or pyroute2
        assert any(
            last.startswith(f"xdpml {cmd[0]}: this install has no {m}")
            for m in ((missing,) if isinstance(missing, str) else missing)
        ), last


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() < end, f"no {text!r} in {timeout} s: {path.read_text()[-3000:]}"
        time.sleep(0.1)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def daemonset_command() -> str:
    """The agent container's start command (kernelHeaders.fromHost), from the chart."""
    text = (ROOT / "helm" / "xdpml" / "templates" / "agent-daemonset.yaml").read_text()
    m = re.search(r"- >-\n((?:\s+\S.*\n)+?)\s+\{\{- else", text)
    return " ".join(line.strip() for line in m.group(1).splitlines())


def test_agent_image_exports_flows_to_the_collector_image(images, tmp_path):
    shared = tmp_path / "out"
    shared.mkdir()
    os.chown(shared, 10001, 10001)  # the collector writes here as its image's user
    port = free_port()
    scored = shared / "scored.jsonl"
    coll_log = tmp_path / "collector.log"
    with open(coll_log, "w") as f:
        coll = subprocess.Popen(
            run_args(
                images["collector"]["rootfs"],
                "collector",
                "--listen",
                f"127.0.0.1:{port}",
                "--baseline-rows",
                "2000",
                "--learn-from",
                "any",
                "--state-dir",
                "/out/state",
                "--jsonl",
                "/out/scored.jsonl",
                "--parquet",
                "/out/scored.parquet",
                binds=(f"{shared}:/out",),
            ),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    agent = None
    try:
        _wait_for(coll_log, "listening on port", coll, 120)
        # 1. a synthetic batch: a baseline, then a port scan that must come back flagged
        verdicts = []
        normal, scan = flow_batch(2500, seed=1), flow_batch(50, kind="portscan", seed=3)
        probes = {(ip_to_str(s), int(p)) for s, p in zip(scan["src_ip"], scan["dst_port"])}

        def flagged() -> set[tuple[str, int]]:
            return {(ip_to_str(v.key.src_ip), v.key.dst_port) for vb in list(verdicts) for v in vb.verdicts}

        with GrpcExporter(
            ExporterSettings(target=f"127.0.0.1:{port}", node_name="node-img", flush_age_s=0.05),
            on_verdicts=verdicts.append,
        ) as ex:
            ex.put(normal)
            end = time.monotonic() + 60
            while ex.stats()["sent_rows"] < 2500 and time.monotonic() < end:
                time.sleep(0.05)
            ex.put(scan)
            # verdicts of the normal rows may come too (false positives): wait for the probes'
            while not probes <= flagged() and time.monotonic() < end:
                time.sleep(0.05)
            assert ex.stats()["sent_rows"] == 2550
        assert probes <= flagged()  # every probe of the scan came back as a verdict
        assert all(vb.model.name == "embedded-iforest" for vb in verdicts)

        # 2. the agent image on a real veth, started as the DaemonSet starts it
        with make_hosts(80) as (h,):
            agent_log = tmp_path / "agent.log"
            binds = (
                "/lib/modules:/lib/modules:ro",
                "/usr/src:/usr/src:ro",
                "/sys/fs/bpf:/sys/fs/bpf",
                f"{shared}:/out",
            )
            with open(agent_log, "w") as f:
                agent = subprocess.Popen(
                    run_args(
                        images["agent"]["rootfs"],
                        "-c",
                        daemonset_command(),
                        "xdpml",
                        "agent",
                        "-i",
                        h.host_if,
                        "--collector",
                        f"127.0.0.1:{port}",
                        "--node-name",
                        "node-img",
                        "--output",
                        "/out/flows.jsonl",
                        "--idle-timeout",
                        "1",
                        "--interval",
                        "0.2",
                        "--summary-interval",
                        "0",
                        binds=binds,
                        entrypoint="/bin/sh",
                    ),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            _wait_for(agent_log, f"attached {h.host_if}", agent, 300)
            h.run(f"ping -c {PINGS} -i 0.05 {h.host_ip}", capture=True)
            end = time.monotonic() + 60

            def icmp(rows):
                return [r for r in rows if r.get("protocol") == 1 and r["src_ip"] == h.ns_ip]

            while not (icmp(_rows(shared / "flows.jsonl")) and icmp(_rows(scored))):
                assert agent.poll() is None and time.monotonic() < end, agent_log.read_text()[-3000:]
                time.sleep(0.1)
            agent.send_signal(signal.SIGTERM)  # reaches the agent itself: the start command execs it
            assert agent.wait(60) == 0, agent_log.read_text()[-3000:]
        assert "[headers] host kernel headers" in agent_log.read_text()
        (exported,) = icmp(_rows(shared / "flows.jsonl"))
        assert exported["src2dst_packets"] == PINGS and exported["dst2src_packets"] == PINGS
        (row,) = icmp(_rows(scored))
        assert row["node_name"] == "node-img"
        assert row["src2dst_packets"] == PINGS and row["dst2src_packets"] == PINGS
        assert isinstance(row["score"], float) and row["label"] in ("normal", "anomaly")
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(30)
        coll.send_signal(signal.SIGTERM)
        assert coll.wait(60) == 0, coll_log.read_text()[-3000:]
    rows = _rows(scored)
    assert sum(r["label"] == "learning" for r in rows) == 2000
    parts = sorted(shared.glob("scored-*.parquet"))  # the collector's file series, complete files only
    assert parts and sum(pq.read_table(f).num_rows for f in parts) == len(rows)  # pyarrow in the image wrote them
