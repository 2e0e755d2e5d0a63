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
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(0)
        }
    }
}
