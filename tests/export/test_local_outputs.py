"""Local outputs other users cannot squat or read: 0600 files, no world-writable
directories, no symlinks, Unix socket listeners checked with SO_PEERCRED."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from xdpml.agent.export.sinks import JsonLinesSink, UnixSocketSink, batch_lines

from xdpml.errors import OutputError
from xdpml.wire.columns import ColumnBatch

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(1)
print("ready", flush=True)
conn, _ = s.accept()
n = 0
while True:
    data = conn.recv(65536)
    if not data:
        break
    n += len(data)
print(n, flush=True)
"""


def batch(n=3):
    return ColumnBatch("flow", {"x": np.arange(n)})


def test_output_file_is_created_0600_and_an_existing_one_narrowed(tmp_path):
    new = tmp_path / "new.jsonl"
    sink = JsonLinesSink(str(new))
    sink.write(batch(3))
    sink.close()
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert len(new.read_text().splitlines()) == 3
    old = tmp_path / "old.jsonl"
    old.write_text('{"record":"flow"}\n')
    old.chmod(0o644)
    JsonLinesSink(str(old)).close()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert old.read_text() == '{"record":"flow"}\n'  # appended to, never truncated


def test_unsafe_output_paths_are_refused_with_one_line(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone can create the path first
    with pytest.raises(OutputError, match="writable by every user"):
        JsonLinesSink(str(shared / "f.jsonl"))
    assert not (shared / "f.jsonl").exists()
    (tmp_path / "target").write_text("")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "target")
    with pytest.raises(OutputError, match="symbolic link"):
        JsonLinesSink(str(tmp_path / "link.jsonl"))
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("")
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(OutputError, match="belongs to another user"):
        JsonLinesSink(str(theirs))
    with pytest.raises(OutputError, match="no such file or directory"):
        JsonLinesSink(str(tmp_path / "missing" / "f.jsonl"))


def test_cli_bad_output_path_is_one_clear_line(tmp_path):
    xdpml = str(Path(sys.executable).parent / "xdpml")
    r = subprocess.run(
        [xdpml, "agent", "-i", "lo", "-o", str(tmp_path / "missing" / "f.jsonl")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == OutputError.exit_code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such file or directory" in lines[0]
    assert "Errno" not in r.stderr and "Traceback" not in r.stderr


def test_bare_socket_name_lives_in_a_private_directory(tmp_path):
    d = tmp_path / "run-xdpml"
    sink = UnixSocketSink("ids.sock", socket_dir=str(d))
    assert sink.path == str(d / "ids.sock")
    st = d.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    d.chmod(0o755)
    with pytest.raises(OutputError, match="must be 0700"):
        UnixSocketSink("ids.sock", socket_dir=str(d))
    d.chmod(0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(OutputError, match="belongs to uid 65534"):
        UnixSocketSink("ids.sock", socket_dir=str(d))


def test_socket_in_a_world_writable_directory_is_refused(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(OutputError, match="writable by every user"):
        UnixSocketSink(str(shared / "ids.sock"))


def _listener_as_nobody(path: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        ["/usr/bin/python3", "-c", LISTENER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        user=NOBODY,
        group=NOBODY,
        cwd="/",
    )
    assert p.stdout.readline().strip() == "ready"
    return p


def _private_parent(tmp_path: Path) -> Path:
    # tmp_path's parents are 0700 root: let nobody reach the directories made below
    for parent in (tmp_path, *tmp_path.parents[:2]):
        parent.chmod(parent.stat().st_mode | 0o711)
    return tmp_path


def test_a_listener_of_another_user_is_refused_by_its_credentials(tmp_path):
    # A directory root owns but group nogroup may write to: nobody can squat the path.
    d = _private_parent(tmp_path) / "group-writable"
    d.mkdir()
    os.chown(d, 0, NOBODY)
    d.chmod(0o770)
    sink = UnixSocketSink(str(d / "ids.sock"))
    squatter = _listener_as_nobody(d / "ids.sock")
    try:
        sink.write(batch(5))
        sink.close()
        received = int(squatter.stdout.readline())
    finally:
        squatter.kill()
        squatter.wait(10)
    assert received == 0
    assert sink.refused_peers == 1 and sink.dropped == 5 and sink.records == 0


def test_the_directory_owner_is_a_trusted_listener(tmp_path):
    d = _private_parent(tmp_path) / "consumer-dir"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)  # the consumer's own directory: it owns it, so it may listen
    sink = UnixSocketSink(str(d / "ids.sock"))
    consumer = _listener_as_nobody(d / "ids.sock")
    try:
        sink.write(batch(4))
        sink.close()
        received = int(consumer.stdout.readline())
    finally:
        consumer.kill()
        consumer.wait(10)
    assert sink.refused_peers == 0 and sink.records == 4 and sink.dropped == 0
    assert received == sum(len(line) + 1 for line in batch_lines(batch(4)))
