"""Careless use of `xdpml agent`: refused at start with one clear line, never a traceback,
and the same settings the AgentConfig refuses."""

import subprocess
import sys
from pathlib import Path

import pytest

from xdpml.cli import _bind_address, build_parser

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "xdpml", "agent", "-i", "lo", "--duration", "0.1", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (("--metrics-port", "99999"), "--metrics-port must be 0..65535, not 99999"),
        (("--health-port", "70000"), "--health-port must be 0..65535, not 70000"),
        (("--bind-address", "localhost:80"), "--bind-address 'localhost:80' is not an IP address"),
        (("--idle-timeout", "300", "--active-timeout", "60"), "the active timeout (60 s) must be >= the idle timeout"),
        (("--collector", "collector"), "collector address 'collector' is not host:port"),
        (("--collector", "collector:0"), "port 0 is not 1..65535"),
        (("--collector", "127.0.0.1:50051", "-w", "100"), "the collector scores flow records only: -w/--window"),
        (("--collector", "127.0.0.1:50051", "--sample", "10"), "--sample records need a local output too"),
    ],
)
def test_refused_at_start_with_one_line(args, says):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_the_agentconfig_refuses_the_same_timeouts():
    from xdpml.errors import ConfigError
    from xdpml.kube.agentconfig import parse_spec

    spec = {"interfaces": [{"names": ["eth0"]}], "timeouts": {"idleSeconds": 300, "activeSeconds": 60}}
    with pytest.raises(ConfigError, match="activeSeconds"):
        parse_spec(spec)
    parse_spec({**spec, "timeouts": {"idleSeconds": 60, "activeSeconds": 300}})  # the other way round is fine


def test_health_and_metrics_bind_loopback_standalone():
    p = build_parser()
    assert _bind_address(p.parse_args(["agent", "-i", "eth0", "--metrics-port", "9464"])) == "127.0.0.1"
    assert _bind_address(p.parse_args(["agent", "--kubernetes"])) == "0.0.0.0"
    assert _bind_address(p.parse_args(["agent", "-i", "eth0", "--bind-address", "10.0.0.5"])) == "10.0.0.5"
