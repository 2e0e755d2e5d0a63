//! Registry credentials: given directly or read from the Docker config file
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
//!
//! Only the file's `auths` section is read (`auth` = base64 `user:pass`, or
//! `username`/`password`, or `registrytoken` for a bearer token). Credential
//! helpers (`credsStore`, `credHelpers`) are programs banger does not run; a
//! registry they cover is pulled anonymously and the pull's notes say so.

use crate::OciError;
use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How to authenticate to the registry.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credentials (public images; bearer tokens are still fetched anonymously).
    Anonymous,
    /// Look the registry up in the Docker config file at [`docker_config_path`].
    #[default]
    DockerConfig,
    /// Look the registry up in this Docker config file.
    DockerConfigFile(PathBuf),
    /// Basic credentials (also used to fetch a bearer token when the
    /// registry asks for one).
    Basic { username: String, password: String },
    /// A ready bearer token.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => write!(f, "Anonymous"),
            Credentials::DockerConfig => write!(f, "DockerConfig"),
            Credentials::DockerConfigFile(p) => f.debug_tuple("DockerConfigFile").field(p).finish(),
            Credentials::Basic { username, .. } => {
                f.debug_struct("Basic").field("username", username).finish()
            }
            Credentials::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// The Docker config file: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// What the Docker config says for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfigAuth {
    /// Credentials found, or anonymous.
    pub auth: RegistryAuth,
    /// Why credentials that are there were not used, for the pull's notes.
    pub note: Option<String>,
}

/// The host part of an `auths` key: `https://index.docker.io/v1/` ->
/// `index.docker.io`, `localhost:5000` -> `localhost:5000`.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// Names Docker Hub is known by in config files.
fn same_registry(a: &str, b: &str) -> bool {
    const HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];
    a.eq_ignore_ascii_case(b) || (HUB.contains(&a) && HUB.contains(&b))
}

impl DockerConfigAuth {
    /// Reads `path` (a missing file means anonymous) for `registry`
    /// (`host[:port]`, as in the reference).
    pub fn read(path: &Path, registry: &str) -> Result<DockerConfigAuth, OciError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfigAuth {
                    auth: RegistryAuth::Anonymous,
                    note: None,
                });
            }
            Err(e) => {
                return Err(OciError::DockerConfig {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        Self::parse(&text, registry).map_err(|reason| OciError::DockerConfig {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn parse(text: &str, registry: &str) -> Result<DockerConfigAuth, String> {
        let file: DockerConfigFile =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let entry = file
            .auths
            .iter()
            .find(|(k, _)| same_registry(key_host(k), registry));
        let helper = file
            .cred_helpers
            .iter()
            .find(|(k, _)| same_registry(key_host(k), registry))
            .map(|(_, h)| h.clone())
            .or(file.creds_store.clone());
        let anonymous = |note: Option<String>| DockerConfigAuth {
            auth: RegistryAuth::Anonymous,
            note,
        };
        let Some((key, e)) = entry else {
            return Ok(anonymous(helper.map(|h| {
                format!(
                    "credentials for {registry} are kept by the credential helper \
                     docker-credential-{h}, which banger does not run: pulling anonymously"
                )
            })));
        };
        if let Some(token) = &e.registrytoken {
            return Ok(DockerConfigAuth {
                auth: RegistryAuth::Bearer(token.clone()),
                note: None,
            });
        }
        if let Some(auth) = e.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| format!("auths.{key}.auth is not base64"))?;
            let pair = String::from_utf8(raw)
                .map_err(|_| format!("auths.{key}.auth is not UTF-8 user:password"))?;
            let (user, pass) = pair
                .split_once(':')
                .ok_or_else(|| format!("auths.{key}.auth is not user:password"))?;
            return Ok(DockerConfigAuth {
                auth: RegistryAuth::Basic(user.to_string(), pass.to_string()),
                note: None,
            });
        }
        if let (Some(u), Some(p)) = (&e.username, &e.password) {
            return Ok(DockerConfigAuth {
                auth: RegistryAuth::Basic(u.clone(), p.clone()),
                note: None,
            });
        }
        if e.identitytoken.is_some() {
            return Ok(anonymous(Some(format!(
                "auths.{key} holds an OAuth identity token, which banger does not use: pulling anonymously"
            ))));
        }
        Ok(anonymous(helper.map(|h| {
            format!(
                "auths.{key} is empty and its credentials are kept by docker-credential-{h}, \
                 which banger does not run: pulling anonymously"
            )
        })))
    }
}

/// The credentials to use for `registry`, with a note when some were skipped.
pub(crate) fn resolve(
    creds: &Credentials,
    registry: &str,
) -> Result<(RegistryAuth, Option<String>), OciError> {
    let from_file = |path: Option<PathBuf>| -> Result<_, OciError> {
        let Some(path) = path else {
            return Ok((RegistryAuth::Anonymous, None));
        };
        let a = DockerConfigAuth::read(&path, registry)?;
        Ok((a.auth, a.note))
    };
    match creds {
        Credentials::Anonymous => Ok((RegistryAuth::Anonymous, None)),
        Credentials::DockerConfig => from_file(docker_config_path()),
        Credentials::DockerConfigFile(p) => from_file(Some(p.clone())),
        Credentials::Basic { username, password } => Ok((
            RegistryAuth::Basic(username.clone(), password.clone()),
            None,
        )),
        Credentials::Bearer(t) => Ok((RegistryAuth::Bearer(t.clone()), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn finds_basic_credentials_by_host() {
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "127.0.0.1:5000": {{"auth": "{}"}},
                "http://other:80/path": {{"username": "u", "password": "p:w"}},
                "tok.example": {{"registrytoken": "T"}}
            }}}}"#,
            b64("hub:secret"),
            b64("me:pa:ss")
        );
        let get = |r| DockerConfigAuth::parse(&text, r).expect("parse").auth;
        assert_eq!(
            get("docker.io"),
            RegistryAuth::Basic("hub".into(), "secret".into())
        );
        assert_eq!(
            get("127.0.0.1:5000"),
            RegistryAuth::Basic("me".into(), "pa:ss".into())
        );
        assert_eq!(
            get("other:80"),
            RegistryAuth::Basic("u".into(), "p:w".into())
        );
        assert_eq!(get("tok.example"), RegistryAuth::Bearer("T".into()));
        assert_eq!(get("127.0.0.1:5001"), RegistryAuth::Anonymous);
    }

    #[test]
    fn credential_helpers_are_noted_not_run() {
        let text = r#"{"auths": {"ghcr.io": {}}, "credHelpers": {"ghcr.io": "pass"}, "credsStore": "desktop"}"#;
        let a = DockerConfigAuth::parse(text, "ghcr.io").expect("parse");
        assert_eq!(a.auth, RegistryAuth::Anonymous);
        assert!(a.note.expect("note").contains("docker-credential-pass"));
        let a = DockerConfigAuth::parse(text, "quay.io").expect("parse");
        assert!(a.note.expect("note").contains("docker-credential-desktop"));
    }

    #[test]
    fn bad_files_are_errors_and_missing_files_anonymous() {
        assert!(DockerConfigAuth::parse("{", "x").is_err());
        let bad = r#"{"auths": {"x": {"auth": "%%%"}}}"#;
        assert!(
            DockerConfigAuth::parse(bad, "x")
                .expect_err("b64")
                .contains("base64")
        );
        let a = DockerConfigAuth::read(Path::new("/nonexistent/config.json"), "x").expect("read");
        assert_eq!(a.auth, RegistryAuth::Anonymous);
    }
}
