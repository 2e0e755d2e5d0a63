//! Registry credentials from a Docker credential helper (`credHelpers`,
//! `credsStore`): a fake `docker-credential-*` program on `PATH` against a
//! local registry behind htpasswd basic auth. One test in this binary: it
//! sets `PATH` for the helpers before anything else runs.

mod common;

use banger_oci::{Credentials, OciError, pull_to_ext4};
use common::*;
use std::path::Path;

/// Writes `docker-credential-<name>` into `dir`: answers `get` for
/// `server` with `user`/`secret`, and "credentials not found" otherwise,
/// like docker-credential-helpers' stores do.
fn fake_helper(dir: &Path, name: &str, server: &str, user: &str, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(format!("docker-credential-{name}"));
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread server\n\
             if [ \"$server\" = '{server}' ]; then\n\
             printf '%s' '{{\"ServerURL\":\"{server}\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}'\n\
             exit 0\nfi\necho 'credentials not found in native keychain'\nexit 1\n"
        ),
    )
    .expect("write helper");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[tokio::test]
async fn pulls_with_credentials_from_a_helper() {
    if tools().is_none() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let bin = t.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    // SAFETY: the only test of this binary, before it starts any thread or
    // process that reads the environment.
    unsafe {
        std::env::set_var(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
    };

    let reg = Registry::start(Some(("banger", "s3cret")));
    let mut layout = Layout::new(&t.path().join("layout"));
    let base = tar(&[
        E::Dir("etc", 0o755, 0, 0),
        E::File("etc/os-release", b"NAME=Test\nID=testos\n", 0o644, 0, 0),
    ]);
    let m = layout.image("amd64", &[layer(GZ, base)]);
    layout.tag("v1", OCI_MANIFEST, m);
    reg.push(&layout.dir, "v1", "private/img:v1", &[]);
    let reference = format!("{}/private/img:v1", reg.host());
    let agent = t.path().join("agent");
    std::fs::write(&agent, b"#!/bin/sh\n").expect("agent");
    let cache = t.path().join("cache");
    let config = t.path().join("config.json");
    let pull = |out: &str| {
        pull_to_ext4(options(
            reference.clone(),
            &cache,
            &t.path().join("images").join(out),
            &agent,
            Credentials::DockerConfigFile(config.clone()),
        ))
    };

    fake_helper(&bin, "banger-good", &reg.host(), "banger", "s3cret");
    fake_helper(&bin, "banger-wrong", &reg.host(), "banger", "nope");
    fake_helper(&bin, "banger-other", "other.example", "x", "y");

    // The registry's own helper (credHelpers), even with a store set.
    std::fs::write(
        &config,
        format!(
            r#"{{"auths": {{"{0}": {{}}}}, "credHelpers": {{"{0}": "banger-good"}}, "credsStore": "banger-other"}}"#,
            reg.host()
        ),
    )
    .expect("config");
    let img = pull("a").await.expect("pull with credHelpers");
    assert!(fsck_clean(&img.rootfs));

    // The store for every registry (credsStore).
    std::fs::write(&config, r#"{"credsStore": "banger-good"}"#).expect("config");
    pull("b").await.expect("pull with credsStore");

    // A helper with wrong credentials: the registry says no.
    std::fs::write(&config, r#"{"credsStore": "banger-wrong"}"#).expect("config");
    let err = pull("c").await.expect_err("wrong credentials");
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");

    // A helper with nothing for this registry: anonymous, refused.
    std::fs::write(&config, r#"{"credsStore": "banger-other"}"#).expect("config");
    let err = pull("d").await.expect_err("no credentials");
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");

    // A helper that is not installed: an error naming it.
    std::fs::write(&config, r#"{"credsStore": "banger-missing"}"#).expect("config");
    let err = pull("e").await.expect_err("missing helper");
    assert!(matches!(err, OciError::CredentialHelper { .. }), "{err}");
    assert!(
        err.to_string().contains("docker-credential-banger-missing"),
        "{err}"
    );
}
