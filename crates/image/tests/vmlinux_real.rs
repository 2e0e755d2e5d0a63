//! vmlinux extraction from a real kernel: the one named by
//! `BANGER_TEST_BZIMAGE`, else one in /boot, else the Debian cloud kernel
//! package fetched with apt (cached in Cargo's test temp dir). Skipped, with
//! the reason printed, when none can be had.

use banger_image::vmlinux::{self, Compression};
use std::path::{Path, PathBuf};
use std::process::Command;

fn boot_kernel() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The Debian cloud kernel, downloaded once into `cache`.
fn debian_cloud_kernel(cache: &Path) -> Result<PathBuf, String> {
    let unpacked = cache.join("linux-image-cloud");
    let find = |dir: &Path| -> Option<PathBuf> {
        std::fs::read_dir(dir.join("boot"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
    };
    if let Some(k) = find(&unpacked) {
        return Ok(k);
    }
    let run = |cmd: &mut Command| -> Result<String, String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{cmd:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The metapackage depends on the versioned image package.
    let depends = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .ok_or("linux-image-cloud-amd64 has no versioned kernel dependency")?
        .to_owned();
    let download = cache.join("deb");
    std::fs::create_dir_all(&download).map_err(|e| e.to_string())?;
    run(Command::new("apt-get")
        .args(["download", &package])
        .current_dir(&download))?;
    let deb = std::fs::read_dir(&download)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download left no .deb")?;
    let tmp = cache.join("linux-image-cloud.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    std::fs::rename(&tmp, &unpacked).map_err(|e| e.to_string())?;
    find(&unpacked).ok_or_else(|| format!("no boot/vmlinuz-* in {}", deb.display()))
}

fn real_kernel() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("BANGER_TEST_BZIMAGE") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = boot_kernel() {
        return Ok(p);
    }
    debian_cloud_kernel(Path::new(env!("CARGO_TARGET_TMPDIR")))
}

#[test]
fn extracts_a_real_kernel() {
    let kernel = match real_kernel() {
        Ok(k) => k,
        Err(why) => {
            println!("SKIPPED: no real kernel to try ({why}); set BANGER_TEST_BZIMAGE");
            return;
        }
    };
    println!("kernel: {}", kernel.display());
    let image = std::fs::read(&kernel).expect("read kernel");
    let payload = vmlinux::payload(&image).expect("payload");
    // The build appends the uncompressed size to the payload.
    let size = u32::from_le_bytes(payload[payload.len() - 4..].try_into().expect("4 bytes"));
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("vmlinux");
    let compression = vmlinux::extract_vmlinux_file(&kernel, &dest).expect("extract");
    println!("compression: {compression}");
    if kernel.to_string_lossy().contains("cloud-amd64") {
        assert_eq!(
            compression,
            Compression::Lz4,
            "Debian's cloud kernel is LZ4"
        );
    }
    let out = std::fs::read(&dest).expect("read vmlinux");
    assert_eq!(
        out.len() as u64,
        u64::from(size),
        "size recorded in the bzImage"
    );
    assert_eq!(&out[..4], b"\x7fELF");
    assert_eq!(out[4], 2, "64-bit ELF");
    assert_eq!(u16::from_le_bytes([out[18], out[19]]), 0x3e, "x86_64 ELF");
}
