"""The command line: help, input errors without tracebacks, check-config."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
XDPML = [sys.executable, "-m", "xdpml"]


def run(*args):
    return subprocess.run([*XDPML, *args], capture_output=True, text=True, cwd=ROOT)


def test_agent_help_has_examples():
    r = run("agent", "--help")
    assert r.returncode == 0 and "xdpml agent -i eth0 -w 100 -o features.jsonl" in r.stdout


def test_agent_without_interface_is_a_usage_error():
    r = run("agent")
    assert r.returncode == 2 and "-i" in r.stderr and "Traceback" not in r.stderr


def test_bad_numbers_are_rejected_by_the_parser():
    r = run("agent", "-i", "lo", "--first-n", "many")
    assert r.returncode == 2 and "not a whole number" in r.stderr
    r = run("agent", "-i", "lo", "--first-n", "99", "--duration", "0.1")
    assert r.returncode == 2 and "first_n must be 0..32" in r.stderr and "Traceback" not in r.stderr


def test_check_config_valid_and_invalid():
    valid = sorted((ROOT / "examples/agentconfig/valid").glob("*.yaml"))
    invalid = sorted((ROOT / "examples/agentconfig/invalid").glob("*.yaml"))
    r = run("check-config", *map(str, valid))
    assert r.returncode == 0 and r.stdout.count(": ok (") == len(valid)
    r = run("check-config", str(invalid[0]))
    assert r.returncode == 1 and "INVALID" in r.stdout
    r = run("check-config", "/nonexistent.yaml")
    assert r.returncode == 1 and "cannot read" in r.stdout


def test_without_privileges_the_agent_says_what_it_needs():
    import os

    import pytest

    if os.geteuid() != 0:
        pytest.fail("needs root to drop to an unprivileged user")
    xdpml = str(Path(sys.executable).parent / "xdpml")
    r = subprocess.run(
        ["su", "nobody", "-s", "/bin/sh", "-c", f"{xdpml} agent -i lo --duration 1"],
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    assert r.returncode == 1
    assert "needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN" in r.stderr
    assert "Traceback" not in r.stderr


def test_logs_go_to_stdout_unless_stdout_carries_data():
    from xdpml.cli import build_parser, log_stream

    p = build_parser()
    assert log_stream(p.parse_args(["agent", "--kubernetes"])) is sys.stdout
    assert log_stream(p.parse_args(["agent", "-i", "eth0", "--collector", "c:1"])) is sys.stdout
    assert log_stream(p.parse_args(["agent", "-i", "eth0"])) is sys.stderr  # JSON lines on stdout
    assert log_stream(p.parse_args(["agent", "--kubernetes", "-o", "-"])) is sys.stderr
    assert log_stream(p.parse_args(["collector"])) is sys.stdout
    assert log_stream(p.parse_args(["collector", "--jsonl", "-"])) is sys.stderr


def test_version():
    from importlib.metadata import version

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"xdpml {version('xdpml')}"


def test_global_options_before_or_after_the_subcommand():
    from xdpml.cli import build_parser

    p = build_parser()
    for argv in (
        ["--log-format", "json", "agent", "-i", "x"],
        ["agent", "--log-format", "json", "-i", "x"],
        ["agent", "-i", "x", "--log-format", "json"],
    ):
        a = p.parse_args(argv)
        assert (a.log_format, a.verbose) == ("json", False), argv
    assert p.parse_args(["-v", "cleanup"]).verbose and p.parse_args(["cleanup", "-v"]).verbose
    a = p.parse_args(["agent", "-i", "x"])
    assert (a.log_format, a.verbose) == ("text", False)
    # as a process too: json log lines on stderr from the option given after the subcommand
    r = run("agent", "--log-format", "json", "-i", "no-such-interface-xyz", "-o", "/dev/null")
    assert "Traceback" not in r.stderr and "unrecognized arguments" not in r.stderr


def test_tunnel_flags_reach_the_settings():
    from xdpml.cli import build_parser, settings_from_args
    from xdpml.config import ConfigError

    p = build_parser()
    s = settings_from_args(p.parse_args(["agent", "-i", "x"]))
    assert (s.tunnels.vxlan, s.tunnels.gre, s.tunnels.max_depth, s.tunnels.vxlan_ports) == (True, True, 1, [4789, 8472])
    a = p.parse_args(
        [
            "agent",
            "-i",
            "x",
            "--no-tunnel",
            "gre",
            "--no-tunnel",
            "esp",
            "--tunnel-max-depth",
            "2",
            "--vxlan-port",
            "4790",
        ]
    )
    s = settings_from_args(a)
    assert (s.tunnels.gre, s.tunnels.esp, s.tunnels.vxlan, s.tunnels.max_depth) == (False, False, True, 2)
    assert s.tunnels.vxlan_ports == [4790]
    with pytest.raises(ConfigError, match="max_depth must be 1..4"):
        settings_from_args(p.parse_args(["agent", "-i", "x", "--tunnel-max-depth", "9"]))
    r = run("agent", "-i", "x", "--vxlan-port", "70000", "-o", "/dev/null")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "65535" in r.stderr
