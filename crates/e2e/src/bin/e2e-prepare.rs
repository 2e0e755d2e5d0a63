//! Prepares the shared e2e installation of `BANGER_E2E_ROOT` (network
//! namespace, default image, no leftover VMs) and stops its daemon, so that
//! `scripts/test.sh` can build images while the tests still compile.
//! `--kvm-host` also builds the image of the nested-KVM tests' outer guest.

fn main() {
    let b = banger_e2e::shared();
    if std::env::args().any(|a| a == "--kvm-host") {
        banger_e2e::kvm_host::build_outer_image(b);
    }
    println!("e2e installation ready: {}", b.root.display());
}
