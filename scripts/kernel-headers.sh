#!/usr/bin/env bash
# Make kernel headers available to BCC for the running kernel.
#  1. /lib/modules/$(uname -r)/build exists and holds headers -> use them (host's own).
#  2. otherwise install Debian's linux-headers-amd64 and link build -> the -amd64 dir,
#     source -> the -common dir. Existing paths are never overwritten.
# Prints one line saying which headers are in use. --check-only: never install.
set -euo pipefail
KREL=$(uname -r)
MOD=/lib/modules/$KREL
check_only=${1:-}

if [ -e "$MOD/build/include/generated/autoconf.h" ] || [ -e "$MOD/build/include/linux/kconfig.h" ]; then
  echo "[headers] host kernel headers: $(readlink -f "$MOD/build")" >&2
  exit 0
fi
if [ -e "$MOD/build" ]; then
  echo "[headers] $MOD/build exists but holds no headers; not touching it" >&2
  exit 1
fi
if [ "$check_only" = --check-only ]; then
  echo "[headers] no kernel headers for $KREL" >&2
  exit 1
fi
arch=$(dpkg --print-architecture)
if ! ls -d /usr/src/linux-headers-*-"$arch" >/dev/null 2>&1; then
  echo "[headers] installing Debian linux-headers-$arch (fallback: no headers packaged for $KREL)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "linux-headers-$arch" >/dev/null
fi
amd=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n1)
common=${amd%-"$arch"}-common
mkdir -p "$MOD"
ln -s "$amd" "$MOD/build"
[ -e "$MOD/source" ] || ln -s "$common" "$MOD/source"
echo "[headers] fallback: Debian headers $(basename "$amd") linked for kernel $KREL" >&2
