"""Throwaway test hosts: network namespaces joined to the root namespace by veth pairs.

Topology of a TestHost named N with index k:
    root ns: veth `xdpt{k}` 10.201.k.1/24, fd00:201:k::1/64   <-- the agent attaches here
    netns `xdpml-test-{k}`: veth `eth0` 10.201.k.2/24, fd00:201:k::2/64
(with XDPML_TEST_SLOT=s > 0: `xdpt{s}s{k}`, `xdpml-test-s{s}-{k}`, 10.{201+s}.k.0/24)
Used by the tests and the benchmarks. Only these addresses are ever traffic targets. Offloads (TSO/GSO/GRO) are off by
default so every packet on the wire is one frame (exact ground truth).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def sh(cmd: str, *, check: bool = True, capture: bool = False) -> str:
    r = subprocess.run(
        cmd, shell=True, check=False, text=True, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout if capture else ""


# Several checkouts may run tests on one machine at once (developers' worktrees): each sets
# its own XDPML_TEST_SLOT (0-9) so its hosts' names and addresses never collide with another's.
SLOT = int(os.environ.get("XDPML_TEST_SLOT", "0"))
if not 0 <= SLOT <= 9:
    raise ValueError(f"XDPML_TEST_SLOT={SLOT}: must be 0-9")


@dataclass
class TestHost:
    index: int

    @property
    def ns(self) -> str:
        return f"xdpml-test-{self.index}" if SLOT == 0 else f"xdpml-test-s{SLOT}-{self.index}"

    @property
    def host_if(self) -> str:
        return f"xdpt{self.index}" if SLOT == 0 else f"xdpt{SLOT}s{self.index}"

    @property
    def _net(self) -> str:
        return f"10.{201 + SLOT}.{self.index}"

    @property
    def host_ip(self) -> str:
        return f"{self._net}.1"

    @property
    def ns_ip(self) -> str:
        return f"{self._net}.2"

    @property
    def host_ip6(self) -> str:
        return f"fd00:{201 + SLOT}:{self.index}::1"

    @property
    def ns_ip6(self) -> str:
        return f"fd00:{201 + SLOT}:{self.index}::2"

    def run(self, cmd: str, **kw) -> str:
        return sh(f"ip netns exec {self.ns} {cmd}", **kw)

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *args], **kw)

    def mac(self, inside: bool) -> str:
        if inside:
            return self.run("cat /sys/class/net/eth0/address", capture=True).strip()
        return open(f"/sys/class/net/{self.host_if}/address").read().strip()


def _teardown(h: TestHost) -> None:
    sh(f"ip link del {h.host_if}", check=False)
    sh(f"ip netns del {h.ns}", check=False)


def create_host(index: int, *, offloads: bool = False, ipv6: bool = True) -> TestHost:
    h = TestHost(index)
    _teardown(h)
    sh(f"ip netns add {h.ns}")
    sh(f"ip link add {h.host_if} type veth peer name eth0 netns {h.ns}")
    if not ipv6:  # a silent link: no router solicitations, MLD or ND
        sh(f"sysctl -qw net.ipv6.conf.{h.host_if}.disable_ipv6=1")
        h.run("sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1")
    sh(f"ip addr add {h.host_ip}/24 dev {h.host_if}")
    if ipv6:
        sh(f"ip -6 addr add {h.host_ip6}/64 dev {h.host_if} nodad")
    sh(f"ip link set {h.host_if} up")
    h.run(f"ip addr add {h.ns_ip}/24 dev eth0")
    if ipv6:
        h.run(f"ip -6 addr add {h.ns_ip6}/64 dev eth0 nodad")
    h.run("ip link set eth0 up")
    h.run("ip link set lo up")
    if not offloads:
        for dev, pre in ((h.host_if, ""), ("eth0", f"ip netns exec {h.ns} ")):
            sh(f"{pre}ethtool -K {dev} tso off gso off gro off tx off rx off >/dev/null 2>&1", check=False)
    # static neighbours: no ARP/ND packets in the measurements
    sh(f"ip neigh replace {h.ns_ip} lladdr {h.mac(True)} dev {h.host_if}")
    h.run(f"ip neigh replace {h.host_ip} lladdr {h.mac(False)} dev eth0")
    if ipv6:
        sh(f"ip -6 neigh replace {h.ns_ip6} lladdr {h.mac(True)} dev {h.host_if}")
        h.run(f"ip -6 neigh replace {h.host_ip6} lladdr {h.mac(False)} dev eth0")
    return h


@contextmanager
def make_hosts(*indices: int, offloads: bool = False, ipv6: bool = True):
    hosts = []
    try:
        for i in indices:
            hosts.append(create_host(i, offloads=offloads, ipv6=ipv6))
        yield hosts
    finally:
        for h in hosts:
            _teardown(h)


def route_between(a: TestHost, b: TestHost) -> None:
    """Route each host's namespace to the other's through the root namespace, as a node
    routes between its pods: IPv4 forwarding on their two veths only (IPv4 decides it per
    input device) and in each namespace a route to the other's /24 via the root side."""
    for h, other in ((a, b), (b, a)):
        sh(f"sysctl -qw net.ipv4.conf.{h.host_if}.forwarding=1")
        h.run(f"ip route add {other.ns_ip.rsplit('.', 1)[0]}.0/24 via {h.host_ip}")


def udp_conversation(
    a: TestHost, b: TestHost, dst: str, port: int, send: list[int], reply: list[int], *, src: str | None = None
) -> None:
    """From namespace ``a`` (its socket bound to ``src`` if given), one UDP datagram of each
    size in ``send`` to ``dst``:``port`` in namespace ``b``, which answers each with the next
    size in ``reply``; every answer arrives before the next datagram leaves."""
    server = b.popen(
        [
            sys.executable,
            "-c",
            "import socket\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.bind(('{dst}',{port})); s.settimeout(20); print('ready',flush=True)\n"
            f"for n in {reply}:\n"
            "    d,peer=s.recvfrom(65535); s.sendto(b'r'*n,peer)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the UDP responder in {b.ns} did not start")
        bind = f"s.bind(('{src}', 0)); " if src else ""
        a.run(
            f'{sys.executable} -c "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); '
            f"{bind}s.settimeout(10)\nfor n in {send}:\n"
            f"    s.sendto(b'q'*n, ('{dst}', {port})); s.recvfrom(65535)\n\""
        )
        if server.wait(20) != 0:
            raise RuntimeError(f"the UDP responder in {b.ns} failed ({server.returncode})")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def start_capture(iface: str, pcap: str, bpf_filter: str, *, count: int | None = None) -> subprocess.Popen:
    """tcpdump writing each frame on ``iface`` that matches ``bpf_filter`` to ``pcap`` as it
    arrives; returned once it is capturing. With ``count`` it exits after that many frames;
    otherwise stop it with SIGINT."""
    args = ["tcpdump", "-i", iface, "-w", pcap, "-U", "-n", "--immediate-mode", "-Z", "root"]
    if count is not None:
        args += ["-c", str(count)]
    dump = subprocess.Popen([*args, bpf_filter], stderr=subprocess.PIPE, text=True)
    line = dump.stderr.readline() if dump.stderr is not None else ""
    if "listening on" not in line:
        dump.kill()
        dump.wait()
        raise RuntimeError(f"tcpdump on {iface} did not start: {line.strip()}")
    return dump


@contextmanager
def private_bpffs(prefix: str = "xdpml-bpffs-"):
    """A BPF filesystem of its own in a fresh temporary folder (pins there never touch the
    host's /sys/fs/bpf/xdpml); unmounted and removed afterwards. Yields its path."""
    d = tempfile.mkdtemp(prefix=prefix)
    subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


def wait_port(host: TestHost | None, ip: str, port: int, timeout: float = 5.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{ip}:{port} not listening")


def is_root() -> bool:
    return os.geteuid() == 0


def make_certs(d: Path, *, server_name: str) -> dict[str, str]:
    """A CA, a server certificate for ``server_name`` and a client certificate, as PEM files
    in ``d`` (for labs, benchmarks and the demo: mutual TLS between an agent and a
    collector on one machine). Returns the paths: ca, server, server_key, client, client_key."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def make(cn, issuer=None, *, ca=False, usage=None, dns=None):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        ikey, iname = (key, name) if issuer is None else (issuer[0], issuer[1].subject)
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(iname)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if dns:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        return key, b.sign(ikey, hashes.SHA256())

    ca = make("xdpml lab CA", ca=True)
    pairs = {
        "ca": ca,
        "server": make("collector", ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, dns=server_name),
        "client": make("agent", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
    }
    out = {}
    for name, (key, cert) in pairs.items():
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        out[name], out[f"{name}_key"] = str(d / f"{name}.pem"), str(d / f"{name}.key")
    return out
