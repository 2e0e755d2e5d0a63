//! How `vm list`, `vm show` and `vm stats` print.

use super::ports;
use crate::output;
use banger_model::{ByteSize, VmRecord};

pub(crate) fn print_vm_table(vms: &[VmRecord]) {
    let mut rows = vec![
        [
            "NAME", "ID", "STATE", "IMAGE", "VCPU", "MEMORY", "DISK", "CREATED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in vms {
        rows.push(vec![
            v.name.to_string(),
            v.id.short().to_string(),
            v.state.to_string(),
            v.image.clone(),
            v.spec.vcpu.value.to_string(),
            ByteSize::mib(v.spec.memory_mib.value).to_string(),
            ByteSize(v.spec.disk_bytes.value).to_string(),
            v.created_at.clone(),
        ]);
    }
    output::table(&rows);
}

pub(crate) fn print_vm(v: &VmRecord) {
    let rows = vec![
        vec!["name".into(), v.name.to_string()],
        vec!["id".into(), v.id.to_string()],
        vec!["state".into(), v.state.to_string()],
        vec!["image".into(), v.image.clone()],
        vec!["backend".into(), v.backend.to_string()],
        vec![
            "spec".into(),
            v.spec.summary().trim_start_matches("spec: ").to_string(),
        ],
        vec![
            "pid".into(),
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        ],
        vec!["dir".into(), v.dir.display().to_string()],
        vec!["initramfs".into(), v.initramfs.to_string()],
        vec!["start".into(), v.start.to_string()],
        vec!["created".into(), v.created_at.clone()],
    ];
    let rows = [rows, ports::network_rows(v)].concat();
    output::table(&rows);
    if let Some(e) = &v.last_error {
        // It can quote the guest's console and agent.
        println!("error    {}", output::printable_lines(e));
    }
}

/// `banger initramfs, kernel ran /init at 1.84 s, agent ready at 2.10 s
/// (1.14x); system running`.
pub(crate) fn boot_line(b: &banger_api::VmBoot) -> String {
    let secs = |ms: u64| format!("{:.2} s", ms as f64 / 1000.0);
    let mut parts = vec![format!(
        "{} initramfs",
        b.initramfs.as_deref().unwrap_or("unknown")
    )];
    if let Some(k) = b.kernel_init_ms {
        parts.push(format!("kernel ran its first process at {}", secs(k)));
    }
    if let Some(r) = b.agent_ready_ms {
        let ratio = b
            .ready_over_kernel_init
            .map(|x| format!(" ({x:.2}x)"))
            .unwrap_or_default();
        parts.push(format!("agent ready at {}{ratio}", secs(r)));
    }
    if let Some(t) = b.tap {
        let how = if t.from_pool {
            "from the pool"
        } else {
            "created"
        };
        parts.push(format!("TAP {how} in {:.2} ms", t.took_us as f64 / 1000.0));
    }
    format!(
        "{}; system {}",
        output::printable(&parts.join(", ")),
        output::printable(&b.system)
    )
}

pub(crate) fn print_disks(disks: &[banger_api::DiskStats]) {
    for d in disks {
        println!(
            "disk     {:<8} {} virtual, {} on host{}  {}",
            d.role,
            ByteSize(d.virtual_bytes).human(),
            ByteSize(d.allocated_bytes).human(),
            if d.shared { " (shared)" } else { "" },
            d.path
        );
    }
    let own: u64 = disks
        .iter()
        .filter(|d| !d.shared)
        .map(|d| d.allocated_bytes)
        .sum();
    println!("disk use {} on host for this VM", ByteSize(own).human());
}

pub(crate) fn print_stats(s: &banger_api::VmStats) {
    println!(
        "{} ({}): {} vcpu, {} memory",
        s.name,
        s.state,
        s.vcpu,
        ByteSize::mib(s.memory_mib)
    );
    match &s.vmm {
        Some(p) => println!(
            "vmm      pid {}, cpu {:.1}s ({:.1}% avg over {:.0}s), rss {}",
            p.pid,
            p.cpu_seconds,
            p.cpu_percent,
            p.uptime_seconds,
            ByteSize(p.rss_bytes).human()
        ),
        None => println!("vmm      not running"),
    }
    if let Some(g) = &s.guest {
        println!(
            "guest    memory {} of {} available, load {:.2}",
            ByteSize(g.mem_available_bytes).human(),
            ByteSize(g.mem_total_bytes).human(),
            g.load1
        );
        println!(
            "guest    / {} of {} used, /root {} of {} used",
            ByteSize(g.root_used_bytes).human(),
            ByteSize(g.root_total_bytes).human(),
            ByteSize(g.work_used_bytes).human(),
            ByteSize(g.work_total_bytes).human()
        );
    }
    print_disks(&s.disks);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_line_says_how_the_tap_was_got() {
        let mut b = banger_api::VmBoot {
            name: "calm-otter".into(),
            initramfs: Some("banger".into()),
            kernel_init_ms: Some(1840),
            agent_ready_ms: Some(2100),
            ready_over_kernel_init: Some(1.14),
            agent_start: "initramfs".into(),
            system: "running".into(),
            booting: false,
            tap: Some(banger_api::TapAcquisition {
                from_pool: true,
                took_us: 25,
            }),
        };
        assert_eq!(
            boot_line(&b),
            "banger initramfs, kernel ran its first process at 1.84 s, agent ready at 2.10 s (1.14x), TAP from the pool in 0.03 ms; system running"
        );
        b.tap = Some(banger_api::TapAcquisition {
            from_pool: false,
            took_us: 12_345,
        });
        assert!(
            boot_line(&b).contains("TAP created in 12.35 ms"),
            "{}",
            boot_line(&b)
        );
        b.tap = None;
        assert!(!boot_line(&b).contains("TAP"), "{}", boot_line(&b));
    }
}
