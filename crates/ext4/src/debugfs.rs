//! Running `debugfs` scripts on an ext4 image: one quoting function for
//! its command parser, one reading of its stderr.
//!
//! debugfs exits 0 whatever its commands did and reports failures on
//! stderr, so callers look at [`ScriptOutput::messages`] (or read files
//! back) rather than at the exit status alone.

use crate::{CancellationToken, Ext4Error, tool};
use std::path::Path;
use std::process::{ExitStatus, Stdio};

/// `s` quoted for debugfs's command parser: double quotes keep spaces
/// together, and a `"` inside is doubled.
pub fn quote(s: &[u8]) -> Vec<u8> {
    let mut out = b"\"".to_vec();
    for &b in s {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

/// [`quote`] for text (lossless: quoting only adds ASCII `"`).
pub fn quote_str(s: &str) -> String {
    String::from_utf8_lossy(&quote(s.as_bytes())).into_owned()
}

/// What one debugfs run reported.
#[derive(Debug, Clone)]
pub struct ScriptOutput {
    pub status: ExitStatus,
    /// Its stderr lines, without its banner and blank lines: the commands'
    /// complaints, in order.
    pub messages: Vec<String>,
}

impl ScriptOutput {
    /// Every complaint, led by the exit status when debugfs itself failed.
    pub fn errors(&self) -> Vec<String> {
        let mut errors = self.messages.clone();
        if !self.status.success() {
            errors.insert(0, format!("debugfs exited with {}", self.status));
        }
        errors
    }

    /// The last complaint that is not an expected one (`mkdir` of an
    /// existing directory, `rm` of a missing file), for a message.
    pub fn last_error(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|l| !l.contains("already exists") && !l.contains("File not found"))
            .map_or("no error reported", |l| l.trim())
    }
}

/// The one reading of debugfs's stderr: every non-blank line but its
/// banner (`debugfs 1.47.0 (5-Feb-2023)`).
pub fn messages(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .map(String::from)
        .collect()
}

/// Writes `script` to `cmd_file` and runs `debugfs [-w] -f cmd_file image`
/// (`writable` for `-w`). The caller removes `cmd_file`.
pub async fn run_script(
    image: &Path,
    cmd_file: &Path,
    script: &[u8],
    writable: bool,
    cancel: &CancellationToken,
) -> Result<ScriptOutput, Ext4Error> {
    let mut cmd = tokio::process::Command::from(script_command(image, cmd_file, script, writable)?);
    let child = cmd
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Ext4Error::Io {
            context: "starting debugfs".into(),
            source,
        })?;
    let out = tokio::select! {
        out = child.wait_with_output() => out.map_err(|source| Ext4Error::Io {
            context: "waiting for debugfs".into(),
            source,
        })?,
        _ = cancel.cancelled() => return Err(Ext4Error::Cancelled { tool: "debugfs" }),
    };
    Ok(ScriptOutput {
        status: out.status,
        messages: messages(&out.stderr),
    })
}

/// [`run_script`] for callers that are not async.
pub fn run_script_blocking(
    image: &Path,
    cmd_file: &Path,
    script: &[u8],
    writable: bool,
) -> Result<ScriptOutput, Ext4Error> {
    let out = script_command(image, cmd_file, script, writable)?
        .output()
        .map_err(|source| Ext4Error::Io {
            context: "running debugfs".into(),
            source,
        })?;
    Ok(ScriptOutput {
        status: out.status,
        messages: messages(&out.stderr),
    })
}

fn script_command(
    image: &Path,
    cmd_file: &Path,
    script: &[u8],
    writable: bool,
) -> Result<std::process::Command, Ext4Error> {
    let bin = tool("debugfs")?;
    std::fs::write(cmd_file, script).map_err(|source| Ext4Error::Io {
        context: format!("writing {}", cmd_file.display()),
        source,
    })?;
    let mut cmd = std::process::Command::new(bin);
    if writable {
        cmd.arg("-w");
    }
    cmd.arg("-f")
        .arg(cmd_file)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// The content of the file at `path` (absolute, plain) in `image`, read
/// with `debugfs -R 'cat path'`; empty if it is missing.
pub async fn cat(image: &Path, path: &str) -> Result<Vec<u8>, Ext4Error> {
    let out = tokio::process::Command::new(tool("debugfs")?)
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .map_err(|source| Ext4Error::Io {
            context: "running debugfs".into(),
            source,
        })?;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quoting banger-storage had for `[[file_sync]]` paths (which
    /// reject `"`, `\` and control characters).
    fn storage_quote(s: &str) -> String {
        format!("\"{s}\"")
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote(b"/a b/q\"x"), b"\"/a b/q\"\"x\"");
        assert_eq!(quote(b"/"), b"\"/\"");
        assert_eq!(quote(b""), b"\"\"");
        assert_eq!(quote_str("/a b/q\"x"), "\"/a b/q\"\"x\"");
        assert_eq!(quote(b"\xff\""), b"\"\xff\"\"\"");
    }

    #[test]
    fn the_former_quote_functions_agree_on_what_both_accepted() {
        // The storage quoting accepted any path without `"`; the OCI one
        // any bytes. On their common inputs both must give the same text.
        let inputs = [
            "",
            "/",
            "/a",
            "/.aws/config",
            "/dir with space/f",
            "/tab\there",
            "/ünïcödé/ファイル",
            "/a'b",
            "/a$b;c|d&e",
            "/-rf",
            "/a#b",
        ];
        for s in inputs {
            assert_eq!(quote_str(s), storage_quote(s), "{s:?}");
            assert_eq!(quote(s.as_bytes()), storage_quote(s).as_bytes(), "{s:?}");
        }
        // And byte for byte over every one- and two-byte string without `"`.
        for a in 0u8..=255 {
            for b in [b'a', b' ', b'/', 0x80, 0xff, a] {
                let s = [a, b];
                if s.contains(&b'"') {
                    continue;
                }
                let mut want = vec![b'"'];
                want.extend_from_slice(&s);
                want.push(b'"');
                assert_eq!(quote(&s), want, "{s:?}");
                if let Ok(text) = std::str::from_utf8(&s) {
                    assert_eq!(quote_str(text).as_bytes(), quote(&s), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn quote_and_quote_str_agree_on_text() {
        for s in ["", "\"", "\"\"", "a\"b\"c", "/x y/\"z\"", "ü\"ü"] {
            assert_eq!(quote_str(s).as_bytes(), quote(s.as_bytes()), "{s:?}");
        }
    }

    #[test]
    fn stderr_drops_the_banner_and_blank_lines() {
        let stderr = b"debugfs 1.47.0 (5-Feb-2023)\n\nmkdir: Ext2 directory already exists\nrm: File not found by ext2_lookup while trying to resolve filename\nwrite: Could not allocate block in ext2 filesystem while writing\n  \n";
        let got = messages(stderr);
        assert_eq!(got.len(), 3, "{got:?}");
        let ok = |status| ScriptOutput {
            status,
            messages: got.clone(),
        };
        use std::os::unix::process::ExitStatusExt;
        let out = ok(ExitStatus::from_raw(0));
        assert_eq!(
            out.last_error(),
            "write: Could not allocate block in ext2 filesystem while writing"
        );
        assert_eq!(out.errors(), got);
        let failed = ok(ExitStatus::from_raw(1 << 8));
        assert_eq!(failed.errors().len(), 4);
        assert!(failed.errors()[0].starts_with("debugfs exited with"));
        let quiet = ScriptOutput {
            status: ExitStatus::from_raw(0),
            messages: messages(
                b"debugfs 1.47.0 (5-Feb-2023)\nmkdir: Ext2 directory already exists\n",
            ),
        };
        assert_eq!(quiet.last_error(), "no error reported");
    }

    #[tokio::test]
    async fn scripts_run_with_quoted_names_and_report_failures() {
        let t = tempfile::tempdir().expect("tempdir");
        let image = t.path().join("disk.ext4");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image file");
        crate::mkfs_empty(&image, "test", 0o755)
            .await
            .expect("mkfs");
        let src = t.path().join("src");
        std::fs::write(&src, "hi\n").expect("src");
        let mut script = b"mkdir ".to_vec();
        script.extend(quote(b"/a \"b\""));
        script.extend(b"\nwrite ");
        script.extend(quote(src.as_os_str().as_encoded_bytes()));
        script.push(b' ');
        script.extend(quote(b"/a \"b\"/f"));
        script.extend(b"\nset_inode_field /nope uid 5\n");
        let cancel = CancellationToken::new();
        let cmd_file = t.path().join("commands");
        let out = run_script(&image, &cmd_file, &script, true, &cancel)
            .await
            .expect("debugfs");
        assert!(out.status.success());
        assert_eq!(out.errors().len(), 1, "{:?}", out.messages);
        let back = t.path().join("back");
        let mut script = b"dump ".to_vec();
        script.extend(quote(b"/a \"b\"/f"));
        script.push(b' ');
        script.extend(quote(back.as_os_str().as_encoded_bytes()));
        script.push(b'\n');
        let dump =
            run_script_blocking(&image, &t.path().join("check"), &script, false).expect("dump");
        assert!(dump.messages.is_empty(), "{:?}", dump.messages);
        assert_eq!(std::fs::read(&back).expect("dumped"), b"hi\n");
        assert_eq!(cat(&image, "/nope").await.expect("cat"), b"");
        crate::check(&image, &|_| {}, &cancel).await.expect("clean");
    }
}
