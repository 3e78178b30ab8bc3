#!/usr/bin/env bash
# One install script for the README, .ci/run and the Dockerfile.
#
#   scripts/install.sh            runtime: apt packages, kernel headers, venv with xdpml
#   scripts/install.sh --demo     runtime plus what `xdpml demo` uses (scapy, ethtool)
#   scripts/install.sh --test     also test/bench tools (scapy, nfstream, mlserver venv, helm sdk...)
#   scripts/install.sh --image    Dockerfile: runtime apt packages plus Debian's kernel headers
#                                 (linked at container start by kernel-headers.sh, not here),
#                                 venv with a non-editable install of xdpml
#
# Idempotent: a second run only checks. Must run as root on Debian (bookworm or later).
set -euo pipefail

MODE=runtime
for a in "$@"; do
  case "$a" in
    --test) MODE=test ;;
    --demo) MODE=demo ;;
    --image) MODE=image ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${XDPML_VENV:-$ROOT/.venv}
log() { printf '[install] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (it installs Debian packages and kernel headers)" >&2
  exit 1
fi

# ---- Debian packages -------------------------------------------------------
APT_PKGS=(python3-bpfcc python3-venv python3-pyroute2 iproute2 ca-certificates)
if [ "$MODE" = demo ]; then
  APT_PKGS+=(ethtool procps)
fi
if [ "$MODE" = test ]; then
  APT_PKGS+=(tcpreplay iperf3 tcpdump libpcap0.8 procps iputils-ping ethtool gcc libc6-dev linux-libc-dev)
fi
if [ "$MODE" = image ]; then
  # The fallback for nodes without headers. Which kernel the image will run on is
  # unknown at build time, so the link into /lib/modules is made at container start.
  APT_PKGS+=("linux-headers-$(dpkg --print-architecture)")
fi
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
# /usr/bin/python3 so Debian's bcc bindings are importable (--system-site-packages).
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
if [ "$MODE" = test ]; then
  "${PIP[@]}" -e "$ROOT[test]"
elif [ "$MODE" = demo ]; then
  "${PIP[@]}" -e "$ROOT[demo]"
elif [ "$MODE" = image ]; then
  # Non-editable: the image needs no build tree; the BPF C sources are found through
  # XDPML_BPF_DIR (set in the Dockerfile).
  "${PIP[@]}" "$ROOT"
else
  "${PIP[@]}" -e "$ROOT"
fi

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
