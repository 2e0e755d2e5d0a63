//! Helpers shared by the real-build tests. They run mmdebstrap against the
//! Debian mirror and need root, as the build itself does.

use banger_image::DebianBuild;
use std::path::{Path, PathBuf};

/// A unit shaped like the agent's: enabled from sysinit.target.
pub const UNIT: &str = "\
[Unit]
Description=banger guest agent (test stand-in)
DefaultDependencies=no
Before=sysinit.target

[Service]
ExecStart=/usr/local/bin/banger-agent

[Install]
WantedBy=sysinit.target
";

pub const MODULES: &str = "virtio_console\nvsock\nvmw_vsock_virtio_transport\n";

/// A build spec inside `root`, with a copy of /bin/true as the agent.
pub fn spec(root: &Path, name: &str) -> DebianBuild {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the real image build tests need root, as the build does"
    );
    let agent = root.join("agent");
    std::fs::copy("/bin/true", &agent).expect("agent stand-in");
    DebianBuild {
        name: name.into(),
        suite: "bookworm".into(),
        mirror: None,
        extra_packages: vec![],
        payload: banger_image::customize::GuestPayload {
            agent_binary: agent,
            agent_unit: UNIT.into(),
            agent_modules_conf: MODULES.into(),
        },
        images_dir: root.join("images"),
        kernels_dir: root.join("kernels"),
    }
}

/// Names in `dir` (sorted); empty if it does not exist.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Processes whose root or working directory is under `dir` (a chroot the
/// build ran).
pub fn processes_inside(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for what in ["root", "cwd"] {
            if let Ok(p) = std::fs::read_link(e.path().join(what))
                && p.starts_with(dir)
            {
                found.push((pid.clone(), p));
            }
        }
    }
    found
}
