#!/usr/bin/env bash
# The whole test suite: host packages, lint, unit tests, and end-to-end tests
# that boot real guests under QEMU (TCG when KVM is not usable), and, inside
# one such guest with nested KVM, under the real Firecracker and QEMU-KVM.
#
# Everything is compiled once, up front, and every cargo command below selects
# the whole workspace, so they all share one feature set and nothing is built
# twice. The end-to-end files (`test = false` in crates/e2e/Cargo.toml: run
# only when named) then run in two lanes at once (each guest has one vCPU, the
# machine two cores), each lane with its own e2e root, daemon and network
# namespace, while the unit tests run beside them. Lane A's default image is
# built while the rest compiles; lanes B and C register that image instead
# of building their own. Lane C is the nested-KVM lane: one outer guest (its
# image is also built while the rest compiles) in which Firecracker and
# QEMU-KVM boot the default image.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-host.sh --test-tools
export PROFILE=dev
# One build from a clean clone: incremental compilation's caches would only
# double the target folder (several GiB) on a disk CI shares.
export CARGO_INCREMENTAL=0
./scripts/build.sh
export BANGER_BIN_DIR="$PWD/build/bin"
E2E="${BANGER_E2E_ROOT:-/tmp/banger-e2e}"
LANE_A=(derived bench exec image_pull cli tui web api run_modes)
LANE_B=(vm_run system network workspace boot warm)
LANE_C=(kvm)
for f in crates/e2e/tests/*.rs; do
    t=$(basename "$f" .rs)
    if [[ " ${LANE_A[*]} ${LANE_B[*]} ${LANE_C[*]} " != *" $t "* ]]; then
        echo "test.sh: crates/e2e/tests/$t.rs is in no lane" >&2
        exit 1
    fi
done

# A failure anywhere stops whatever still runs in the background.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

# Lane A's installation and its default image (mmdebstrap: mostly the
# mirror and dpkg), then lane C's with the outer guest's image, are made
# while the lint and the tests compile.
cargo build --locked -p banger-e2e --bin e2e-prepare
prepare_bin="${CARGO_TARGET_DIR:-target}/debug/e2e-prepare"
(
    set -o pipefail
    BANGER_E2E_ROOT="$E2E-a" "$prepare_bin" 2>&1 | sed -u "s/^/[prepare] /"
    BANGER_E2E_ROOT="$E2E-c" BANGER_E2E_IMAGE_FROM="$E2E-a" "$prepare_bin" --kvm-host 2>&1 |
        sed -u "s/^/[prepare] /"
) &
prepare=$!

cargo fmt --all --check
# `--all-targets` leaves out `test = false` targets: the end-to-end files
# are linted and built by name (`--test '*'`; combined with `--tests` that
# selection is lost too).
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --workspace --test '*' -- -D warnings
cargo test --locked --workspace --no-run
cargo test --locked --workspace --no-run --test '*'
wait "$prepare"

# e2e LABEL ROOT FILE...: runs those test files against ROOT, prefixing
# output; every file runs even after one failed, so a run shows them all.
e2e() {
    local label=$1 root=$2
    shift 2
    local tests=()
    for t in "$@"; do tests+=(--test "$t"); done
    (
        set -o pipefail
        BANGER_E2E_ROOT="$root" cargo test --locked --workspace --no-fail-fast "${tests[@]}" \
            -- --test-threads=1 2>&1 | sed -u "s/^/[$label] /"
    )
}

e2e e2e-a "$E2E-a" "${LANE_A[@]}" &
lane_a=$!
BANGER_E2E_IMAGE_FROM="$E2E-a" e2e e2e-b "$E2E-b" "${LANE_B[@]}" &
lane_b=$!
BANGER_E2E_IMAGE_FROM="$E2E-a" e2e e2e-c "$E2E-c" "${LANE_C[@]}" &
lane_c=$!
# The unit and integration tests run beside the lanes: mostly I/O and
# short bursts, while the lanes mostly wait on their guests.
status=0
cargo test --locked --workspace || status=$?
wait "$lane_a" || status=$?
wait "$lane_b" || status=$?
wait "$lane_c" || status=$?
exit "$status"
