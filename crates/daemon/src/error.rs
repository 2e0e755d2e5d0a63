//! The daemon's errors: what kind of failure each is ([`ErrorKind`]), and
//! the edge type the front ends take ([`DaemonError`]). Operations return
//! their own typed enums (e.g. `vm::LookupError`); each has a `kind()` and
//! converts into [`DaemonError`] by `From`. Only the HTTP front end
//! (`http::error`) turns a kind into a status and an API `code`.

use crate::images::{
    BuildError, BundleError, DeleteImageError, DeleteKernelError, DeriveError, EnsureError,
    Missing, NameError, PullError, RegisterError,
};
use crate::net::NetError;
use crate::sessions::SessionError;
use crate::vm::{
    AgentError, BootError, BootInfoError, CreateError, DeleteError, KillError, LogsError,
    LookupError, ResourceError, RestartError, SetError, StartError, StopError, WaitError,
};
use crate::warm::TemplateError;
use banger_store::StoreError;

/// What went wrong, as the caller needs to know it: whether to fix the
/// request, wait for or change the object's state, or report a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such object.
    NotFound,
    /// The object's state forbids the operation.
    Conflict,
    /// The request is wrong whatever the state.
    Invalid,
    /// The daemon or the host failed.
    Failed,
}

/// A failed daemon operation: the union the front ends take, classified
/// by [`DaemonError::kind`].
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A request the HTTP front end refuses by its own checks (a session
    /// name, an empty command, an attach socket path too long).
    #[error("{0}")]
    Invalid(String),
    /// The HTTP front end's own failures (an attach socket bridge).
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    /// A store call of a plain read (list or get a record).
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error(transparent)]
    Restart(#[from] RestartError),
    #[error(transparent)]
    Kill(#[from] KillError),
    #[error(transparent)]
    Set(#[from] SetError),
    #[error(transparent)]
    Resources(#[from] ResourceError),
    #[error(transparent)]
    Create(#[from] CreateError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Wait(#[from] WaitError),
    #[error(transparent)]
    BootInfo(#[from] BootInfoError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error(transparent)]
    DeleteImage(#[from] DeleteImageError),
    #[error(transparent)]
    DeleteKernel(#[from] DeleteKernelError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    DeleteVm(#[from] DeleteError),
    #[error(transparent)]
    Missing(#[from] Missing),
    #[error(transparent)]
    ImageName(#[from] NameError),
    #[error(transparent)]
    Image(#[from] EnsureError),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Derive(#[from] DeriveError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Logs(#[from] LogsError),
}

impl DaemonError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DaemonError::Invalid(_) => ErrorKind::Invalid,
            DaemonError::Failed(_) => ErrorKind::Failed,
            DaemonError::Store(e) => store_kind(e),
            DaemonError::Lookup(e) => e.kind(),
            DaemonError::Agent(e) => e.kind(),
            DaemonError::Start(e) => e.kind(),
            DaemonError::Stop(e) => e.kind(),
            DaemonError::Restart(e) => e.kind(),
            DaemonError::Kill(e) => e.kind(),
            DaemonError::Set(e) => e.kind(),
            DaemonError::Resources(e) => e.kind(),
            DaemonError::Create(e) => e.kind(),
            DaemonError::Boot(e) => e.kind(),
            DaemonError::Wait(e) => e.kind(),
            DaemonError::BootInfo(e) => e.kind(),
            DaemonError::Template(e) => e.kind(),
            DaemonError::Register(e) => e.kind(),
            DaemonError::DeleteImage(e) => e.kind(),
            DaemonError::DeleteKernel(e) => e.kind(),
            DaemonError::Net(e) => e.kind(),
            DaemonError::DeleteVm(e) => e.kind(),
            DaemonError::Missing(e) => e.kind(),
            DaemonError::ImageName(e) => e.kind(),
            DaemonError::Image(e) => e.kind(),
            DaemonError::Pull(e) => e.kind(),
            DaemonError::Bundle(e) => e.kind(),
            DaemonError::Build(e) => e.kind(),
            DaemonError::Derive(e) => e.kind(),
            DaemonError::Session(e) => e.kind(),
            DaemonError::Logs(e) => e.kind(),
        }
    }
}

/// No VMM backend on this host; the message says what to install. A
/// failure: the daemon cannot boot anything.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoBackend(pub(crate) String);

/// The kind of a store error: a missing record, an ambiguous VM ref (a
/// request to fix) and a taken name are the caller's; the rest fail.
pub(crate) fn store_kind(e: &StoreError) -> ErrorKind {
    match e {
        StoreError::NotFound(_) => ErrorKind::NotFound,
        StoreError::Ambiguous { .. } => ErrorKind::Invalid,
        StoreError::NameTaken(_) => ErrorKind::Conflict,
        _ => ErrorKind::Failed,
    }
}

/// Shows an error with its causes, `outer: cause: cause`, as anyhow's
/// `{:#}` does: the message a failed store call has always had.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_keeps_its_message_and_gets_its_kind() {
        let e = DaemonError::from(StoreError::NameTaken("calm-otter".into()));
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "a VM named calm-otter already exists: pick another name or delete that VM"
        );
        let e = DaemonError::from(StoreError::Ambiguous {
            reference: "ab".into(),
            matches: vec!["a".into(), "b".into()],
        });
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }

    #[test]
    fn chain_shows_causes_as_anyhow_does() {
        let io = std::io::Error::other("disk full");
        let e = StoreError::CreateDir {
            path: "/x".into(),
            source: io,
        };
        let want = format!(
            "{:#}",
            anyhow::Error::from(StoreError::CreateDir {
                path: "/x".into(),
                source: std::io::Error::other("disk full"),
            })
        );
        assert_eq!(Chain(&e).to_string(), want);
        assert_eq!(want, "creating /x: disk full");
    }
}
