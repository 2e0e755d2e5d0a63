#!/usr/bin/env bash
# The whole test suite: host packages, lint, unit tests, and end-to-end tests
# that boot real guests under QEMU (TCG when KVM is not usable).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-host.sh --test-tools
export PROFILE=dev
./scripts/build.sh
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace --exclude banger-e2e
BANGER_BIN_DIR="$PWD/build/bin" cargo test --locked -p banger-e2e -- --test-threads=1
