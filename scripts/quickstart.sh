#!/usr/bin/env bash
# From a fresh Debian/Ubuntu machine (as root, with a Rust toolchain):
# install host packages, build banger, and run a command in a fresh VM.
# The first run builds the default Debian image (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-host.sh
./scripts/build.sh
exec ./build/bin/banger vm run --rm -- uname -a
