//! Helpers shared by the bench commands (`bench`, `bench run`, the cp
//! block), in a module of their own so that those do not import each other.

use anyhow::Context;
use banger_api::exec::{ExecOutput, ExecStart};
use std::process::Stdio;

/// A duration in milliseconds, as the reports give them.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `argv` to its end; returns its stdout as text and its exit code.
pub(crate) async fn exec_text(
    client: &banger_api::Client,
    vm: &str,
    argv: &[&str],
) -> anyhow::Result<(String, i32)> {
    let mut out = Vec::new();
    let code = exec_with(client, vm, argv, |d| out.extend_from_slice(d)).await?;
    Ok((String::from_utf8_lossy(&out).into_owned(), code))
}

/// Runs the system `ssh` with `args` to completion; a failure carries its
/// stderr.
pub async fn run_ssh(
    args: &[std::ffi::OsString],
    stdin: Stdio,
    stdout: Stdio,
) -> anyhow::Result<()> {
    // Not `output()`: tokio's would replace `stdout` with a pipe.
    let out = tokio::process::Command::new("ssh")
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .context("running ssh (apt-get install openssh-client)")?
        .wait_with_output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "ssh exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// One step of Marsaglia's xorshift64: cheap bytes no compressor shrinks.
pub(crate) fn xorshift(x: &mut u64) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
}

/// Runs `argv` to its end, handing its stdout to `on_stdout`; returns the
/// exit code.
pub(crate) async fn exec_with(
    client: &banger_api::Client,
    vm: &str,
    argv: &[&str],
    mut on_stdout: impl FnMut(&[u8]),
) -> anyhow::Result<i32> {
    let start = ExecStart {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let (_, mut reader) = client.exec(vm, &start).await?;
    loop {
        match reader.next().await? {
            Some(ExecOutput::Stdout(d)) => on_stdout(&d),
            Some(ExecOutput::Stderr(_)) => {}
            Some(ExecOutput::Exit(e)) => return Ok(e.shell_code()),
            Some(ExecOutput::Error(e)) => anyhow::bail!("{}", e.message),
            None => anyhow::bail!("exec ended without status"),
        }
    }
}

/// Prints a report as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
