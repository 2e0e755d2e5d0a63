//! The bare boot of `banger bench`: the VMM started directly, no daemon,
//! to time the previous boot path against banger's.

use super::util::ms;
use super::{BENCH_MEMORY_MIB, BENCH_VCPU};
use anyhow::Context;
use std::time::Instant;
pub(super) fn host_summary() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} cpus, {model}")
}

/// The backend the daemon chooses from the same config and host facts:
/// the bare boot starts that VMM directly.
pub(super) fn bare_backend() -> anyhow::Result<banger_vmm::Selection> {
    let cfg = banger_config::Config::load(&banger_config::Paths::from_env()?)?;
    let facts =
        banger_vmm::HostFacts::probe(cfg.firecracker_bin.as_deref(), cfg.qemu_bin.as_deref());
    Ok(banger_vmm::select_backend(cfg.vmm, &facts)?)
}

/// Boots the image's kernel and root file system with the VMM started
/// directly (QEMU with banger's arguments, or Firecracker with
/// `--no-api --config-file` holding banger's API bodies; no daemon, no API
/// handshake, no overlay or work disk: the image's init on its read-only
/// root) and times spawn → agent hello.
pub(super) async fn bare_boot(
    client: &banger_api::Client,
    image: Option<&str>,
    vmm: &banger_vmm::Selection,
) -> anyhow::Result<f64> {
    use banger_vmm::{BackendKind, DiskFormat, DiskSpec, LaunchSpec};
    let image = match image {
        Some(i) => i.to_string(),
        None => {
            banger_config::Config::load(&banger_client::connect::daemon_paths()?)?
                .default_image_name
        }
    };
    let img = client.get_image(&image).await?;
    let kernel = client
        .list_kernels()
        .await?
        .into_iter()
        .find(|k| k.name == img.kernel)
        .ok_or_else(|| anyhow::anyhow!("kernel {} of image {} not found", img.kernel, img.name))?;
    let tmp = tempfile::Builder::new().prefix("banger-bench-").tempdir()?;
    let kernel_file = match vmm.kind {
        BackendKind::Firecracker => kernel.vmlinux.clone().ok_or_else(|| {
            anyhow::anyhow!("kernel {} has no vmlinux for Firecracker", kernel.name)
        })?,
        BackendKind::Qemu(_) => kernel.kernel.clone(),
    };
    let spec = LaunchSpec {
        name: "bench-bare".into(),
        dir: tmp.path().to_path_buf(),
        kernel: kernel_file,
        initrd: kernel.initrd.clone(),
        extra_cmdline: format!("root={} ro", banger_agent_proto::boot::BASE_DEVICE),
        disks: vec![DiskSpec {
            path: img.rootfs.clone(),
            format: DiskFormat::Raw,
            read_only: true,
        }],
        nets: Vec::new(),
        vcpu: BENCH_VCPU,
        memory_mib: BENCH_MEMORY_MIB,
        memory_file: None,
    };
    match vmm.kind {
        BackendKind::Qemu(_) => bare_qemu(&spec).await,
        BackendKind::Firecracker => bare_firecracker(&spec, &vmm.binary).await,
    }
}

/// The guest agent's hello on `stream`, within the boot timeout.
pub(super) async fn hello(stream: tokio::net::UnixStream) -> anyhow::Result<()> {
    let agent = banger_agent_proto::client::AgentClient::spawn(stream);
    tokio::time::timeout(BOOT_TIMEOUT, agent.wait_hello())
        .await
        .context("guest agent did not come up")??;
    Ok(())
}

/// How long a bare boot may take to the agent's hello.
const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(240);

/// `err` with the end of the guest's console at `console`, which says
/// where a boot that never reached the agent stopped.
fn with_console(err: anyhow::Error, console: &std::path::Path) -> anyhow::Error {
    const LINES: usize = 15;
    let tail = banger_vmm::console::console_tail(console, LINES);
    if tail.is_empty() {
        err.context(format!(
            "the guest's console ({}) is empty or missing",
            console.display()
        ))
    } else {
        err.context(format!("the guest's console ends with:\n{tail}"))
    }
}

pub(super) async fn bare_qemu(spec: &banger_vmm::LaunchSpec) -> anyhow::Result<f64> {
    let qemu = banger_vmm::QemuVmm::from_host(None)?;
    let args = banger_vmm::qemu::qemu_args(spec, qemu.accel(), qemu.tsc_khz());
    let paths = banger_vmm::VmPaths::new(&spec.dir);
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(qemu.binary())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu")?;
    // QEMU creates the agent socket during start-up; it offers no other signal.
    let stream = loop {
        match tokio::net::UnixStream::connect(paths.agent_socket()).await {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < std::time::Duration::from_secs(30) => {
                if let Some(st) = child.try_wait()? {
                    anyhow::bail!("qemu exited early: {st}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e).context("connecting to the agent socket"),
        }
    };
    hello(stream)
        .await
        .map_err(|e| with_console(e, &paths.console_log()))?;
    let elapsed = t0.elapsed();
    let _ = child.kill().await;
    Ok(ms(elapsed))
}

pub(super) async fn bare_firecracker(
    spec: &banger_vmm::LaunchSpec,
    binary: &std::path::Path,
) -> anyhow::Result<f64> {
    let config = banger_vmm::firecracker::vm_config(spec)?;
    // Firecracker opens its log and metrics files; it does not create them.
    for f in [&config.logger.log_path, &config.metrics.metrics_path] {
        std::fs::File::create(f).with_context(|| format!("creating {}", f.display()))?;
    }
    let config_file = spec.dir.join("config.json");
    std::fs::write(&config_file, config.config_file().to_string())
        .with_context(|| format!("writing {}", config_file.display()))?;
    // The guest agent connects out through the hybrid vsock to this socket.
    let listener =
        tokio::net::UnixListener::bind(banger_vmm::firecracker::agent_listener_path(&spec.dir))
            .context("listening for the guest agent")?;
    // Without an API socket the guest's serial console is Firecracker's
    // standard output.
    let console = banger_vmm::VmPaths::new(&spec.dir).console_log();
    let console_file = std::fs::File::create(&console)
        .with_context(|| format!("creating {}", console.display()))?;
    let t0 = Instant::now();
    // Files in the VM directory are given relative to it (as for every
    // banger launch), so Firecracker must run there.
    let mut child = tokio::process::Command::new(binary)
        .current_dir(&spec.dir)
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config_file)
        .args(["--id", "bench-bare"])
        .stdin(std::process::Stdio::null())
        .stdout(console_file)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stream = tokio::select! {
        accepted = tokio::time::timeout(BOOT_TIMEOUT, listener.accept()) => {
            accepted
                .context("guest agent did not connect")
                .and_then(|a| Ok(a?.0))
                .map_err(|e| with_console(e, &console))?
        }
        // A guest that cannot boot reboots, which ends Firecracker.
        status = child.wait() => {
            return Err(with_console(anyhow::anyhow!("firecracker exited early ({})", status?), &console));
        }
    };
    hello(stream).await.map_err(|e| with_console(e, &console))?;
    let elapsed = t0.elapsed();
    let _ = child.kill().await;
    Ok(ms(elapsed))
}
