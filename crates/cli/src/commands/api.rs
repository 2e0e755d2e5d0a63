//! `banger api ...`: the daemon's HTTP API itself.

use crate::connect;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ApiCommand {
    /// Print the daemon's OpenAPI document (JSON), as it serves it at
    /// /openapi.json on its socket (starts the daemon if needed).
    Openapi,
}

pub async fn run(cmd: ApiCommand) -> anyhow::Result<i32> {
    match cmd {
        ApiCommand::Openapi => {
            let doc = connect::client().await?.openapi().await?;
            let text = serde_json::to_string_pretty(&doc)? + "\n";
            // A reader that stops early (`| head`) is not an error.
            match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(0),
            }
        }
    }
}
