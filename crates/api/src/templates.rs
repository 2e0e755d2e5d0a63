//! Wire types and client calls for warm-start templates: saved, paused
//! guests of an image that `vm run`/`vm create` restore instead of booting.

use crate::{ApiError, Client, ClientError, OperationEvent, Progress, Warning};
use banger_model::TemplateRecord;
use hyper::Method;
use serde::{Deserialize, Serialize};

/// Route paths of this module.
pub mod routes {
    pub const IMAGE_TEMPLATES: &str = "/v1/images/{image}/templates";
}

/// `POST /v1/images/{image}/templates`: make (or remake) the template of
/// one shape. Absent values are the effective `vm_defaults`, the shape a
/// plain `vm run` gets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmImageRequest {
    #[serde(default, deserialize_with = "crate::rules::integer_opt")]
    #[schema(schema_with = crate::rules::schema::vcpu_opt)]
    pub vcpu: Option<u32>,
    #[serde(default, deserialize_with = "crate::rules::integer_opt")]
    #[schema(schema_with = crate::rules::schema::memory_mib_opt)]
    pub memory_mib: Option<u64>,
}

/// One line of the `POST /v1/images/{image}/templates` response stream.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WarmImageEvent {
    Progress(Progress),
    Warning(Warning),
    Done(TemplateRecord),
    Error(ApiError),
}

impl OperationEvent for WarmImageEvent {
    type Output = TemplateRecord;
    fn outcome(&self) -> Option<Result<TemplateRecord, ApiError>> {
        match self {
            Self::Done(v) => Some(Ok(v.clone())),
            Self::Error(e) => Some(Err(e.clone())),
            Self::Progress(_) | Self::Warning(_) => None,
        }
    }
}

impl Client {
    /// The templates of an image.
    pub async fn list_templates(&self, image: &str) -> Result<Vec<TemplateRecord>, ClientError> {
        self.json(
            Method::GET,
            &crate::paths::fill(routes::IMAGE_TEMPLATES, image),
            None::<&()>,
        )
        .await
    }

    /// Makes the template of one shape of an image, replacing a stale one.
    pub async fn warm_image(
        &self,
        image: &str,
        req: &WarmImageRequest,
        on_event: impl FnMut(&WarmImageEvent),
    ) -> Result<TemplateRecord, ClientError> {
        self.operation(
            &crate::paths::fill(routes::IMAGE_TEMPLATES, image),
            req,
            on_event,
        )
        .await
    }

    /// Deletes every template of an image; answers with those removed.
    pub async fn drop_templates(&self, image: &str) -> Result<Vec<TemplateRecord>, ClientError> {
        self.json(
            Method::DELETE,
            &crate::paths::fill(routes::IMAGE_TEMPLATES, image),
            None::<&()>,
        )
        .await
    }
}
