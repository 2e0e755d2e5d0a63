//! Finding the host tools banger runs.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// The first executable named `tool` in `$PATH`, then in the sbin
/// directories, which an unprivileged or non-login environment may lack
/// although e2fsprogs lives there.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
