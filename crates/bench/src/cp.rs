//! The `cp` block of `banger bench`: `vm cp`'s tar stream through the
//! daemon and the guest agent against `ssh VM cat` over the guest's sshd,
//! both ways, on the same file and the same running VM.

use super::util::{exec_text, ms, run_ssh, xorshift};
use anyhow::Context;
use banger_api::Client;
use banger_api::files::{GetFilesStart, PutFilesStart};
use banger_client::files::{download, upload};
use banger_client::ssh::{key_and_known_hosts, ssh_args};
use banger_model::VmRecord;
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

/// One file copied into the VM and back, by banger and by `ssh cat`.
#[derive(Debug, Serialize)]
pub struct CpBench {
    pub bytes: u64,
    pub banger_push_ms: f64,
    pub banger_push_mb_per_s: f64,
    /// `ssh VM 'cat > FILE' < FILE`, connection set-up included.
    pub ssh_cat_push_ms: f64,
    pub ssh_cat_push_mb_per_s: f64,
    /// banger's rate over ssh's: above 1.0 banger is faster.
    pub push_speedup_banger_over_ssh: f64,
    pub banger_pull_ms: f64,
    pub banger_pull_mb_per_s: f64,
    /// `ssh VM cat FILE > FILE`.
    pub ssh_cat_pull_ms: f64,
    pub ssh_cat_pull_mb_per_s: f64,
    pub pull_speedup_banger_over_ssh: f64,
}

const GUEST_DIR: &str = "/root";
const BANGER_NAME: &str = "bench-cp-banger.bin";
const SSH_NAME: &str = "bench-cp-ssh.bin";

/// Copies `bytes` of incompressible data into `vm` (which must be running
/// with its sshd up) and back, each way once through banger and once
/// through `ssh cat`; checks every copy's size.
pub async fn cp_bench(client: &Client, vm: &VmRecord, bytes: u64) -> anyhow::Result<CpBench> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let src = dir.path().join("payload.bin");
    let src2 = src.clone();
    tokio::task::spawn_blocking(move || write_noise(&src2, bytes)).await??;
    let name = vm.name.as_str();
    let (key, known_hosts) = key_and_known_hosts()?;
    let ssh = |cmd: &str| ssh_args(vm, &key, &known_hosts, &[cmd.to_string()]);

    let plan = banger_transfer::plan_path(&src, BANGER_NAME)?;
    let t = Instant::now();
    let put = PutFilesStart {
        dest: GUEST_DIR.into(),
        replace: false,
    };
    upload(client, name, plan, None, put, &mut |_| {}).await?;
    let banger_push = t.elapsed();
    guest_size_is(client, name, BANGER_NAME, bytes).await?;

    let args = ssh(&format!("cat > {GUEST_DIR}/{SSH_NAME}"))?;
    let input = std::fs::File::open(&src).context("payload")?;
    let t = Instant::now();
    run_ssh(&args, Stdio::from(input), Stdio::null()).await?;
    let ssh_push = t.elapsed();
    guest_size_is(client, name, SSH_NAME, bytes).await?;

    let t = Instant::now();
    let get = GetFilesStart {
        path: format!("{GUEST_DIR}/{BANGER_NAME}"),
        name: "pulled-banger.bin".into(),
    };
    download(client, name, get, dir.path().to_path_buf(), &mut |_| {}).await?;
    let banger_pull = t.elapsed();
    host_size_is(&dir.path().join("pulled-banger.bin"), bytes)?;

    let pulled = dir.path().join("pulled-ssh.bin");
    let out = std::fs::File::create(&pulled).context("pull target")?;
    let args = ssh(&format!("cat {GUEST_DIR}/{SSH_NAME}"))?;
    let t = Instant::now();
    run_ssh(&args, Stdio::null(), Stdio::from(out)).await?;
    let ssh_pull = t.elapsed();
    host_size_is(&pulled, bytes)?;

    let rate = |d: std::time::Duration| bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9);
    Ok(CpBench {
        bytes,
        banger_push_ms: ms(banger_push),
        banger_push_mb_per_s: rate(banger_push),
        ssh_cat_push_ms: ms(ssh_push),
        ssh_cat_push_mb_per_s: rate(ssh_push),
        push_speedup_banger_over_ssh: rate(banger_push) / rate(ssh_push),
        banger_pull_ms: ms(banger_pull),
        banger_pull_mb_per_s: rate(banger_pull),
        ssh_cat_pull_ms: ms(ssh_pull),
        ssh_cat_pull_mb_per_s: rate(ssh_pull),
        pull_speedup_banger_over_ssh: rate(banger_pull) / rate(ssh_pull),
    })
}

async fn guest_size_is(client: &Client, vm: &str, name: &str, bytes: u64) -> anyhow::Result<()> {
    let path = format!("{GUEST_DIR}/{name}");
    let (out, code) = exec_text(client, vm, &["stat", "-c", "%s", &path]).await?;
    anyhow::ensure!(
        code == 0 && out.trim() == bytes.to_string(),
        "{vm}:{path} has {} bytes, {bytes} were copied (stat exited {code})",
        out.trim()
    );
    Ok(())
}

fn host_size_is(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let got = std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .len();
    anyhow::ensure!(
        got == bytes,
        "{} has {got} bytes, {bytes} were copied",
        path.display()
    );
    Ok(())
}

/// Writes `bytes` of xorshift output: neither side may gain from
/// compression or sparse files.
fn write_noise(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).context("payload")?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = bytes;
    let mut block = vec![0u8; 1 << 16];
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            xorshift(&mut x);
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn noise_has_the_size_asked_and_does_not_repeat_blocks() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("n");
        super::write_noise(&p, 200_003).expect("test setup");
        let data = std::fs::read(&p).expect("test setup");
        assert_eq!(data.len(), 200_003);
        assert_ne!(data[..65536], data[65536..131072]);
    }
}
