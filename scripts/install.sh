#!/usr/bin/env bash
# One install script for the README, .ci/run and the Dockerfile.
#
#   scripts/install.sh                   agent and collector: apt packages, kernel headers,
#                                        venv with an editable install of xdpml[agent,collector]
#   scripts/install.sh --demo            that plus what `xdpml demo` uses (scapy, ethtool)
#   scripts/install.sh --test            also test/bench tools (xdpml[test]: scapy, nfstream,
#                                        mlserver venv, helm sdk, hadolint...)
#   scripts/install.sh --image agent     Dockerfile target agent: BCC, pyroute2, iproute2 and
#                                        Debian's kernel headers (linked at container start by
#                                        kernel-headers.sh, not here); venv seeing Debian's
#                                        bcc with a non-editable install of xdpml[agent]
#   scripts/install.sh --image collector Dockerfile target collector: a plain venv with a
#                                        non-editable install of xdpml[collector], no BCC
#   --dry-run                            print what the mode installs, install nothing
#
# Idempotent: a second run only checks. Must run as root on Debian (bookworm or later).
set -euo pipefail

MODE=runtime
IMAGE=
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --test) MODE=test ;;
    --demo) MODE=demo ;;
    --dry-run) DRY_RUN=1 ;;
    --image)
      MODE=image
      IMAGE=${2:-}
      case "$IMAGE" in
        agent|collector) shift ;;
        *) echo "install.sh: --image needs a target: agent or collector" >&2; exit 2 ;;
      esac ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${XDPML_VENV:-$ROOT/.venv}
log() { printf '[install] %s\n' "$*" >&2; }

# ---- what this mode installs -----------------------------------------------
APT_PKGS=(python3-venv ca-certificates)
if [ "$IMAGE" != collector ]; then
  APT_PKGS+=(python3-bpfcc python3-pyroute2 iproute2)
fi
if [ "$MODE" = demo ]; then
  APT_PKGS+=(ethtool procps)
fi
if [ "$MODE" = test ]; then
  # debootstrap: tests/image/test_rootfs.py builds the images' root filesystems with it
  APT_PKGS+=(tcpreplay iperf3 tcpdump libpcap0.8 procps iputils-ping ethtool gcc libc6-dev linux-libc-dev debootstrap)
fi
if [ "$IMAGE" = agent ]; then
  # The fallback for nodes without headers. Which kernel the image will run on is
  # unknown at build time, so the link into /lib/modules is made at container start.
  APT_PKGS+=("linux-headers-$(dpkg --print-architecture)")
fi
# /usr/bin/python3 with --system-site-packages, so Debian's bcc bindings (and
# pyroute2) are importable. The collector image needs neither: a plain venv.
VENV_OPTS=(--system-site-packages)
[ "$IMAGE" = collector ] && VENV_OPTS=()
case "$MODE" in
  test) PIP_SPEC=(-e "$ROOT[test]") ;;
  demo) PIP_SPEC=(-e "$ROOT[demo]") ;;
  # Non-editable: the image needs no build tree; the agent finds the BPF C sources
  # through XDPML_BPF_DIR (set in the Dockerfile).
  image) PIP_SPEC=("$ROOT[$IMAGE]") ;;
  *) PIP_SPEC=(-e "$ROOT[agent,collector]") ;;
esac
if [ "$DRY_RUN" = 1 ]; then
  echo "apt: ${APT_PKGS[*]}"
  echo "venv: $VENV ${VENV_OPTS[*]}"
  echo "pip: ${PIP_SPEC[*]#"$ROOT"}"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (it installs Debian packages and kernel headers)" >&2
  exit 1
fi

# ---- Debian packages -------------------------------------------------------
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- kernel headers for BCC ------------------------------------------------
# Use the host's headers when present; otherwise Debian's packaged ones, linked
# in where BCC looks. Never overwrite headers a host already has.
if [ "$MODE" != image ]; then
  "$ROOT/scripts/kernel-headers.sh" ${XDPML_SKIP_HEADERS:+--check-only}
fi

# ---- Python venv -----------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  /usr/bin/python3 -m venv "${VENV_OPTS[@]}" "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_SPEC[@]}"

if [ "$MODE" = test ]; then
  # MLServer pins its own protobuf/grpc/fastapi versions: it gets its own venv
  # and the tests run it as a separate process, as a real deployment would.
  MLS=${XDPML_MLSERVER_VENV:-$ROOT/.venv-mlserver}
  if [ ! -x "$MLS/bin/mlserver" ]; then
    log "creating MLServer venv $MLS"
    /usr/bin/python3 -m venv "$MLS"
    "$MLS/bin/pip" install -q --disable-pip-version-check mlserver mlserver-sklearn
  fi
fi
log "ready: $VENV/bin/xdpml"
