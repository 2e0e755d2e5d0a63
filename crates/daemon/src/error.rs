/// A failed daemon operation, classified by what went wrong; the HTTP front
/// end (`http::error`) decides the status and `code` it answers with.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl From<banger_store::StoreError> for DaemonError {
    fn from(e: banger_store::StoreError) -> Self {
        use banger_store::StoreError as S;
        match e {
            S::NotFound(_) => DaemonError::NotFound(e.to_string()),
            S::Ambiguous { .. } => DaemonError::Invalid(e.to_string()),
            S::NameTaken(_) => DaemonError::Conflict(e.to_string()),
            other => DaemonError::Failed(other.into()),
        }
    }
}
