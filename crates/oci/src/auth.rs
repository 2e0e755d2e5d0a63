//! Registry credentials: given directly or read from the Docker config file
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), as Docker
//! reads it: a registry's `credHelpers` entry names the credential helper
//! that holds its credentials; else its `auths` entry holds them inline
//! (`auth` = base64 `user:pass`, or `username`/`password`, or
//! `registrytoken` for a bearer token); else `credsStore` names the helper
//! for every registry. Helpers are the `docker-credential-<name>` programs
//! on `PATH`, run through the `docker_credential` crate (`get`, the
//! registry's address on stdin, JSON `{Username, Secret}` on stdout). A
//! helper that has nothing for the registry means an anonymous pull; one
//! that fails or is missing is an error naming it.

use crate::OciError;
use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a credential helper may take (a keychain may ask its user).
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Credentials found inline, or anonymous.
    pub auth: RegistryAuth,
    /// Why credentials that are there were not used, for the pull's notes.
    pub note: Option<String>,
    /// The credential helper that holds the registry's credentials, when
    /// the file names one for it (then `auth` is not used).
    pub helper: Option<HelperRef>,
}

/// A credential helper to ask for one registry's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperRef {
    /// `<name>` of `docker-credential-<name>`.
    pub name: String,
    /// The address the helper is asked about: the `credHelpers` key, the
    /// registry's host, or Docker Hub's `https://index.docker.io/v1/`.
    pub server: String,
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
                    helper: None,
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
        let found = |auth: RegistryAuth| DockerConfigAuth {
            auth,
            note: None,
            helper: None,
        };
        let anonymous = |note: Option<String>| DockerConfigAuth {
            auth: RegistryAuth::Anonymous,
            note,
            helper: None,
        };
        let with_helper = |name: &str, server: String| DockerConfigAuth {
            auth: RegistryAuth::Anonymous,
            note: None,
            helper: Some(HelperRef {
                name: name.to_string(),
                server,
            }),
        };
        // Docker's address for a registry: Docker Hub's is a URL.
        let address = if same_registry(registry, "docker.io") {
            "https://index.docker.io/v1/".to_string()
        } else {
            registry.to_string()
        };
        // 1. The registry's own helper.
        if let Some((key, name)) = file
            .cred_helpers
            .iter()
            .find(|(k, h)| !h.is_empty() && same_registry(key_host(k), registry))
        {
            return Ok(with_helper(name, key.clone()));
        }
        // 2. Inline credentials.
        let entry = file
            .auths
            .iter()
            .find(|(k, _)| same_registry(key_host(k), registry));
        if let Some((key, e)) = entry {
            if let Some(token) = &e.registrytoken {
                return Ok(found(RegistryAuth::Bearer(token.clone())));
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
                return Ok(found(RegistryAuth::Basic(
                    user.to_string(),
                    pass.to_string(),
                )));
            }
            if let (Some(u), Some(p)) = (&e.username, &e.password) {
                return Ok(found(RegistryAuth::Basic(u.clone(), p.clone())));
            }
            if e.identitytoken.is_some() && file.creds_store.is_none() {
                return Ok(anonymous(Some(format!(
                    "auths.{key} holds an OAuth identity token, which banger does not use: pulling anonymously"
                ))));
            }
        }
        // 3. The store for every registry.
        match file.creds_store.as_deref().filter(|s| !s.is_empty()) {
            Some(store) => Ok(with_helper(store, address)),
            None => Ok(anonymous(None)),
        }
    }
}

/// Asks credential helper `h` for its credentials (blocking: runs the
/// helper). `Ok(None)` when it has none for that address.
fn ask_helper(h: &HelperRef, registry: &str) -> Result<Option<RegistryAuth>, OciError> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    // The crate speaks the helper protocol; give it a config that sends
    // this address to this helper.
    let config = serde_json::json!({ "credHelpers": { &h.server: &h.name } }).to_string();
    let failed = |reason: String| OciError::CredentialHelper {
        helper: format!("docker-credential-{}", h.name),
        registry: registry.to_string(),
        reason,
    };
    match docker_credential::get_credential_from_reader(config.as_bytes(), &h.server) {
        Ok(DockerCredential::UsernamePassword(user, secret)) => {
            Ok(Some(RegistryAuth::Basic(user, secret)))
        }
        Ok(DockerCredential::IdentityToken(_)) => Err(failed(
            "it answered with an OAuth identity token, which banger does not use".into(),
        )),
        Err(E::HelperFailure { stdout, stderr, .. }) => {
            let said = format!("{} {}", stdout.trim(), stderr.trim());
            // docker-credential-helpers' "credentials not found in native keychain".
            if said.to_ascii_lowercase().contains("credentials not found") {
                return Ok(None);
            }
            let said = said.trim();
            Err(failed(if said.is_empty() {
                "it exited with an error".into()
            } else {
                format!(
                    "it exited with an error: {}",
                    said.lines().next().unwrap_or(said)
                )
            }))
        }
        Err(E::HelperCommunicationError) => Err(failed(
            "it could not be run: is it installed and on PATH?".into(),
        )),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// The credentials to use for `registry`, with a note when some were
/// skipped. Runs the credential helper the Docker config names for it, if
/// any (at most [`HELPER_TIMEOUT`]).
pub(crate) async fn resolve(
    creds: &Credentials,
    registry: &str,
) -> Result<(RegistryAuth, Option<String>), OciError> {
    let path = match creds {
        Credentials::Anonymous => return Ok((RegistryAuth::Anonymous, None)),
        Credentials::Basic { username, password } => {
            return Ok((
                RegistryAuth::Basic(username.clone(), password.clone()),
                None,
            ));
        }
        Credentials::Bearer(t) => return Ok((RegistryAuth::Bearer(t.clone()), None)),
        Credentials::DockerConfig => docker_config_path(),
        Credentials::DockerConfigFile(p) => Some(p.clone()),
    };
    let Some(path) = path else {
        return Ok((RegistryAuth::Anonymous, None));
    };
    let a = DockerConfigAuth::read(&path, registry)?;
    let Some(helper) = a.helper else {
        return Ok((a.auth, a.note));
    };
    let name = format!("docker-credential-{}", helper.name);
    let (h, r) = (helper.clone(), registry.to_string());
    let asked = tokio::time::timeout(
        HELPER_TIMEOUT,
        tokio::task::spawn_blocking(move || ask_helper(&h, &r)),
    )
    .await
    .map_err(|_| OciError::CredentialHelper {
        helper: name.clone(),
        registry: registry.to_string(),
        reason: format!("it did not answer within {}s", HELPER_TIMEOUT.as_secs()),
    })?
    .map_err(|e| OciError::CredentialHelper {
        helper: name.clone(),
        registry: registry.to_string(),
        reason: e.to_string(),
    })??;
    Ok(match asked {
        Some(auth) => (auth, None),
        None => (
            RegistryAuth::Anonymous,
            Some(format!(
                "{name} has no credentials for {}: pulling anonymously",
                helper.server
            )),
        ),
    })
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
    fn credential_helpers_are_chosen_as_docker_does() {
        let text = format!(
            r#"{{"auths": {{"ghcr.io": {{}}, "127.0.0.1:5000": {{"auth": "{}"}}}},
                "credHelpers": {{"ghcr.io": "pass", "https://gcr.io": "gcloud"}},
                "credsStore": "desktop"}}"#,
            b64("me:pw")
        );
        let helper = |r: &str| DockerConfigAuth::parse(&text, r).expect("parse").helper;
        // The registry's own helper, under its key.
        assert_eq!(
            helper("ghcr.io"),
            Some(HelperRef {
                name: "pass".into(),
                server: "ghcr.io".into()
            })
        );
        assert_eq!(
            helper("gcr.io"),
            Some(HelperRef {
                name: "gcloud".into(),
                server: "https://gcr.io".into()
            })
        );
        // Inline credentials before the store.
        let a = DockerConfigAuth::parse(&text, "127.0.0.1:5000").expect("parse");
        assert_eq!(a.helper, None);
        assert_eq!(a.auth, RegistryAuth::Basic("me".into(), "pw".into()));
        // The store for the rest; Docker Hub by its URL.
        assert_eq!(
            helper("quay.io"),
            Some(HelperRef {
                name: "desktop".into(),
                server: "quay.io".into()
            })
        );
        assert_eq!(
            helper("docker.io").map(|h| h.server),
            Some("https://index.docker.io/v1/".to_string())
        );
        // No helper and no entry: anonymous, nothing to say.
        let a = DockerConfigAuth::parse(r#"{"auths": {}}"#, "quay.io").expect("parse");
        assert_eq!(
            (a.auth, a.note, a.helper),
            (RegistryAuth::Anonymous, None, None)
        );
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
