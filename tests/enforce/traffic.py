"""Traffic and independent counts for the enforcement tests: UDP datagrams sent from a
test namespace, a receiving socket, and the clsact qdisc's drop counter (the kernel's
own count of packets a TC program shot, independent of xdpml's counters)."""

import json
import socket
import subprocess
import sys


def send(host, dst: str, port: int, n: int, *, sport: int, tag: str) -> None:
    """n UDP datagrams from the namespace, payload tag + sequence number."""
    code = (
        f"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{host.ns_ip}', {sport}))\n"
        f"for i in range({n}): s.sendto(b'{tag}%06d' % i, ('{dst}', {port}))"
    )
    host.run(f'{sys.executable} -c "{code}"')


def qdisc_drops(ifname: str) -> int:
    out = subprocess.run(
        ["tc", "-s", "-j", "qdisc", "show", "dev", ifname], check=True, capture_output=True, text=True
    ).stdout
    return sum(q.get("drops", 0) for q in json.loads(out) if q.get("kind") == "clsact")


class Receiver:
    def __init__(self, ip: str, port: int):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.s.bind((ip, port))

    def take_until_marker(self, timeout: float = 30.0) -> list[bytes]:
        """Everything received up to the marker datagram (payload starting with M), sent
        after the packets under test on the same path: once it is here, they were all
        processed by the hooks."""
        got = []
        self.s.settimeout(timeout)
        while True:
            data = self.s.recv(2048)
            if data.startswith(b"M"):
                return got
            got.append(data)

    def close(self) -> None:
        self.s.close()
