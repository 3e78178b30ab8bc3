"""`xdpml demo`: the whole loop on one machine.

Two test hosts in network namespaces reach services in the root namespace over veth
pairs; the agent watches both veths and streams flows to a collector (embedded
Isolation Forest) on loopback. Phase 1: normal traffic (HTTP-like TCP, DNS-like
UDP, ping) teaches the model a baseline. Phase 2: the second host port-scans the
server and SYN-floods it while normal traffic goes on. At the end, a table of the
flows the model flagged and how each kind of traffic was judged. Before it, the
enforcement step (:func:`enforcement_step`): verdicts become rules, dry-run first,
then enforce; then the model step (:func:`model_step`): a tree trained on exported packet
records runs in the kernel and drops the flood. Everything made is removed, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

CLIENT, ATTACKER = 61, 62
SERVER_TCP, SERVER_UDP = 8080, 5353


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def sh(cmd: str, check: bool = True) -> None:
    r = subprocess.run(cmd, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")


class Host:
    def __init__(self, index: int):
        self.ns = f"xdpml-demo-{index}"
        self.veth = f"xdpd{index}"
        self.host_ip = f"10.202.{index}.1"
        self.ns_ip = f"10.202.{index}.2"

    def up(self) -> None:
        self.down()
        sh(f"ip netns add {self.ns}")
        sh(f"ip link add {self.veth} type veth peer name eth0 netns {self.ns}")
        sh(f"sysctl -qw net.ipv6.conf.{self.veth}.disable_ipv6=1")
        sh(f"ip netns exec {self.ns} sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1")
        sh(f"ip addr add {self.host_ip}/24 dev {self.veth}")
        sh(f"ip link set {self.veth} up")
        sh(f"ip -n {self.ns} addr add {self.ns_ip}/24 dev eth0")
        sh(f"ip -n {self.ns} link set eth0 up")
        sh(f"ip -n {self.ns} link set lo up")
        for dev, pre in ((self.veth, ""), ("eth0", f"ip netns exec {self.ns} ")):
            sh(f"{pre}ethtool -K {dev} tso off gso off gro off >/dev/null 2>&1", check=False)

    def down(self) -> None:
        sh(f"ip link del {self.veth}", check=False)
        sh(f"ip netns del {self.ns}", check=False)

    def python(self, script: str, *, python: str = "/usr/bin/python3") -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns, python, "-c", script],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )


class Servers:
    """An HTTP-like TCP service and a DNS-like UDP service on the hosts' gateway addresses."""

    def __init__(self, ips: list[str]):
        self.stop = threading.Event()
        self.socks = []
        for ip in ips:
            t = socket.socket()
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((ip, SERVER_TCP))
            t.listen(4096)
            t.settimeout(0.2)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind((ip, SERVER_UDP))
            u.settimeout(0.2)
            self.socks += [t, u]
            threading.Thread(target=self._tcp, args=(t,), daemon=True).start()
            threading.Thread(target=self._udp, args=(u,), daemon=True).start()

    def _tcp(self, s):
        while not self.stop.is_set():
            try:
                c, _ = s.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c):
        try:
            c.settimeout(2)
            req = c.recv(65535)
            size = int(req.split(b" ", 2)[1]) if req.startswith(b"GET ") else 100
            c.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * size)
        except (OSError, ValueError, IndexError):
            pass
        finally:
            c.close()

    def _udp(self, s):
        while not self.stop.is_set():
            try:
                data, peer = s.recvfrom(2048)
                s.sendto(data + b"\x00" * 64, peer)
            except OSError:
                continue

    def close(self):
        self.stop.set()
        for s in self.socks:
            s.close()


NORMAL = """
import random, socket, time
end = time.time() + {seconds}
i = 0
while time.time() < end:
    i += 1
    try:
        c = socket.create_connection(('{ip}', {tcp}), timeout=2)
        c.sendall(b'GET %d /' % random.randint(500, 20000) + b'h' * random.randint(50, 600))
        while c.recv(65535):
            pass
        c.close()
    except OSError:
        pass
    if i % 3 == 0:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
        u.sendto(b'q' * random.randint(20, 80), ('{ip}', {udp}))
        try: u.recvfrom(2048)
        except OSError: pass
        u.close()
    time.sleep(random.uniform(0.02, 0.08))
"""

SCAN = """
import socket
for port in range(1, {ports} + 1):
    s = socket.socket(); s.settimeout(0.2)
    try: s.connect(('{ip}', port))
    except OSError: pass
    s.close()
"""

FLOOD = """
from scapy.all import IP, TCP, send, RandShort
send(IP(src='{src}', dst='{ip}') / TCP(sport=RandShort(), dport={tcp}, flags='S', seq=12345),
     count={count}, inter=0.0005, verbose=False)
"""


def main(args) -> int:
    if os.geteuid() != 0:
        print("xdpml demo: run as root (it builds network namespaces and attaches BPF programs)", file=sys.stderr)
        return 2
    for tool in ("ip", "ethtool"):
        if not shutil.which(tool):
            print(f"xdpml demo: `{tool}` is missing; run scripts/install.sh --demo", file=sys.stderr)
            return 2
    from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
    from xdpml.agent.export.sinks import CollectorSink, Sink
    from xdpml.agent.pipeline import Agent
    from xdpml.config import AgentSettings, EnforceSettings, HarvestSettings, InterfaceSettings

    seconds = args.seconds
    work = Path(tempfile.mkdtemp(prefix="xdpml-demo-"))
    scored_path = work / "scored.jsonl"
    hosts = [Host(CLIENT), Host(ATTACKER)]
    servers = collector = agent = None
    procs: list[subprocess.Popen] = []
    try:
        say("building test hosts: client 10.202.61.2, attacker 10.202.62.2 (network namespaces)")
        for h in hosts:
            h.up()
        servers = Servers([h.host_ip for h in hosts])

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        baseline = max(200, int(seconds * 12))
        say(f"starting the collector on 127.0.0.1:{port} (embedded Isolation Forest, baseline {baseline} flows)")
        collector = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xdpml",
                "collector",
                "--listen",
                f"127.0.0.1:{port}",
                "--model",
                "embedded",
                "--baseline-rows",
                str(baseline),
                "--state-dir",
                str(work / "state"),
                # Live learning from the local agent: a lab choice (any local peer could teach it).
                "--learn-from",
                "any",
                "--jsonl",
                str(scored_path),
            ],
            stdout=open(work / "collector.log", "w"),
            stderr=subprocess.STDOUT,
        )

        settings = AgentSettings(
            interfaces=InterfaceSettings(names=[h.veth for h in hosts]),
            harvest=HarvestSettings(idle_timeout_s=2.0, interval_s=0.5),
            enforce=EnforceSettings(pin_dir=""),  # no rules here: the enforcement step has its own
            summary_interval_s=5.0,
        )
        exporter = GrpcExporter(ExporterSettings(target=f"127.0.0.1:{port}", node_name="demo-node"))
        sinks: list[Sink] = [CollectorSink(exporter)]
        agent = Agent(settings, interfaces=[h.veth for h in hosts], sinks=sinks)
        say("starting the agent on xdpd61 and xdpd62 (compiling the BPF programs takes a few seconds)")
        agent.start()

        client, attacker = hosts
        say(f"phase 1: {seconds:.0f} s of normal traffic from the client (web requests, DNS-like queries, ping)")
        ping = subprocess.Popen(
            ["ip", "netns", "exec", client.ns, "ping", "-q", "-i", "1", client.host_ip],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(ping)
        normal = client.python(
            NORMAL.format(seconds=seconds * 2 + 15, ip=client.host_ip, tcp=SERVER_TCP, udp=SERVER_UDP)
        )
        procs.append(normal)
        time.sleep(seconds)
        say("phase 2: the attacker port-scans 1-1024 and SYN-floods port 8080 (2000 SYNs); normal traffic goes on")
        scan = attacker.python(SCAN.format(ports=1024, ip=attacker.host_ip))
        scan.wait(120)
        flood = attacker.python(
            FLOOD.format(src=attacker.ns_ip, ip=attacker.host_ip, tcp=SERVER_TCP, count=2000), python=sys.executable
        )
        flood.wait(120)
        say("waiting for the last flows to go idle and be scored")
        time.sleep(6)
        # the enforcement step runs its own agent on the attacker's veth: this one goes first
        agent.stop()
        agent = None
        enforcement_step(work, client, attacker)
        model_step(work, client, attacker)
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        if agent is not None:
            agent.stop()
        if collector is not None:
            collector.terminate()
            try:
                collector.wait(30)
            except subprocess.TimeoutExpired:
                collector.kill()
        if servers is not None:
            servers.close()
        for h in hosts:
            h.down()
    return report(scored_path, hosts, work)


FIXED_FLOOD = """
from scapy.all import Ether, IP, TCP, sendp
sendp(Ether(dst='{mac}') / IP(src='{src}', dst='{dst}') / TCP(sport={sport}, dport={dport}, flags='S', seq=12345),
      iface='eth0', count={count}, inter=0.001, verbose=False)
"""


def stop_all(procs: list[subprocess.Popen], bpffs: str) -> None:
    """End a step's processes, newest first, and unmount its BPF filesystem."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    sh(f"umount -l {bpffs}", check=False)


def enforcement_step(work: Path, client: Host, attacker: Host, *, ttl_s: int = 15, count: int = 300) -> None:
    """The loop closed: verdicts become kernel rules. A second agent on the attacker's
    veth, in dry-run, talks mutual TLS to a collector that scores with the baseline just
    learned and asks to drop what it flags. A SYN flood from one port to an address
    beyond the node becomes a rule that counts what it would drop; in enforce mode the
    same flood is dropped (the qdisc's own count says so); the same flood to the node's
    own address is refused (allowlist); the client's requests are all answered; after
    its TTL the rule no longer acts. Self-contained: makes and removes what it needs."""
    import re

    from xdpml.lab import make_certs

    baseline = work / "state" / "embedded-iforest.joblib"
    if not baseline.exists():
        say("enforcement step skipped: the collector learned no baseline (try a longer --seconds)")
        return
    xdpml = [sys.executable, "-m", "xdpml"]
    tls = work / "tls"
    tls.mkdir()
    c = make_certs(tls, server_name="collector.demo")
    bpffs = work / "bpffs"
    bpffs.mkdir()
    sh(f"mount -t bpf bpf {bpffs}")
    pin = str(bpffs / "rules")
    outside = attacker.host_ip.rsplit(".", 1)[0] + ".99"  # beyond the node: enforceable
    mac = open(f"/sys/class/net/{attacker.veth}/address").read().strip()
    sh(f"ip -n {attacker.ns} neigh replace {outside} lladdr {mac} dev eth0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs: list[subprocess.Popen] = []
    try:
        col = subprocess.Popen(
            [*xdpml, "collector", "--listen", f"127.0.0.1:{port}", "--model", "embedded"]
            + ["--baseline", str(baseline), "--action", "drop", "--verdict-ttl", str(ttl_s)]
            + ["--tls-cert", c["server"], "--tls-key", c["server_key"], "--tls-client-ca", c["ca"]],
            stdout=open(work / "collector-enforce.log", "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(col)
        log_path = work / "agent-enforce.log"
        ag = subprocess.Popen(
            [*xdpml, "agent", "-i", attacker.veth, "--hooks", "tc", "-o", "/dev/null"]
            + ["--collector", f"127.0.0.1:{port}", "--tls-ca", c["ca"], "--tls-cert", c["client"]]
            + ["--tls-key", c["client_key"], "--tls-server-name", "collector.demo", "--pin-dir", pin]
            + ["--enforce-mode", "dry-run", "--rule-ttl", str(ttl_s), "--summary-interval", "0"],
            stdout=open(log_path, "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(ag)
        say(f"enforcement: a second agent on {attacker.veth}, dry-run, mutual TLS to a collector that drops what")
        say(f"  the baseline model flags (rules live {ttl_s} s; compiling takes a few seconds)")
        deadline = time.monotonic() + 180
        while "enforcement ready" not in log_path.read_text():
            if time.monotonic() > deadline or ag.poll() is not None:
                say("enforcement step failed: the agent did not start:\n" + log_path.read_text()[-2000:])
                return

            time.sleep(0.2)

        def rules(*args: str) -> str:
            r = subprocess.run([*xdpml, "rules", "--pin-dir", pin, *args], capture_output=True, text=True)
            return r.stdout

        def qdisc_drops() -> int:
            out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", attacker.veth], capture_output=True, text=True)
            m = re.search(r"qdisc clsact.*?dropped (\d+)", out.stdout, re.S)
            return int(m.group(1)) if m else 0

        def flood(dst: str) -> None:
            attacker.python(
                FIXED_FLOOD.format(mac=mac, src=attacker.ns_ip, dst=dst, sport=4444, dport=SERVER_TCP, count=count),
                python=sys.executable,
            ).wait(60)

        def show(table: str) -> None:
            for line in table.rstrip().splitlines():
                print(f"         {line}", flush=True)

        say(f"dry-run: the attacker SYN-floods {outside}:{SERVER_TCP} from port 4444 ({count} SYNs)")
        flood(outside)
        deadline = time.monotonic() + 30
        while "4444" not in rules("list") and time.monotonic() < deadline:
            time.sleep(0.2)
        say("the rule the verdict made; DROPPED counts what it would drop, nothing is dropped:")
        show(rules("list"))
        before = qdisc_drops()
        say(f"enforce: `xdpml rules mode enforce`, then the same flood again ({count} SYNs)")
        rules("mode", "enforce")
        flood(outside)
        show(rules("list"))
        say(f"  packets the kernel dropped on {attacker.veth} (its qdisc's count): {qdisc_drops() - before}")
        say(f"the allowlist: the same flood to the node's own address {attacker.host_ip}")
        flood(attacker.host_ip)
        deadline = time.monotonic() + 30
        while "allowlisted" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        refused = "verdict refused (allowlisted)" in log_path.read_text()
        live = [ln for ln in rules("list").splitlines()[1:] if ln.strip()]
        say(
            f"  {'verdict refused (allowlisted)' if refused else 'no verdict yet'}; "
            f"rules: {len(live)} (the first one only)"
        )
        ok = client.python(
            "import socket\nn=0\nfor i in range(20):\n"
            f"    c=socket.create_connection(('{client.host_ip}',{SERVER_TCP}),timeout=2); c.sendall(b'GET 100 /')\n"
            "    n+=bool(c.recv(65535)); c.close()\nraise SystemExit(0 if n == 20 else 1)\n"
        )
        ok.wait(60)
        say(f"normal traffic: the client's 20 requests {'all answered' if ok.returncode == 0 else 'NOT all answered'}")
        say(f"expiry: the rule lives {ttl_s} s; the kernel ignores it from then on, even with nobody to delete it")
        deadline = time.monotonic() + ttl_s + 5
        while "4444" in rules("list") and time.monotonic() < deadline:
            time.sleep(0.5)
        live = [ln for ln in rules("list").splitlines()[1:] if ln.strip()]
        say(f"  rules left after the TTL: {len(live)}")
    finally:
        stop_all(procs, bpffs)


MODEL_FEATURES = "tcp_syn,tcp_ack,tcp_window_size,ip_total_length,ip_ttl,dst_port,payload_len"


def model_step(work: Path, client: Host, attacker: Host, *, count: int = 300) -> None:
    """A model in the kernel, no collector in the path. An agent on both veths with the
    model slots compiled in (empty) exports 1 in 1 packets' header features to a file
    while the client makes requests and the attacker SYN-floods an address beyond the
    node. A decision tree is trained on those packet rows, labelled by the demo's own
    knowledge of who the attacker is (the supervised label), and loaded into the running
    agent with `xdpml model load` (idle slot, then flip: no recompile, no re-attach),
    class 1 = drop. The next flood is classified by the kernel; dry-run counts what it
    would drop; in enforce mode the kernel drops it (the clsact qdisc's count says so)
    while the client's requests, classified normal, are answered. Self-contained."""
    import re

    import joblib
    from sklearn.tree import DecisionTreeClassifier, export_text

    xdpml = [sys.executable, "-m", "xdpml"]
    bpffs = work / "bpffs-model"
    bpffs.mkdir()
    sh(f"mount -t bpf bpf {bpffs}")
    pin = str(bpffs / "pins")
    outside = attacker.host_ip.rsplit(".", 1)[0] + ".98"  # beyond the node: not allowlisted
    mac = open(f"/sys/class/net/{attacker.veth}/address").read().strip()
    sh(f"ip -n {attacker.ns} neigh replace {outside} lladdr {mac} dev eth0")
    rows_path = work / "packets.jsonl"
    log_path = work / "agent-model.log"
    procs: list[subprocess.Popen] = []
    names = MODEL_FEATURES.split(",")
    try:
        ag = subprocess.Popen(
            [*xdpml, "agent", "-i", client.veth, "-i", attacker.veth, "--hooks", "tc", "--no-flows"]
            + ["--sample", "1", "-o", str(rows_path), "--pin-dir", pin, "--model-slots"]
            + ["--enforce-mode", "dry-run", "--summary-interval", "0"],
            stdout=open(log_path, "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(ag)
        say(f"model in the kernel: an agent on {client.veth} and {attacker.veth} with two empty model slots,")
        say("  exporting every packet's header features to a file (--sample 1); no collector")
        deadline = time.monotonic() + 180
        while "enforcement ready" not in log_path.read_text():
            if time.monotonic() > deadline or ag.poll() is not None:
                say("model step failed: the agent did not start:\n" + log_path.read_text()[-2000:])
                return
            time.sleep(0.2)

        def model(*args: str) -> str:
            r = subprocess.run([*xdpml, "model", *args, "--pin-dir", pin], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"xdpml model {' '.join(args)}: {r.stderr.strip()}")
            return r.stdout.strip()

        def classified() -> Counter[str]:
            show = json.loads(model("show", "--json"))
            return Counter(show["slots"][show["active"]]["classified"])

        def qdisc_drops() -> int:
            out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", attacker.veth], capture_output=True, text=True)
            m = re.search(r"qdisc clsact.*?dropped (\d+)", out.stdout, re.S)
            return int(m.group(1)) if m else 0

        def flood() -> None:
            attacker.python(
                FIXED_FLOOD.format(mac=mac, src=attacker.ns_ip, dst=outside, sport=5555, dport=SERVER_TCP, count=count),
                python=sys.executable,
            ).wait(60)

        def requests(n: int) -> subprocess.Popen:
            return client.python(
                f"import socket\nn=0\nfor i in range({n}):\n"
                f"    c=socket.create_connection(('{client.host_ip}',{SERVER_TCP}),timeout=2)\n"
                "    c.sendall(b'GET 300 /')\n"
                f"    n+=bool(c.recv(65535)); c.close()\nraise SystemExit(0 if n == {n} else 1)\n"
            )

        say(f"training traffic: 40 client requests, and {count} SYNs from the attacker to {outside}:{SERVER_TCP}")
        normal = requests(40)
        flood()
        normal.wait(60)

        def src_of(r: dict) -> str:
            return str(r.get("src_ip", "")).removeprefix("::ffff:")

        deadline = time.monotonic() + 20
        rows: list[dict] = []
        while time.monotonic() < deadline:
            rows = [json.loads(ln) for ln in rows_path.read_text().splitlines() if ln.strip()]
            rows = [r for r in rows if r.get("record") == "packet" and r.get("protocol") == 6]
            if sum(src_of(r) == attacker.ns_ip for r in rows) >= count:
                break
            time.sleep(0.2)
        labels = [int(src_of(r) == attacker.ns_ip) for r in rows]
        if not 0 < sum(labels) < len(labels):
            say("model step failed: no training rows of both kinds")
            return
        x = [[int(r[n]) for n in names] for r in rows]
        tree = DecisionTreeClassifier(max_depth=4, random_state=0).fit(x, labels)
        joblib.dump(tree, work / "tree.joblib")
        say(
            f"trained a decision tree on {len(rows)} exported TCP packet rows ({sum(labels)} from the attacker,"
            f" label 1); it splits on:"
        )
        for line in export_text(tree, feature_names=names).rstrip().splitlines():
            print(f"         {line}", flush=True)
        out = model("load", str(work / "tree.joblib"), "--features", MODEL_FEATURES, "--action", "1=drop")
        say(f"`xdpml model load tree.joblib --action 1=drop` on the running agent: {out.split(';')[0]})")

        base, before = qdisc_drops(), classified()
        flood()
        after = classified()
        say(
            f"dry-run: the same flood again ({count} SYNs): the kernel put {after['1'] - before['1']} packets in"
            f" class 1 (drop); {attacker.veth}'s qdisc dropped {qdisc_drops() - base}: dry-run drops nothing"
        )
        subprocess.run([*xdpml, "rules", "--pin-dir", pin, "mode", "enforce"], capture_output=True, check=True)
        base, before = qdisc_drops(), classified()
        ok = requests(20)
        flood()
        ok.wait(60)
        after = classified()
        acts = json.loads(model("show", "--json"))["slots"]
        dropped = sum(s["action_counts"].get("dropped", 0) for s in acts)
        say("enforce (`xdpml rules mode enforce`), the flood again and 20 client requests meanwhile:")
        say(
            f"  class 1: {after['1'] - before['1']} packets, class 0: {after['0'] - before['0']}; the kernel dropped"
            f" {dropped} (model counter), {qdisc_drops() - base} by {attacker.veth}'s qdisc count"
        )
        answered = "all answered" if ok.returncode == 0 else "NOT all answered"
        say(f"  normal traffic: the client's 20 requests {answered}")
    except (RuntimeError, subprocess.CalledProcessError) as e:
        say(f"model step failed: {e}")
    finally:
        stop_all(procs, bpffs)


def report(path: Path, hosts: list[Host], work: Path) -> int:
    from xdpml.collector.sinks import format_flagged_table

    if not path.exists():
        print(f"xdpml demo: the collector wrote no scores; see {work / 'collector.log'}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    flows = [r for r in rows if r.get("record", "flow") == "flow"]
    client, attacker = hosts

    def kind(r) -> str:
        ips = {r.get("src_ip"), r.get("dst_ip")}
        if attacker.ns_ip in ips:
            return "SYN flood" if SERVER_TCP in (r.get("src_port"), r.get("dst_port")) else "port scan"
        if client.ns_ip in ips:
            return "normal"
        return "other"

    scored = [r for r in flows if r.get("score") is not None]
    learning = len(flows) - len(scored)
    total: Counter[str] = Counter()
    flagged: Counter[str] = Counter()
    for r in scored:
        total[kind(r)] += 1
        flagged[kind(r)] += bool(r.get("flagged"))
    print()
    print(f"{len(flows)} flows reached the collector: {learning} taught the baseline, {len(scored)} were scored")
    print()
    print(f"{'traffic':<12} {'scored':>7} {'flagged':>8} {'share':>7}")
    for k in ("normal", "port scan", "SYN flood", "other"):
        if total[k]:
            print(f"{k:<12} {total[k]:>7} {flagged[k]:>8} {flagged[k] / total[k]:>7.1%}")
    top = sorted((r for r in scored if r.get("flagged")), key=lambda r: r["score"], reverse=True)
    if top:
        picks = []
        for k in ("port scan", "SYN flood", "normal", "other"):
            picks += [r for r in top if kind(r) == k][:6]
        for r in picks:
            r.setdefault("node", r.get("node_name", ""))
        print()
        print(f"flagged flows: {len(top)}; the most anomalous of each kind of traffic:")
        print(format_flagged_table(sorted(picks, key=lambda r: r["score"], reverse=True)))
    print()
    print(f"scored flows: {path}")
    return 0
