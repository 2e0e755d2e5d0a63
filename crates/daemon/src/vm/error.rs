//! The errors of reaching a VM: resolving its ref ([`LookupError`]) and
//! its agent, and what the agent answers ([`AgentError`]). Each says its [`ErrorKind`]; the messages
//! are the API's and the CLI's, word for word.

use crate::ErrorKind;
use crate::error::{Chain, store_kind};
use banger_agent_proto::client::ClientError;
use banger_model::{VmName, VmState};
use banger_store::StoreError;

/// Resolving a VM ref (name, id or id prefix) to a record.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No VM matches; the store's message says what was looked for.
    #[error("{0}")]
    NotFound(String),
    /// An id prefix matches more than one VM.
    #[error("VM ref '{reference}' is ambiguous: it matches {}; use the name or a longer id prefix", .matches.join(", "))]
    Ambiguous {
        reference: String,
        matches: Vec<String>,
    },
    /// The store failed.
    #[error("{}", Chain(.0))]
    Store(#[source] StoreError),
}

impl LookupError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LookupError::NotFound(_) => ErrorKind::NotFound,
            LookupError::Ambiguous { .. } => ErrorKind::Invalid,
            LookupError::Store(e) => store_kind(e),
        }
    }
}

impl From<StoreError> for LookupError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => LookupError::NotFound(m),
            StoreError::Ambiguous { reference, matches } => {
                LookupError::Ambiguous { reference, matches }
            }
            other => LookupError::Store(other),
        }
    }
}

/// Reaching the agent of a VM that should be running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// The VM is not running.
    #[error("VM {name} is {state}, not running: start it first")]
    NotRunning { name: VmName, state: VmState },
    /// The VM runs but its agent is not (or no longer) connected.
    #[error("VM {name} has no agent connection (it may be shutting down)")]
    NotConnected { name: VmName },
    /// The agent has no such session.
    #[error("{0}")]
    NoSession(String),
    /// The agent refused the request: the caller's doing (a name in use,
    /// a bad command).
    #[error("{0}")]
    Refused(String),
    /// The connection to the agent failed during the call: a conflict
    /// with the VM's state (it may be stopping).
    #[error("{0}")]
    Lost(ClientError),
}

impl AgentError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Lookup(e) => e.kind(),
            AgentError::NotRunning { .. }
            | AgentError::NotConnected { .. }
            | AgentError::Lost(_) => ErrorKind::Conflict,
            AgentError::NoSession(_) => ErrorKind::NotFound,
            AgentError::Refused(_) => ErrorKind::Invalid,
        }
    }
}

impl From<ClientError> for AgentError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Refused(m) if m.starts_with("no session named") => {
                AgentError::NoSession(m)
            }
            ClientError::Refused(m) => AgentError::Refused(m),
            other => AgentError::Lost(other),
        }
    }
}

impl From<StoreError> for AgentError {
    fn from(e: StoreError) -> Self {
        AgentError::Lookup(e.into())
    }
}

/// Why a VM was not deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// Stopping its VMM or removing its directory failed.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
}

impl DeleteError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeleteError::Lookup(e) => e.kind(),
            DeleteError::Failed(_) => ErrorKind::Failed,
            DeleteError::Store(e) => store_kind(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> VmName {
        VmName::parse("calm-otter").expect("name")
    }

    #[test]
    fn lookup_errors_keep_the_store_messages() {
        let s = StoreError::Ambiguous {
            reference: "ab".into(),
            matches: vec!["a1".into(), "b2".into()],
        };
        let want = s.to_string();
        let e = LookupError::from(s);
        assert_eq!(e.to_string(), want);
        assert_eq!(
            want,
            "VM ref 'ab' is ambiguous: it matches a1, b2; use the name or a longer id prefix"
        );
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let e = LookupError::from(StoreError::NotFound("no VM named x".into()));
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::NotFound, "no VM named x")
        );
        let e = LookupError::from(StoreError::Corrupt("vm row".into()));
        assert_eq!(e.kind(), ErrorKind::Failed);
        assert_eq!(e.to_string(), "corrupt record: vm row");
    }

    #[test]
    fn agent_errors_are_conflicts_with_todays_text() {
        let e = AgentError::NotRunning {
            name: name(),
            state: VmState::Stopped,
        };
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "VM calm-otter is stopped, not running: start it first"
        );
        let e = AgentError::NotConnected { name: name() };
        assert_eq!(
            e.to_string(),
            "VM calm-otter has no agent connection (it may be shutting down)"
        );
        let e = AgentError::from(StoreError::NotFound("no VM named x".into()));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = AgentError::from(ClientError::Refused("no session named \"w\"".into()));
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::NotFound, "no session named \"w\"")
        );
        let e = AgentError::from(ClientError::Refused("a session named w exists".into()));
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }

    #[test]
    fn the_edge_type_keeps_kind_and_message() {
        let e = crate::DaemonError::from(AgentError::NotConnected { name: name() });
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "VM calm-otter has no agent connection (it may be shutting down)"
        );
    }
}
