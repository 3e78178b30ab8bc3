"""`xdpml rules ...` as an operator runs it: a separate process on the pinned maps of
a loaded datapath (the session's), checked against the kernel through BPF_PROG_TEST_RUN."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from xdpml.datapath.loader import XDP_PROG
from xdpml.datapath.testrun import test_run as prog_test_run

pytestmark = pytest.mark.root
XDPML = str(Path(sys.executable).with_name("xdpml"))
XDP_PASS, XDP_DROP = 2, 1


def rules(pin_dir, *args, ok=True):
    r = subprocess.run([XDPML, "rules", "--pin-dir", pin_dir, *args], capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture()
def pin_dir(enf_dp, table):
    return enf_dp.pin_dir


def pkt(sport=4000):
    return bytes(Ether() / IP(src="10.9.7.1", dst="10.9.7.2") / TCP(sport=sport, dport=22))


def test_add_list_mode_kill_del_flush(pin_dir, enf_dp):
    prog = enf_dp.progs[XDP_PROG].fd
    out = rules(
        pin_dir,
        "add",
        "--src",
        "10.9.7.1",
        "--dst",
        "10.9.7.2",
        "--proto",
        "tcp",
        "--sport",
        "4000",
        "--dport",
        "22",
        "--action",
        "drop",
        "--ttl",
        "120",
    ).stdout
    assert out.startswith("rule ") and "mode dry-run" in out
    rules(pin_dir, "add", "--src", "10.9.8.0/24", "--action", "rate-limit", "--pps", "10", "--burst", "20")
    assert [prog_test_run(prog, pkt())[0] for _ in range(3)] == [XDP_PASS] * 3  # dry-run by default

    assert rules(pin_dir, "mode", "enforce").stdout.strip() == "enforce"
    assert [prog_test_run(prog, pkt())[0] for _ in range(2)] == [XDP_DROP] * 2
    listed = [json.loads(line) for line in rules(pin_dir, "list", "--json").stdout.splitlines()]
    exact, prefix = sorted(listed, key=lambda r: r["kind"])
    assert (
        exact["src"],
        exact["dst"],
        exact["src_port"],
        exact["dst_port"],
        exact["proto"],
        exact["action"],
        exact["hits"],
        exact["dropped"],
        exact["mode"],
    ) == ("10.9.7.1", "10.9.7.2", 4000, 22, 6, "drop", 5, 5, "enforce")
    assert exact["bytes"] == 5 * len(pkt()) and 0 < exact["expires_in_s"] <= 120
    assert (prefix["src"], prefix["action"], prefix["hits"]) == ("10.9.8.0/24", "rate-limit", 0)

    table_text = rules(pin_dir, "list").stdout.splitlines()
    assert table_text[0].split() == [
        "SLOT",
        "SRC",
        "DST",
        "SPORT",
        "DPORT",
        "PROTO",
        "ACTION",
        "HITS",
        "BYTES",
        "DROPPED",
        "EXPIRES",
        "MODE",
    ]
    assert table_text[1].split()[1:9] == ["10.9.7.1", "10.9.7.2", "4000", "22", "tcp", "drop", "5", str(5 * len(pkt()))]

    rules(pin_dir, "kill")
    assert prog_test_run(prog, pkt())[0] == XDP_PASS
    assert "KILL SWITCH ON" in rules(pin_dir, "list").stderr
    rules(pin_dir, "kill", "--off")
    assert prog_test_run(prog, pkt())[0] == XDP_DROP

    rules(pin_dir, "del", str(exact["slot"]))
    assert prog_test_run(prog, pkt())[0] == XDP_PASS
    assert "deleted 1 rule" in rules(pin_dir, "flush").stdout
    assert rules(pin_dir, "list", "--json").stdout == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (["add", "--src", "10.0.0.1", "--action", "drop", "--ttl", "0"], "must be > 0"),
        (["add", "--src", "nonsense", "--action", "drop"], "bad address"),
        (["add", "--action", "drop"], "give --src and --dst"),
        (
            ["add", "--src", "10.0.0.1", "--dst", "10.0.0.2", "--proto", "tcp", "--action", "drop"],
            "--sport and --dport",
        ),
        (["add", "--dst", "10.0.0.0/8", "--action", "rate-limit"], "needs --pps or --bps"),
        (["add", "--dst", "10.0.0.0/8", "--action", "explode"], "invalid choice"),
        (["add", "--dst", "10.0.0.0/8", "--dport", "70000", "--action", "drop"], "0..65535"),
        (["del", "16000"], "no rule in slot 16000"),
        (["mode", "chaos"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_never_a_traceback(pin_dir, args, message):
    r = rules(pin_dir, *args, ok=False)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_no_pinned_maps(tmp_path):
    r = rules(str(tmp_path / "none"), "list", ok=False)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "start an agent first" in r.stderr


def test_agent_refuses_enforce_without_mutual_tls():
    from netns import make_hosts

    with make_hosts(71, ipv6=False) as (h,):
        r = subprocess.run(
            [
                XDPML,
                "agent",
                "-i",
                h.host_if,
                "--collector",
                "127.0.0.1:9",
                "--enforce-mode",
                "enforce",
                "-o",
                "/dev/null",
                "--duration",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "xdpml: --enforce-mode enforce needs mutual TLS to the collector (--tls-ca, --tls-cert, --tls-key): "
        "verdicts that can drop traffic must be authenticated"
    ]
