#!/usr/bin/env bash
# Installs the host packages banger needs on a Debian/Ubuntu machine.
# Idempotent; safe to run on a machine that already has everything.
#   scripts/setup-host.sh               what banger itself uses
#   scripts/setup-host.sh --test-tools  plus what the test suite uses
set -euo pipefail

test_tools=0
[ "${1:-}" = --test-tools ] && test_tools=1

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host.sh: run as root (it uses apt-get)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
. /etc/os-release

need_pkgs=(gcc libc6-dev mmdebstrap e2fsprogs openssh-client iproute2 nftables ca-certificates git tmux zstd)
# Test servers and fixtures: a local OCI registry and the tools that push
# to it, htpasswd for its auth test, busybox for tiny test images, dig;
# curl and a headless browser for the web UI, the shells whose completion
# scripts are checked, Python with venv for the API contract tools
# (crates/e2e/tests/api.rs installs them from PyPI into a venv of its own).
if [ "$test_tools" = 1 ]; then
  need_pkgs+=(docker-registry skopeo umoci apache2-utils busybox-static dnsutils curl zsh fish)
  need_pkgs+=(python3 python3-venv python3-pip)
  # Ubuntu ships Chromium as a snap behind chromium-browser.
  if [ "${ID:-}" = ubuntu ]; then need_pkgs+=(chromium-browser); else need_pkgs+=(chromium); fi
fi

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 && [ -e /usr/share/qemu/qboot.rom ]
}

apt-get update -qq

if ! qemu_ok; then
  # A Debian host that already carries qemu-utils from bookworm-backports
  # cannot install bookworm's qemu-system-x86 next to it; take QEMU from
  # backports too in that case (it is also faster under TCG).
  if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    utils_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [[ "$utils_ver" == *bpo12* ]] || ! apt-cache policy qemu-system-x86 | grep -q Candidate; then
      mirror=$( { grep -rhE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true; } \
        | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ')
      mirror=${mirror:-http://deb.debian.org/debian}
      echo "deb ${mirror%/} bookworm-backports main" > /etc/apt/sources.list.d/banger-backports.list
      apt-get update -qq
    fi
    if [ -f /etc/apt/sources.list.d/banger-backports.list ]; then
      apt-get install -y -qq -t bookworm-backports --no-install-recommends qemu-system-x86 qemu-utils
    else
      apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-utils
    fi
  else
    apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-utils
  fi
fi

apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
qemu-system-x86_64 --version | head -n1
