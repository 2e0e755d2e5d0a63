//! Talking to the registry: references, the client (HTTPS, plain HTTP only
//! for loopback registries), manifests and indexes.

use crate::OciError;
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use std::sync::Once;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

/// Parses `registry/repo:tag` or `registry/repo@sha256:<hex>` (Docker Hub
/// when the registry is left out, `latest` when the tag is).
pub fn parse_reference(s: &str) -> Result<Reference, OciError> {
    let bad = |reason: String| OciError::BadReference {
        reference: s.to_string(),
        reason,
    };
    if s.trim() != s || s.is_empty() {
        return Err(bad(
            "give registry/repository:tag or @sha256:<digest>".into()
        ));
    }
    let r: Reference = s.parse().map_err(|e| bad(format!("{e}")))?;
    if let Some(d) = r.digest() {
        check_digest(d).map_err(|_| bad(format!("{d} is not sha256:<64 hex digits>")))?;
    }
    Ok(r)
}

/// `sha256:<64 lowercase hex>` -> the hex part.
pub(crate) fn check_digest(d: &str) -> Result<&str, OciError> {
    match d.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(OciError::BadDigest(d.to_string())),
    }
}

/// Whether `registry` (`host[:port]`) is on the loopback interface, where
/// plain HTTP is accepted as Docker does for its insecure default.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A client for the reference's registry.
pub(crate) fn client(reference: &Reference) -> Client {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        // Another part of the process may have installed one already: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let registry = reference.resolve_registry().to_string();
    let protocol = if is_loopback(&registry) {
        oci_client::client::ClientProtocol::HttpsExcept(vec![registry])
    } else {
        oci_client::client::ClientProtocol::Https
    };
    Client::new(oci_client::client::ClientConfig {
        protocol,
        platform_resolver: None,
        connect_timeout: Some(std::time::Duration::from_secs(30)),
        read_timeout: Some(std::time::Duration::from_secs(120)),
        ..Default::default()
    })
}

/// Maps a client error to ours, making authentication failures explicit.
pub(crate) fn registry_error(reference: &Reference, e: OciDistributionError) -> OciError {
    let unauthorized = |detail: String| OciError::Unauthorized {
        registry: reference.resolve_registry().to_string(),
        reference: reference.whole(),
        detail,
    };
    match &e {
        OciDistributionError::UnauthorizedError { url } => {
            unauthorized(format!("401 Unauthorized for {url}"))
        }
        OciDistributionError::AuthenticationFailure(m) => {
            unauthorized(format!("authentication failed: {}", m.trim()))
        }
        OciDistributionError::ServerError { code: 401, url, .. } => {
            unauthorized(format!("401 Unauthorized for {url}"))
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|er| {
                matches!(
                    er.code,
                    oci_client::errors::OciErrorCode::Unauthorized
                        | oci_client::errors::OciErrorCode::Denied
                )
            }) =>
        {
            unauthorized(e.to_string())
        }
        _ => OciError::Registry {
            reference: reference.whole(),
            source: e,
        },
    }
}

/// A blob a manifest points at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion", default)]
    schema_version: i64,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// What a manifest document is.
#[derive(Debug)]
pub(crate) enum Parsed {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Parses a manifest or index, refusing media types banger cannot import.
pub(crate) fn parse_manifest(
    reference: &str,
    digest: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Parsed, OciError> {
    let unknown =
        |what: &'static str, digest: &str, media_type: String| OciError::UnknownMediaType {
            reference: reference.to_string(),
            what,
            digest: digest.to_string(),
            media_type,
        };
    let m: RawManifest = serde_json::from_slice(body).map_err(|e| OciError::BadReference {
        reference: reference.to_string(),
        reason: format!("manifest {digest} is not valid JSON: {e}"),
    })?;
    let media_type = m
        .media_type
        .clone()
        .or_else(|| content_type.map(String::from))
        .unwrap_or_else(|| {
            if m.manifests.is_some() {
                OCI_INDEX.into()
            } else {
                OCI_MANIFEST.into()
            }
        });
    if m.schema_version != 2 {
        return Err(unknown(
            "manifest",
            digest,
            format!("{media_type} (schemaVersion {})", m.schema_version),
        ));
    }
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => Ok(Parsed::Index(m.manifests.unwrap_or_default())),
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = m.config.ok_or_else(|| OciError::BadReference {
                reference: reference.to_string(),
                reason: format!("manifest {digest} has no config"),
            })?;
            if !CONFIG_TYPES.contains(&config.media_type.as_str()) {
                return Err(unknown("config", &config.digest, config.media_type));
            }
            let layers = m.layers.unwrap_or_default();
            for l in &layers {
                if !LAYER_TYPES.contains(&l.media_type.as_str()) {
                    return Err(unknown("layer", &l.digest, l.media_type.clone()));
                }
            }
            Ok(Parsed::Image { config, layers })
        }
        _ => Err(unknown("manifest", digest, media_type)),
    }
}

/// The image a reference resolves to on linux/amd64.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// Digest of the image manifest (not of the index).
    pub digest: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// Fetches the manifest of `reference`, following an index to its
/// linux/amd64 entry.
pub(crate) async fn resolve(
    client: &Client,
    reference: &Reference,
    auth: &RegistryAuth,
) -> Result<Resolved, OciError> {
    const ACCEPT: &[&str] = &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];
    let whole = reference.whole();
    let (body, digest) = client
        .pull_manifest_raw(reference, auth, ACCEPT)
        .await
        .map_err(|e| registry_error(reference, e))?;
    let (digest, config, layers) = match parse_manifest(&whole, &digest, None, &body)? {
        Parsed::Image { config, layers } => (digest, config, layers),
        Parsed::Index(entries) => {
            let chosen = entries.iter().find(|e| {
                e.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            });
            let Some(chosen) = chosen else {
                let available = entries
                    .iter()
                    .filter_map(|e| e.platform.as_ref())
                    .map(|p| format!("{}/{}", p.os, p.architecture))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(OciError::NoPlatform {
                    reference: whole,
                    available,
                });
            };
            check_digest(&chosen.digest)?;
            let by_digest = reference.clone_with_digest(chosen.digest.clone());
            let (body, digest) = client
                .pull_manifest_raw(&by_digest, auth, ACCEPT)
                .await
                .map_err(|e| registry_error(reference, e))?;
            match parse_manifest(&whole, &digest, None, &body)? {
                Parsed::Image { config, layers } => (digest, config, layers),
                Parsed::Index(_) => {
                    return Err(OciError::UnknownMediaType {
                        reference: whole,
                        what: "manifest",
                        digest,
                        media_type: "an index inside an index".into(),
                    });
                }
            }
        }
    };
    check_digest(&config.digest)?;
    for l in &layers {
        check_digest(&l.digest)?;
    }
    Ok(Resolved {
        digest,
        config,
        layers,
    })
}

/// The part of an image config banger reads.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = parse_reference("127.0.0.1:5000/test/img:v1").expect("ref");
        assert_eq!(
            (r.resolve_registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "test/img", Some("v1"))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse_reference(&format!("localhost:5000/img@{d}")).expect("digest");
        assert_eq!(r.digest(), Some(d.as_str()));
        let r = parse_reference("alpine").expect("hub");
        assert_eq!(r.resolve_registry(), "index.docker.io");
        assert_eq!(r.repository(), "library/alpine");
        for bad in ["", " alpine", "Upper/Case:x", "img@sha256:abc"] {
            assert!(parse_reference(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn loopback_registries() {
        for r in [
            "localhost:5000",
            "127.0.0.1:80",
            "127.1.2.3",
            "[::1]:5000",
            "LOCALHOST",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "docker.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[::2]:1",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn manifests_of_unknown_media_types_are_refused() {
        let d = format!("sha256:{}", "b".repeat(64));
        let m = |mt: &str, layer: &str| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{mt}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":2}},"layers":[{{"mediaType":"{layer}","digest":"{d}","size":3}}]}}"#
            )
        };
        let ok = m(OCI_MANIFEST, "application/vnd.oci.image.layer.v1.tar+zstd");
        assert!(matches!(
            parse_manifest("r", &d, None, ok.as_bytes()),
            Ok(Parsed::Image { .. })
        ));
        let docker = m(
            DOCKER_MANIFEST,
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        );
        assert!(parse_manifest("r", &d, None, docker.as_bytes()).is_ok());
        for (doc, what) in [
            (m("application/vnd.example.thing+json", "x"), "manifest"),
            (
                m(
                    OCI_MANIFEST,
                    "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                ),
                "layer",
            ),
            (
                m(
                    DOCKER_MANIFEST,
                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                ),
                "layer",
            ),
            (
                r#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#.to_string(),
                "manifest",
            ),
        ] {
            let err = parse_manifest("r", &d, None, doc.as_bytes()).expect_err(&doc);
            assert!(
                matches!(&err, OciError::UnknownMediaType { what: w, .. } if *w == what),
                "{err}"
            );
            assert!(err.to_string().contains("cannot import"), "{err}");
        }
    }
}
