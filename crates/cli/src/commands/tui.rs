//! `banger tui`

use crate::connect;

/// Opens the terminal dashboard against the daemon (started if needed).
pub async fn run() -> anyhow::Result<i32> {
    let client = connect::client().await?;
    banger_tui::run(client).await?;
    Ok(0)
}
