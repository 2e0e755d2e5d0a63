//! `/tmp` at boot, settled before the host can use the guest.
//!
//! The agent answers the host before the image's init runs (see
//! [`crate::init`]), so the host's commands run while systemd boots. Debian
//! and most systemd images clean `/tmp` at boot (`D /tmp` in
//! `tmpfiles.d/tmp.conf`, applied by `systemd-tmpfiles --boot`): left alone,
//! that would delete what a command has just written there. So early init
//! cleans `/tmp` itself, before the greeting, and shadows the rule for this
//! boot with a copy in `/run/tmpfiles.d` whose `D /tmp` is a plain `d` (make
//! it if missing, remove nothing). The image keeps its own file, and the
//! next boot cleans `/tmp` again, as the image intends.

use std::path::Path;

/// The tmpfiles.d file that holds the rule, by name, in precedence order
/// below `/run` (an `/etc` copy of the same name wins over `/run`'s, so
/// there the admin's choice stands and nothing is done).
const TMP_CONF: &str = "tmpfiles.d/tmp.conf";

/// Settles `/tmp` under `root` (the new root, with `/run` mounted): returns
/// whether the image cleans it at boot (and it was cleaned here).
pub fn settle(root: &Path) -> std::io::Result<bool> {
    if root.join("etc").join(TMP_CONF).exists() {
        return Ok(false);
    }
    let Ok(text) = std::fs::read_to_string(root.join("usr/lib").join(TMP_CONF)) else {
        return Ok(false);
    };
    let Some(shadow) = without_boot_removal(&text) else {
        return Ok(false);
    };
    let tmp = root.join("tmp");
    empty_dir(&tmp)?;
    let dir = root.join("run/tmpfiles.d");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tmp.conf"), shadow)?;
    Ok(true)
}

/// `text` with its `D /tmp` lines made `d`; `None` when it has none.
fn without_boot_removal(text: &str) -> Option<String> {
    let mut found = false;
    let mut out = String::with_capacity(text.len() + 64);
    out.push_str("# banger-agent: /tmp was cleaned before the host used the guest\n");
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() == Some("D") && fields.next() == Some("/tmp") {
            found = true;
            out.push('d');
            out.push_str(&line[1..]);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    found.then_some(out)
}

/// Removes what is in `dir`, on its file system only (a mount below it is
/// left as it is).
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => m.dev(),
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let md = std::fs::symlink_metadata(&p)?;
        if md.dev() != dev {
            continue;
        }
        if md.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tmp_rule_loses_its_removal() {
        let debian = "# comment\nD /tmp 1777 root root -\n#q /var/tmp 1777 root root 30d\n";
        let out = without_boot_removal(debian).expect("has D /tmp");
        assert!(out.contains("\nd /tmp 1777 root root -\n"), "{out}");
        assert!(out.contains("#q /var/tmp 1777 root root 30d"), "{out}");
        assert!(!out.contains("D /tmp"), "{out}");
        assert_eq!(without_boot_removal("d /tmp 1777 root root -\n"), None);
        assert_eq!(without_boot_removal("D /tmpx 1777 root root -\n"), None);
    }

    #[test]
    fn cleans_tmp_and_shadows_the_rule_for_this_boot() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path();
        for d in ["usr/lib/tmpfiles.d", "tmp/sub", "run"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::write(
            root.join("usr/lib/tmpfiles.d/tmp.conf"),
            "D /tmp 1777 root root -\n",
        )
        .expect("w");
        std::fs::write(root.join("tmp/old"), "x").expect("w");
        std::fs::write(root.join("tmp/sub/f"), "x").expect("w");
        assert!(settle(root).expect("settle"));
        assert_eq!(std::fs::read_dir(root.join("tmp")).expect("ls").count(), 0);
        let shadow = std::fs::read_to_string(root.join("run/tmpfiles.d/tmp.conf")).expect("r");
        assert!(shadow.contains("d /tmp 1777 root root -"), "{shadow}");

        // An admin's /etc copy stands: nothing is touched.
        std::fs::create_dir_all(root.join("etc/tmpfiles.d")).expect("mkdir");
        std::fs::write(root.join("etc/tmpfiles.d/tmp.conf"), "").expect("w");
        std::fs::write(root.join("tmp/kept"), "x").expect("w");
        assert!(!settle(root).expect("settle"));
        assert!(root.join("tmp/kept").exists());
    }

    #[test]
    fn an_image_without_the_rule_is_left_alone() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(t.path().join("tmp")).expect("mkdir");
        std::fs::write(t.path().join("tmp/kept"), "x").expect("w");
        assert!(!settle(t.path()).expect("settle"));
        assert!(t.path().join("tmp/kept").exists());
    }
}
