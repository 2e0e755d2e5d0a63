//! `banger daemon ...`

use crate::connect;
use crate::output;
use clap::Subcommand;
use std::time::Duration;

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Show the daemon's pid, socket, log and backend (does not start it).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Print the daemon socket path.
    Socket,
    /// Stop the daemon. Running VMs keep running.
    Stop,
}

pub async fn run(cmd: DaemonCommand) -> anyhow::Result<i32> {
    match cmd {
        DaemonCommand::Socket => {
            println!("{}", connect::socket_path()?.display());
            Ok(0)
        }
        DaemonCommand::Status { json } => {
            let Some(client) = connect::running_client().await? else {
                if json {
                    output::json(&serde_json::json!({ "running": false }))?;
                } else {
                    println!(
                        "bangerd is not running (socket {})",
                        connect::socket_path()?.display()
                    );
                }
                return Ok(3);
            };
            let info = client.info().await?;
            if json {
                output::json(&info)?;
            } else {
                output::table(&[
                    vec!["pid".into(), info.pid.to_string()],
                    vec!["socket".into(), info.socket.clone()],
                    vec!["log".into(), info.log_path.clone()],
                    vec!["state".into(), info.state_dir.clone()],
                    vec![
                        "backend".into(),
                        format!("{} ({})", info.backend, info.backend_reason),
                    ],
                    vec!["version".into(), info.build.line("bangerd")],
                ]);
            }
            Ok(0)
        }
        DaemonCommand::Stop => {
            let Some(client) = connect::running_client().await? else {
                println!("bangerd is not running");
                return Ok(0);
            };
            let pid = client.info().await?.pid;
            client.shutdown().await?;
            // The daemon holds its pid until it has released the socket.
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                if std::time::Instant::now() > deadline {
                    anyhow::bail!("bangerd (pid {pid}) did not exit within 15s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("bangerd stopped (pid {pid}); VMs keep running");
            Ok(0)
        }
    }
}
