use std::path::Path;
use tracing_subscriber::EnvFilter;

/// Sends structured JSON logs to `log_file` (append) at `level`.
pub fn init_logging(log_file: &Path, level: &str) -> anyhow::Result<()> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)?;
    let filter = EnvFilter::try_new(format!("{level},hyper=warn,tungstenite=warn"))?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::sync::Mutex::new(file))
        .with_current_span(false)
        .init();
    Ok(())
}
