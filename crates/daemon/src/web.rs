//! Starts the web UI (`banger-web`) over this daemon's own API router.

use crate::Daemon;

/// Serves the web UI on `web_listen_addr` until the daemon shuts down. A
/// failure to listen is logged, not fatal: the API socket is what `banger`
/// needs, and `banger doctor` reports a web UI that does not answer.
pub(crate) async fn start(daemon: &Daemon, api: axum::Router) {
    let Some(addr) = daemon.config.web_listen_addr else {
        tracing::info!("web UI disabled (web_listen_addr = \"\")");
        return;
    };
    if !banger_web::is_loopback(&addr) {
        tracing::warn!(
            %addr,
            "the web UI listens on a non-loopback address, as web_listen_addr asks; it \
             serves only this user's connections from this machine, so other machines \
             get 403 (use ssh -L instead)"
        );
    }
    let shutdown = daemon.shutdown.clone();
    match banger_web::start(addr, api, nix::unistd::geteuid().as_raw(), async move {
        shutdown.cancelled().await
    })
    .await
    {
        Ok(bound) => tracing::info!(url = %format!("http://{bound}/"), "web UI listening"),
        Err(e) => tracing::warn!(error = %e, "web UI not started"),
    }
}
