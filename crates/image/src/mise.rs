//! mise (the polyglot tool manager) in images: the pinned npm tarball
//! ([`MISE_URL`], checked against [`MISE_SHA512`]) downloaded by the host
//! and installed into an image tree at `/usr/local/bin/mise`, activated for
//! root's bash shells. The default image gets it at build time; derived
//! images get the same tarball streamed in over the agent.

use crate::ImageError;
use crate::customize::{rel, write_file};
use crate::derive::{MISE_SHA512, MISE_URL};
use std::io::Read;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where mise goes in an image.
pub const MISE_PATH: &str = "/usr/local/bin/mise";

/// `/etc/profile.d/mise.sh`: mise for bash login shells.
pub const MISE_PROFILE: &str = r#"# Installed by banger: mise for bash login shells.
if [ -n "${BASH_VERSION:-}" ] && [ -z "${MISE_SHELL:-}" ] && [ -x /usr/local/bin/mise ]; then
  eval "$(/usr/local/bin/mise activate bash)"
fi
"#;

/// The line added to root's `.bashrc`: mise for interactive shells too.
pub const MISE_BASHRC_LINE: &str = r#"[ -z "${MISE_SHELL:-}" ] && [ -x /usr/local/bin/mise ] && eval "$(/usr/local/bin/mise activate bash)""#;

/// The mise binary inside the npm tarball.
const TARBALL_ENTRY: &str = "package/bin/mise";

/// Downloads `url` to `dest` and checks that its sha512 is `want` (hex).
/// A wrong digest removes `dest` and is an error.
pub async fn fetch_sha512(
    url: &str,
    want: &str,
    dest: &Path,
    cancel: &CancellationToken,
) -> Result<(), ImageError> {
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let fail = |reason: String| ImageError::Download {
        url: url.to_string(),
        reason,
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| fail(e.to_string()))?;
    let mut out = tokio::fs::File::create(dest)
        .await
        .map_err(ImageError::io(format!("creating {}", dest.display())))?;
    let mut hash = sha2::Sha512::new();
    loop {
        let chunk = tokio::select! {
            c = resp.chunk() => c.map_err(|e| fail(e.to_string()))?,
            _ = cancel.cancelled() => return Err(ImageError::Cancelled),
        };
        let Some(chunk) = chunk else { break };
        hash.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(ImageError::io(format!("writing {}", dest.display())))?;
    }
    out.flush()
        .await
        .map_err(ImageError::io(format!("writing {}", dest.display())))?;
    let got = format!("{:x}", hash.finalize());
    if got != want {
        let _ = std::fs::remove_file(dest);
        return Err(fail(format!(
            "its sha512 is {got}, not the pinned {want}: the download is corrupt or was replaced"
        )));
    }
    Ok(())
}

/// Downloads the pinned mise tarball to `dest`.
pub async fn fetch_mise(dest: &Path, cancel: &CancellationToken) -> Result<(), ImageError> {
    fetch_sha512(MISE_URL, MISE_SHA512, dest, cancel).await
}

/// Installs mise from the npm `tarball` into the image tree at `root`:
/// the binary at [`MISE_PATH`], [`MISE_PROFILE`], and [`MISE_BASHRC_LINE`]
/// in root's `.bashrc` (once). The tarball must be the checked one.
pub fn install_mise(root: &Path, tarball: &Path) -> Result<(), ImageError> {
    let f = std::fs::File::open(tarball)
        .map_err(ImageError::io(format!("opening {}", tarball.display())))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let bad = |e: std::io::Error| ImageError::Io {
        context: format!("reading {}", tarball.display()),
        source: e,
    };
    let mut binary = None;
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if entry.path().map_err(bad)?.as_ref() == Path::new(TARBALL_ENTRY) {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).map_err(bad)?;
            binary = Some(data);
            break;
        }
    }
    let binary = binary.ok_or_else(|| ImageError::Io {
        context: format!("reading {}", tarball.display()),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no {TARBALL_ENTRY} in the mise tarball"),
        ),
    })?;
    write_file(root, rel(MISE_PATH), &binary, 0o755)?;
    write_file(
        root,
        "etc/profile.d/mise.sh",
        MISE_PROFILE.as_bytes(),
        0o644,
    )?;
    let bashrc = root.join("root/.bashrc");
    let mut text = match std::fs::symlink_metadata(&bashrc) {
        Ok(m) if m.is_file() => std::fs::read_to_string(&bashrc)
            .map_err(ImageError::io(format!("reading {}", bashrc.display())))?,
        _ => String::new(),
    };
    if !text.lines().any(|l| l == MISE_BASHRC_LINE) {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(MISE_BASHRC_LINE);
        text.push('\n');
        write_file(root, "root/.bashrc", text.as_bytes(), 0o644)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An npm-style tarball holding `package/bin/mise`.
    fn tarball(dir: &Path, binary: &[u8]) -> std::path::PathBuf {
        let p = dir.join("mise.tgz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&p).expect("create"),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for (name, data) in [
            ("package/package.json", &b"{}"[..]),
            (TARBALL_ENTRY, binary),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            b.append_data(&mut h, name, data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz");
        p
    }

    #[test]
    fn installs_the_binary_and_activates_it_once() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("root")).expect("mkdir");
        std::fs::write(root.join("root/.bashrc"), "# root's bashrc").expect("bashrc");
        let tgz = tarball(t.path(), b"\x7fELF mise");
        install_mise(&root, &tgz).expect("install");
        install_mise(&root, &tgz).expect("again");
        let bin = root.join("usr/local/bin/mise");
        assert_eq!(std::fs::read(&bin).expect("bin"), b"\x7fELF mise");
        assert_eq!(
            std::fs::metadata(&bin).expect("md").permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/profile.d/mise.sh")).expect("profile"),
            MISE_PROFILE
        );
        assert_eq!(
            std::fs::read_to_string(root.join("root/.bashrc")).expect("bashrc"),
            format!("# root's bashrc\n{MISE_BASHRC_LINE}\n")
        );
    }

    #[test]
    fn a_tarball_without_mise_is_an_error() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("empty.tgz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&p).expect("create"),
            flate2::Compression::fast(),
        );
        tar::Builder::new(gz)
            .into_inner()
            .expect("tar")
            .finish()
            .expect("gz");
        let e = install_mise(t.path(), &p).expect_err("no mise");
        assert!(e.to_string().contains("reading"), "{e}");
    }

    #[test]
    fn derived_images_install_the_same_files() {
        // The guest-side script of derived images writes the same profile
        // and bashrc line.
        let script = crate::derive::mise_script();
        assert!(script.contains(MISE_PROFILE), "{script}");
        assert!(script.contains(MISE_BASHRC_LINE), "{script}");
    }
}
