//! Finding the host tools banger runs.

use crate::Ext4Error;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// The e2fsprogs tool `name`, or [`Ext4Error::ToolMissing`].
pub fn tool(name: &'static str) -> Result<PathBuf, Ext4Error> {
    find_tool(name).ok_or(Ext4Error::ToolMissing { tool: name })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tools_on_path_only_when_executable() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("banger-no-such-tool").is_none());
    }

    #[test]
    fn a_missing_tool_says_which_package_to_install() {
        let e = tool("banger-no-such-tool").expect_err("missing");
        assert!(matches!(
            e,
            Ext4Error::ToolMissing {
                tool: "banger-no-such-tool"
            }
        ));
        assert_eq!(
            e.to_string(),
            "banger-no-such-tool not found: install e2fsprogs (apt-get install e2fsprogs)"
        );
    }
}
