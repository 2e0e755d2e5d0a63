use banger_api::ApiError;

/// A failed daemon operation, classified for the API.
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

impl DaemonError {
    pub fn code(&self) -> &'static str {
        match self {
            DaemonError::NotFound(_) => "not_found",
            DaemonError::Conflict(_) => "conflict",
            DaemonError::Invalid(_) => "invalid",
            DaemonError::Failed(_) => "failed",
        }
    }

    pub fn to_api(&self) -> ApiError {
        ApiError {
            code: self.code().to_string(),
            message: self.to_string(),
        }
    }
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
