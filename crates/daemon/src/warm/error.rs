//! Why a template was not made, listed or dropped ([`TemplateError`]).

use crate::ErrorKind;
use crate::error::{Chain, NoBackend, store_kind};
use crate::images::{EnsureError, Missing, NameError};
use crate::vm::{BootError, CreateError, DeleteError, LookupError, ResourceError};
use banger_store::StoreError;

/// Why a template build (or a template list or drop) failed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The VMM cannot snapshot and restore here, for this reason.
    #[error("this host cannot make templates: {0}")]
    Unsupported(String),
    /// The client went away or the daemon is shutting down.
    #[error("{0}")]
    Cancelled(&'static str),
    /// The template's guest did not greet in time.
    #[error("the template's guest did not come up: {0}")]
    NotUp(String),
    /// The template's guest greeted but its init did not finish booting.
    #[error("the template's guest did not finish booting: {0}")]
    NotBooted(String),
    /// The transient VM's boot failed (rolled back).
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The transient VM is gone (deleted while the build held it).
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    NoBackend(#[from] NoBackend),
    /// Disks, seal, snapshot or save failed.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
    #[error("{}", Chain(.0))]
    Store(#[from] StoreError),
    /// The image is missing, or making the default image failed.
    #[error(transparent)]
    Image(#[from] EnsureError),
    /// Recording the transient VM failed.
    #[error(transparent)]
    TransientVm(#[from] CreateError),
    /// Removing a transient VM left over by an interrupted build failed.
    #[error(transparent)]
    DeleteVm(#[from] DeleteError),
    /// The shape asked for is out of bounds (checked before the build).
    #[error(transparent)]
    Resources(#[from] ResourceError),
    /// The image name breaks the name rule (checked before the build).
    #[error(transparent)]
    Name(#[from] NameError),
    /// The image is not registered (checked before the build).
    #[error(transparent)]
    Missing(#[from] Missing),
}

impl TemplateError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use TemplateError as E;
        match self {
            E::Unsupported(_) => ErrorKind::Conflict,
            E::Cancelled(_) | E::NotUp(_) | E::NotBooted(_) | E::NoBackend(_) | E::Failed(_) => {
                ErrorKind::Failed
            }
            E::Boot(e) => e.kind(),
            E::Lookup(e) => e.kind(),
            E::Store(e) => store_kind(e),
            E::Image(e) => e.kind(),
            E::TransientVm(e) => e.kind(),
            E::DeleteVm(e) => e.kind(),
            E::Resources(e) => e.kind(),
            E::Name(e) => e.kind(),
            E::Missing(e) => e.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_kinds_are_todays() {
        let e = TemplateError::Unsupported("QEMU 7 cannot restore".into());
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (
                ErrorKind::Conflict,
                "this host cannot make templates: QEMU 7 cannot restore"
            )
        );
        let e = TemplateError::NotUp("VM x's agent did not connect".into());
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (
                ErrorKind::Failed,
                "the template's guest did not come up: VM x's agent did not connect"
            )
        );
        let e = TemplateError::NotBooted("late".into());
        assert_eq!(
            e.to_string(),
            "the template's guest did not finish booting: late"
        );
        let e = TemplateError::from(anyhow::anyhow!("disk full").context("saving the template"));
        assert_eq!(e.to_string(), "saving the template: disk full");
        let e = TemplateError::from(StoreError::NotFound("image nope".into()));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        // The transient VM's own error keeps its kind and message.
        let e = TemplateError::from(CreateError::NoFreeName);
        assert_eq!(e.kind(), ErrorKind::Failed);
        assert_eq!(e.to_string(), CreateError::NoFreeName.to_string());
    }
}
