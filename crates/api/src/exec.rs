//! Exec over a WebSocket at `GET /v1/vms/{vm}/exec`.
//!
//! Client → daemon: first a text message holding [`ExecStart`]; then binary
//! messages are stdin bytes and text messages are [`ExecControl`].
//! Daemon → client: binary messages whose first byte is [`STDOUT`] or
//! [`STDERR`] followed by the data; text messages are [`ExecReport`], the
//! last one being `exit` or `error`.

use crate::ApiError;
use serde::{Deserialize, Serialize};

/// Tag byte of a stdout chunk.
pub const STDOUT: u8 = 1;
/// Tag byte of a stderr chunk.
pub const STDERR: u8 = 2;

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecStart {
    /// The command and its arguments.
    #[schema(min_items = 1)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    pub cwd: Option<String>,
    /// Forward stdin (otherwise the process reads /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size; output then comes as stdout only.
    #[serde(default)]
    pub tty: Option<TermSize>,
}

/// An environment variable of a guest process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

impl EnvVar {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        EnvVar {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TermSize {
    #[serde(deserialize_with = "crate::rules::integer")]
    #[schema(schema_with = crate::rules::schema::term_cells)]
    pub rows: u16,
    #[serde(deserialize_with = "crate::rules::integer")]
    #[schema(schema_with = crate::rules::schema::term_cells)]
    pub cols: u16,
}

/// Control messages from the client once the process runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecControl {
    StdinEof,
    Signal(i32),
    /// The client's terminal changed size (tty execs).
    Resize(TermSize),
}

/// How the guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExecExit {
    /// The status a shell would report: the code, or 128 + signal; 255
    /// for numbers no process ends with (they come from the guest).
    pub fn shell_code(&self) -> i32 {
        banger_agent_proto::ExitStatus {
            code: self.code,
            signal: self.signal,
        }
        .shell_code()
    }
}

/// Text reports from the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecReport {
    Exit(ExecExit),
    Error(ApiError),
}

/// What the client reads from an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExecExit),
    Error(ApiError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_exit_is_reported_as_a_failure() {
        let exit = |code, signal| ExecExit { code, signal }.shell_code();
        assert_eq!(exit(None, Some(15)), 143);
        assert_eq!(exit(None, Some(i32::MAX)), 255);
        assert_eq!(exit(None, Some(-128)), 255);
        assert_eq!(exit(Some(-1), None), 255);
        assert_eq!(exit(Some(256), None), 255);
    }
}
