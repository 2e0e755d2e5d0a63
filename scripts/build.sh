#!/usr/bin/env bash
# Builds banger, bangerd and the static guest agent into build/bin/.
#   scripts/build.sh            release build
#   PROFILE=dev scripts/build.sh  debug build (what the tests use)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${PROFILE:-release}
target=${CARGO_TARGET_DIR:-target}
case "$profile" in
  release) dir=release ;;
  dev) dir=debug ;;
  *) echo "build.sh: PROFILE must be release or dev" >&2; exit 2 ;;
esac

cargo build --profile "$profile" --locked -p banger-cli -p banger-daemon

# The agent runs inside guests of any libc: link it fully static. A separate
# target dir keeps these RUSTFLAGS from invalidating the main build. It is
# always optimised (the `agent` profile: release with full LTO): under TCG
# every guest instruction is emulated, so a debug agent would slow every
# exec down.
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target/agent-static" \
  cargo build --profile agent --locked -p banger-agent --target x86_64-unknown-linux-gnu

mkdir -p build/bin
install -m 0755 "$target/$dir/banger" "$target/$dir/bangerd" build/bin/
install -m 0755 "$target"/agent-static/x86_64-unknown-linux-gnu/agent/banger-agent build/bin/
echo "built: $(ls build/bin | tr '\n' ' ')(profile $profile)"
