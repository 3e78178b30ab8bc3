#!/usr/bin/env python3
"""Build one Dockerfile target's root filesystem without a Docker engine, and run it.

    scripts/build-rootfs.py build agent|collector [--out DIR]
    scripts/build-rootfs.py run DIR [--bind SRC:DST[:ro]]... [--user U] [-- ARGS...]
    scripts/build-rootfs.py stages          # the parsed Dockerfile, as JSON

`build` starts from Debian's own bootstrap (debootstrap --variant=minbase) of the suite
named by the base image (`FROM debian:bookworm-slim` -> bookworm, made slim as Debian's
container images are: see container_image_tweaks), cached as a tarball under
/var/cache/xdpml (XDPML_ROOTFS_CACHE), then replays the target's stages from the
Dockerfile, which stays the source of truth: FROM (an earlier stage or the Debian base),
SHELL, ENV (with $VAR expansion), WORKDIR, COPY (filtered by .dockerignore), RUN (in a
chroot, with the stage's environment, user and working directory; `--mount=type=cache`
binds a directory of the cache, as BuildKit does), USER, ENTRYPOINT, CMD, LABEL.
RUN steps see the build host's CA bundle (XDPML_BUILD_CA, default the host's
/etc/ssl/certs/ca-certificates.crt; empty for none) through PIP_CERT/SSL_CERT_FILE, so
downloads work behind a TLS-inspecting proxy; it is not left in the image.
Anything else stops the build with a one-line error. The result is DIR (default
/var/cache/xdpml/rootfs/TARGET) and DIR.json, the image configuration (env, user,
workdir, entrypoint, cmd) and sizes; the same JSON is the last line on stdout.

`run` starts the image's entrypoint (or --entrypoint) in DIR as a container runtime
would: its own mount namespace (every mount disappears with the process), /proc, /sys,
/dev and /etc/resolv.conf from the host, the image's environment, user and working
directory, plus the --bind mounts (e.g. /lib/modules:/lib/modules:ro). The network is
the caller's (host network). The process execs into the entrypoint: signals sent to the
`run` process reach it directly.

Needs root, debootstrap and unshare (util-linux). Standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDPML_ROOTFS_CACHE", "/var/cache/xdpml"))
NS_MARK = "XDPML_ROOTFS_IN_NS"
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# CA bundle of the build host, given to RUN steps (not to the image); "" = none.
HOST_CA = os.environ.get("XDPML_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt")


class BuildError(Exception):
    """A Dockerfile this builder cannot replay, or a step that failed."""


def log(msg: str) -> None:
    print(f"[rootfs] {msg}", file=sys.stderr, flush=True)


# ---- Dockerfile -----------------------------------------------------------------------


@dataclass
class Instruction:
    line: int
    op: str
    args: str
    flags: list[str] = field(default_factory=list)


@dataclass
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def logical_lines(text: str):
    """(first line number, instruction text): backslash continuations joined, comment
    lines dropped (also inside a continuation, as Docker does)."""
    buf, start = [], 0
    for no, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if not buf:
            start = no
        if s.endswith("\\"):
            buf.append(s[:-1].strip())
            continue
        buf.append(s)
        yield start, " ".join(p for p in buf if p)
        buf = []
    if buf:
        yield start, " ".join(p for p in buf if p)


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for no, line in logical_lines(text):
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        flags = []
        while op in ("RUN", "COPY") and rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            if not m:
                raise BuildError(f"Dockerfile line {no}: cannot read FROM {rest!r}")
            stages.append(Stage(base=m.group(1), name=m.group(2), line=no))
        elif not stages:
            raise BuildError(f"Dockerfile line {no}: {op} before the first FROM")
        else:
            stages[-1].instructions.append(Instruction(no, op, rest, flags))
    if not stages:
        raise BuildError("Dockerfile has no FROM")
    return stages


def stage_chain(stages: list[Stage], target: str) -> list[Stage]:
    """The stages that make `target`, base first (each FROM an earlier stage or an image)."""
    by_name = {s.name: s for s in stages if s.name}
    if target not in by_name:
        raise BuildError(f"no stage named {target!r} in the Dockerfile (stages: {', '.join(by_name) or 'none'})")
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def env_pairs(args: str, env: dict[str, str]) -> list[tuple[str, str]]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
        return [(words[0], expand(args.split(None, 1)[1] if len(words) > 1 else "", env))]
    pairs = []
    for w in words:
        k, eq, v = w.partition("=")
        if not eq:
            raise BuildError(f"ENV {args!r}: expected KEY=VALUE")
        pairs.append((k, expand(v, env)))
    return pairs


def json_or_shell(args: str, shell: list[str]) -> list[str]:
    if args.startswith("["):
        try:
            argv = json.loads(args)
        except json.JSONDecodeError as e:
            raise BuildError(f"cannot read {args!r} as a JSON list: {e}") from None
        return [str(a) for a in argv]
    return [*shell, args]


# ---- .dockerignore --------------------------------------------------------------------


def _pattern_regex(pat: str) -> re.Pattern:
    """Docker's pattern syntax: * and ? within one path element, ** any number of them."""
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**", i):
            i += 2
            if pat.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
        elif pat[i] == "*":
            out += "[^/]*"
            i += 1
        elif pat[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pat[i])
            i += 1
    return re.compile(out + "(?:/.*)?")  # a matched directory takes what is under it


def load_dockerignore(context: Path) -> list[tuple[bool, re.Pattern]]:
    path = context / ".dockerignore"
    rules = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            rules.append((keep, _pattern_regex(pat)))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    out = False
    for keep, rx in rules:  # the last matching rule decides
        if rx.fullmatch(rel):
            out = not keep
    return out


# ---- the build ------------------------------------------------------------------------


def in_private_mount_ns(argv: list[str]) -> None:
    """Re-exec this script in a mount namespace of its own: every bind and proc mount it
    makes is gone when it exits, whatever way it exits."""
    if os.environ.get(NS_MARK) == "1":
        return
    if os.geteuid() != 0:
        raise BuildError("needs root (debootstrap, chroot and mounts)")
    if not shutil.which("unshare"):
        raise BuildError("needs unshare (util-linux)")
    os.environ[NS_MARK] = "1"
    os.execvp(
        "unshare",
        ["unshare", "--mount", "--propagation", "private", "--", sys.executable, str(Path(__file__).resolve()), *argv],
    )


def sh(*cmd: str) -> None:
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise BuildError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")


def base_tarball(image: str) -> Path:
    """debootstrap of the suite `image` names, made once and kept as a tarball."""
    m = re.fullmatch(r"debian:(\w+)(-slim)?", image)
    if not m:
        raise BuildError(f"FROM {image}: only debian:SUITE[-slim] bases can be bootstrapped here")
    suite, slim = m.group(1), bool(m.group(2))
    tar = CACHE / "base" / f"debian-{suite}{'-slim' if slim else ''}-{BASE_VERSION}.tar"
    tar.parent.mkdir(parents=True, exist_ok=True)
    with open(tar.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tar.exists():
            return tar
        if not shutil.which("debootstrap"):
            raise BuildError("debootstrap is not installed: apt-get install debootstrap")
        tmp = tar.parent / f"tmp-{suite}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        log(f"debootstrap --variant=minbase {suite} (once; cached as {tar})")
        r = subprocess.run(
            ["debootstrap", "--variant=minbase", suite, str(tmp)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if r.returncode:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BuildError(f"debootstrap {suite} failed: {r.stderr.strip()[-500:]}")
        container_image_tweaks(tmp, slim)
        for f in ("etc/resolv.conf", "etc/hostname"):
            (tmp / f).unlink(missing_ok=True)
        shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
        (tmp / "var/cache/apt/archives/partial").mkdir(parents=True)
        sh("tar", "-C", str(tmp), "--numeric-owner", "-cpf", str(tar) + ".tmp", ".")
        os.replace(str(tar) + ".tmp", tar)
        shutil.rmtree(tmp)
        log(f"base ready in {time.monotonic() - t0:.0f} s")
        return tar


# What Debian's container images (debian:SUITE, debian:SUITE-slim) add to a minbase
# bootstrap, written here from their documented behaviour: no service starts during a
# build, dpkg without fsync, apt without translations; -slim also drops documentation,
# manual pages and translations (copyright files stay). Bump BASE_VERSION when changing.
BASE_VERSION = 2
DPKG_SLIM = [
    "/usr/share/doc/*",
    "/usr/share/info/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/overrides/*",
    "/usr/share/linda/*",
    "/usr/share/groff/*",
]
DPKG_KEEP = ["/usr/share/doc/*/copyright"]


def container_image_tweaks(root: Path, slim: bool) -> None:
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (root / "etc/dpkg/dpkg.cfg.d/container-unsafe-io").write_text("force-unsafe-io\n")
    (root / "etc/apt/apt.conf.d/container-no-languages").write_text('Acquire::Languages "none";\n')
    if not slim:
        return
    (root / "etc/dpkg/dpkg.cfg.d/container-slim").write_text(
        "".join(f"path-exclude {p}\n" for p in DPKG_SLIM) + "".join(f"path-include {p}\n" for p in DPKG_KEEP)
    )
    doc = root / "usr/share/doc"

    def keep(f: Path) -> bool:
        return f.name == "copyright" and f.parent.parent == doc

    for pattern in DPKG_SLIM:  # what the bootstrap already installed
        for top in root.glob(pattern.lstrip("/")):
            if top.is_symlink() or not top.is_dir():
                top.unlink()
                continue
            for dirpath, dirnames, filenames in os.walk(top, topdown=False):
                for n in filenames:
                    if not keep(Path(dirpath, n)):
                        os.unlink(os.path.join(dirpath, n))
                for n in dirnames:
                    d = os.path.join(dirpath, n)
                    if os.path.islink(d):
                        os.unlink(d)
                    elif not os.listdir(d):
                        os.rmdir(d)
            if not any(top.iterdir()):
                top.rmdir()


def tree_size(path: Path) -> int:
    """Bytes of the files under path (each hard-linked inode once), not following links
    nor entering other file systems (the /proc, /sys and /dev mounts)."""
    seen, total = set(), 0
    dev = os.lstat(path).st_dev
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
        for n in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size if not stat.S_ISDIR(st.st_mode) else 0
    return total


def lookup_user(rootfs: Path, user: str) -> tuple[int, int, str]:
    """uid, gid and home of USER (name or number, optionally :group) in the image."""
    name, _, group = user.partition(":")
    passwd = [ln.split(":") for ln in (rootfs / "etc/passwd").read_text().splitlines() if ln.count(":") >= 6]
    groups = [ln.split(":") for ln in (rootfs / "etc/group").read_text().splitlines() if ln.count(":") >= 2]
    row = next((p for p in passwd if p[0] == name or p[2] == name), None)
    if row is None and not name.isdigit():
        raise BuildError(f"USER {user}: no such user in the image")
    uid = int(row[2]) if row else int(name)
    gid = int(row[3]) if row else uid
    if group:
        g = next((g for g in groups if g[0] == group or g[2] == group), None)
        if g is None and not group.isdigit():
            raise BuildError(f"USER {user}: no such group in the image")
        gid = int(g[2]) if g else int(group)
    return uid, gid, (row[5] if row else "/")


def host_mounts(rootfs: Path) -> None:
    """/proc, /sys and /dev of the host, and its resolver, as a build step or a container sees them."""
    for d in ("proc", "sys", "dev"):
        (rootfs / d).mkdir(exist_ok=True)
    sh("mount", "-t", "proc", "proc", str(rootfs / "proc"))
    sh("mount", "--bind", "/sys", str(rootfs / "sys"))
    sh("mount", "--rbind", "/dev", str(rootfs / "dev"))
    resolv = rootfs / "etc/resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    resolv.touch()
    sh("mount", "--bind", "/etc/resolv.conf", str(resolv))


def bind(src: Path, dst: Path, readonly: bool = False) -> None:
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.touch()
    sh("mount", "--rbind", str(src), str(dst))
    if readonly:
        sh("mount", "-o", "remount,bind,ro", str(dst))


def inside(rootfs: Path, path: str, workdir: str = "/") -> Path:
    p = os.path.normpath(os.path.join(workdir, path))
    return rootfs / p.lstrip("/")


def copy_context(context: Path, srcs: list[str], dest: str, rootfs: Path, workdir: str) -> int:
    rules = load_dockerignore(context)
    target = inside(rootfs, dest, workdir)
    copied = 0
    for src in srcs:
        if any(c in src for c in "*?["):
            raise BuildError(f"COPY {src}: wildcards are not supported by this builder")
        s = (context / src).resolve()
        if context.resolve() not in (s, *s.parents):
            raise BuildError(f"COPY {src}: outside the build context")
        if not s.exists():
            raise BuildError(f"COPY {src}: no such file in the build context")
        if s.is_file():
            to = target / s.name if dest.endswith("/") or target.is_dir() else target
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, to)
            copied += 1
            continue
        for dirpath, dirnames, filenames in os.walk(s):
            reldir = os.path.relpath(dirpath, context)
            reldir = "" if reldir == "." else reldir + "/"
            dirnames[:] = [d for d in dirnames if not ignored(reldir + d, rules)]
            out = target / os.path.relpath(dirpath, s)
            out.mkdir(parents=True, exist_ok=True)
            for n in filenames:
                if ignored(reldir + n, rules):
                    continue
                fp = Path(dirpath, n)
                if fp.is_symlink():
                    (out / n).unlink(missing_ok=True)
                    os.symlink(os.readlink(fp), out / n)
                else:
                    shutil.copy2(fp, out / n)
                copied += 1
    return copied


def cache_mount(flag: str, rootfs: Path, target_name: str) -> tuple[Path, Path, bool]:
    """--mount=type=cache,target=X[,id=..][,sharing=locked]: a directory of the cache at X."""
    opts = dict(kv.partition("=")[::2] for kv in flag.removeprefix("--mount=").split(","))
    if opts.get("type") != "cache" or "target" not in opts:
        raise BuildError(f"RUN {flag}: only --mount=type=cache,target=... is supported")
    key = opts.get("id") or opts["target"].strip("/").replace("/", "_")
    src = CACHE / "buildcache" / key
    src.mkdir(parents=True, exist_ok=True)
    return src, inside(rootfs, opts["target"]), opts.get("sharing") == "locked"


def build(target: str, out: Path, dockerfile: Path, context: Path) -> dict:
    t0 = time.monotonic()
    chain = stage_chain(parse_dockerfile(dockerfile.read_text()), target)
    base = base_tarball(chain[0].base)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sh("tar", "-C", str(out), "--numeric-owner", "-xpf", str(base))
    base_bytes = tree_size(out)
    host_mounts(out)
    env = {"PATH": DEBIAN_PATH}
    shell = ["/bin/sh", "-c"]
    workdir, user = "/", "root"
    config: dict = {"entrypoint": [], "cmd": [], "labels": {}}
    for st in chain:
        for ins in st.instructions:
            where = f"Dockerfile line {ins.line}"
            if ins.flags and ins.op != "RUN":
                raise BuildError(f"{where}: {ins.op} {' '.join(ins.flags)} is not supported by this builder")
            if ins.op == "SHELL":
                shell = json.loads(ins.args)
            elif ins.op == "ENV":
                for k, v in env_pairs(ins.args, env):
                    env[k] = v
            elif ins.op == "WORKDIR":
                workdir = os.path.normpath(os.path.join(workdir, expand(ins.args, env)))
                inside(out, workdir).mkdir(parents=True, exist_ok=True)
            elif ins.op == "COPY":
                *srcs, dest = shlex.split(expand(ins.args, env))
                n = copy_context(context, srcs, dest, out, workdir)
                log(f"{where}: COPY {ins.args} ({n} files)")
            elif ins.op == "USER":
                user = expand(ins.args, env)
                lookup_user(out, user)
            elif ins.op == "ENTRYPOINT":
                config["entrypoint"] = json_or_shell(ins.args, shell)
                config["cmd"] = []  # Docker resets CMD when ENTRYPOINT is set
            elif ins.op == "CMD":
                config["cmd"] = json_or_shell(ins.args, shell)
            elif ins.op == "LABEL":
                config["labels"].update(env_pairs(ins.args, env))
            elif ins.op == "RUN":
                run_step(ins, out, env, shell, workdir, user, target)
            else:
                raise BuildError(f"{where}: {ins.op} is not supported by this builder")
    total = tree_size(out)
    config.update(
        target=target,
        base=chain[0].base,
        env=env,
        workdir=workdir,
        user=user,
        rootfs=str(out),
        size_bytes=total,
        base_size_bytes=base_bytes,
        build_seconds=round(time.monotonic() - t0, 1),
    )
    Path(str(out) + ".json").write_text(json.dumps(config, indent=2) + "\n")
    log(
        f"{target}: {total / 1e6:.0f} MB ({(total - base_bytes) / 1e6:.0f} MB over the "
        f"{base_bytes / 1e6:.0f} MB base) in {config['build_seconds']:.0f} s -> {out}"
    )
    return config


def run_step(ins: Instruction, rootfs: Path, env: dict, shell: list[str], workdir: str, user: str, target: str) -> None:
    mounts, locks = [], []
    for flag in ins.flags:
        if not flag.startswith("--mount="):
            raise BuildError(f"Dockerfile line {ins.line}: RUN {flag} is not supported by this builder")
        src, dst, locked = cache_mount(flag, rootfs, target)
        if locked:
            lk = open(src.parent / f".{src.name}.lock", "w")
            fcntl.flock(lk, fcntl.LOCK_EX)
            locks.append(lk)
        bind(src, dst)
        mounts.append(dst)
    argv = json_or_shell(ins.args, shell)
    uid, gid, home = lookup_user(rootfs, user)
    run_env = {"HOME": home, **env}
    if HOST_CA and os.path.isfile(HOST_CA):
        # The build host's trust (e.g. a TLS-inspecting proxy's CA) for this step's
        # downloads only, as Docker passes proxy settings to a build without putting them
        # in the image: bound at a path outside the image's files, gone after the step.
        ca = rootfs / "run" / "xdpml-build-ca.crt"
        bind(Path(HOST_CA), ca, readonly=True)
        mounts.append(ca)
        for k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            run_env.setdefault(k, "/run/xdpml-build-ca.crt")
    log(f"Dockerfile line {ins.line}: RUN {ins.args[:100]}{'...' if len(ins.args) > 100 else ''}")
    t0 = time.monotonic()

    def enter() -> None:
        os.chroot(rootfs)
        os.chdir(workdir)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    try:
        r = subprocess.run(argv, env=run_env, preexec_fn=enter, stdout=sys.stderr)
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)], check=False)
            if m.is_file() and m.name == "xdpml-build-ca.crt":
                m.unlink()
        for lk in locks:
            lk.close()
    if r.returncode:
        raise BuildError(f"Dockerfile line {ins.line}: RUN failed with exit code {r.returncode}")
    log(f"  done in {time.monotonic() - t0:.0f} s")


# ---- run ------------------------------------------------------------------------------


def run(rootfs: Path, binds: list[str], user: str | None, entrypoint: str | None, args: list[str]) -> None:
    config = json.loads(Path(str(rootfs) + ".json").read_text())
    host_mounts(rootfs)
    for b in binds:
        parts = b.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "ro"):
            raise BuildError(f"--bind {b}: expected SRC:DST or SRC:DST:ro")
        if not os.path.exists(parts[0]):
            raise BuildError(f"--bind {b}: {parts[0]} does not exist")
        bind(Path(parts[0]), inside(rootfs, parts[1]), readonly=len(parts) == 3)
    uid, gid, home = lookup_user(rootfs, user or config["user"])
    argv = ([entrypoint] if entrypoint else config["entrypoint"]) + (args or config["cmd"])
    if not argv:
        raise BuildError("nothing to run: the image has no ENTRYPOINT or CMD and no arguments were given")
    env = {"HOME": home, "HOSTNAME": os.uname().nodename, **config["env"]}
    os.chroot(rootfs)
    os.chdir(config["workdir"])
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.environ.clear()
    os.environ.update(env)
    os.execvpe(argv[0], argv, env)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="build-rootfs.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a target's root filesystem")
    b.add_argument("target", help="Dockerfile stage, e.g. agent or collector")
    b.add_argument("--out", type=Path, help="directory to build in (default: CACHE/rootfs/TARGET)")
    b.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    b.add_argument("--context", type=Path, default=ROOT)
    r = sub.add_parser("run", help="run a built root filesystem's entrypoint")
    r.add_argument("rootfs", type=Path)
    r.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:ro]")
    r.add_argument("--user", help="user[:group] instead of the image's USER")
    r.add_argument("--entrypoint", help="program instead of the image's ENTRYPOINT")
    p.epilog = "run: arguments after -- replace the image's CMD"
    s = sub.add_parser("stages", help="print the parsed Dockerfile as JSON")
    s.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    a.args = argv[cut + 1 :]
    try:
        if a.cmd == "stages":
            stages = parse_dockerfile(a.dockerfile.read_text())
            print(
                json.dumps(
                    [
                        {
                            "name": st.name,
                            "base": st.base,
                            "instructions": [[i.op, i.flags, i.args] for i in st.instructions],
                        }
                        for st in stages
                    ],
                    indent=1,
                )
            )
            return 0
        in_private_mount_ns(argv)
        if a.cmd == "build":
            out = (a.out or CACHE / "rootfs" / a.target).absolute()
            print(json.dumps(build(a.target, out, a.dockerfile, a.context.resolve())))
            return 0
        run(a.rootfs.absolute(), a.bind, a.user, a.entrypoint, a.args)
    except BuildError as e:
        print(f"build-rootfs: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"build-rootfs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
