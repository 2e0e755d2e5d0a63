//! Prepares the shared e2e installation of `BANGER_E2E_ROOT` (network
//! namespace, default image, no leftover VMs) and stops its daemon, so that
//! `scripts/test.sh` can build the image while the tests still compile.

fn main() {
    banger_e2e::shared();
    println!(
        "e2e installation ready: {}",
        banger_e2e::shared().root.display()
    );
}
