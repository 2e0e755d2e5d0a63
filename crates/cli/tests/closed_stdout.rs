//! `banger ... | head`: a reader that has gone is not an error worth a
//! panic message.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_ends_quietly_with_the_sigpipe_status() {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
    // The reader is gone before banger writes anything.
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_banger"))
        .arg("version")
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .expect("run banger version");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
}
