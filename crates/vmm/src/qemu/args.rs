//! QEMU's command line for one VM.

use super::{AGENT_PORT_NAME, Accel};
use crate::{DiskFormat, LaunchSpec, NetBackend, VmPaths};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// What QEMU is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgsMode<'a> {
    /// Boot the guest.
    Boot,
    /// Wait paused for a device-state stream (`-S -incoming defer`), with
    /// guest memory mapped privately from a snapshot's memory file: opened
    /// read-only, faulted in lazily, the guest's writes its own.
    Incoming { memory: &'a Path },
}

/// The memory backend id the machine's RAM comes from, when not anonymous.
pub(super) const RAM_ID: &str = "ram";

/// The kernel command line: console on the ISA serial port, reboot (= QEMU
/// exit, with `-no-reboot`) on panic, then the caller's arguments (root and
/// init), which win where they repeat a parameter.
pub fn kernel_cmdline(accel: Accel, tsc_khz: Option<u64>, extra: &str) -> String {
    let mut cmdline = String::from("console=ttyS0 panic=-1");
    // Under TCG microvm has no HPET, no PM timer and no port 0x61: when the
    // guest's PIT calibration fails it hangs for good. Telling it the TSC
    // frequency skips calibration. Under KVM kvmclock supplies the
    // frequency, and a host `cpu MHz` skewed by frequency scaling would
    // only make it worse.
    if let (Accel::Tcg, Some(khz)) = (accel, tsc_khz) {
        cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    cmdline
}

/// Doubles commas, QEMU's escape inside `key=value,...` option lists.
fn opt_value(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// `prefix` followed by an escaped value.
pub(super) fn opt(prefix: &str, value: &OsStr) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(opt_value(value));
    s
}

/// The full QEMU argument vector for one VM. The VM directory appears
/// verbatim (in `-pidfile`), which is how [`vmm_process_alive`] recognises
/// the process.
pub fn qemu_args(spec: &LaunchSpec, accel: Accel, tsc_khz: Option<u64>) -> Vec<OsString> {
    qemu_args_for(spec, accel, tsc_khz, ArgsMode::Boot)
}

/// [`qemu_args`] for `mode`. An incoming QEMU gets exactly the boot
/// arguments plus `-S -incoming defer`: restore needs the same machine,
/// devices in the same order, the same RAM size and ROM blobs.
pub fn qemu_args_for(
    spec: &LaunchSpec,
    accel: Accel,
    tsc_khz: Option<u64>,
    mode: ArgsMode<'_>,
) -> Vec<OsString> {
    let paths = VmPaths::new(&spec.dir);
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&OsStr]| args.extend(items.iter().map(|s| s.to_os_string()));
    let os = |s: &str| OsString::from(s);

    push(&[
        &os("-name"),
        &opt("guest=", OsStr::new(&spec.name)),
        &os("-M"),
        &os("microvm,x-option-roms=off,acpi=on,isa-serial=on"),
        &os("-accel"),
        &os(accel.as_str()),
        &os("-cpu"),
        &os(match accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }),
        // Without qboot QEMU falls back to SeaBIOS, which wants a boot disk.
        // A bare name is searched in QEMU's data directories.
        &os("-bios"),
        &os("qboot.rom"),
        &os("-nodefaults"),
        &os("-no-user-config"),
        &os("-no-reboot"),
        &os("-display"),
        &os("none"),
        &os("-m"),
        &os(&format!("{}M", spec.memory_mib)),
    ]);
    // A file-backed RAM block (named, shared on the template's side) is
    // what `x-ignore-shared` leaves out of the migration stream: a
    // snapshot saves no RAM, a restore loads none.
    let ram = match (mode, &spec.memory_file) {
        (ArgsMode::Incoming { memory }, _) => Some((memory, "share=off,readonly=on,rom=off")),
        (ArgsMode::Boot, Some(file)) => Some((file.as_path(), "share=on")),
        (ArgsMode::Boot, None) => None,
    };
    if let Some((file, how)) = ram {
        let mut object = OsString::from(format!(
            "memory-backend-file,id={RAM_ID},size={}M,{how},mem-path=",
            spec.memory_mib
        ));
        object.push(opt_value(file.as_os_str()));
        push(&[
            &os("-object"),
            &object,
            &os("-machine"),
            &os(&format!("memory-backend={RAM_ID}")),
        ]);
    }
    push(&[
        &os("-smp"),
        &os(&spec.vcpu.to_string()),
        &os("-pidfile"),
        paths.pid_file().as_os_str(),
        &os("-kernel"),
        spec.kernel.as_os_str(),
    ]);
    if let Some(initrd) = &spec.initrd {
        push(&[&os("-initrd"), initrd.as_os_str()]);
    }
    push(&[
        &os("-append"),
        &os(&kernel_cmdline(accel, tsc_khz, &spec.extra_cmdline)),
    ]);

    // Serial console into a file, emptied at each launch (by `launch`) and
    // appended to, so the daemon can rotate it (`logcap`).
    push(&[
        &os("-chardev"),
        &opt(
            "file,id=console,append=on,path=",
            paths.console_log().as_os_str(),
        ),
        &os("-serial"),
        &os("chardev:console"),
    ]);

    // Disks first, so they take the first virtio-mmio slots.
    for (i, disk) in spec.disks.iter().enumerate() {
        let mut drive = opt(
            &format!(
                "if=none,id=disk{i},format={},file.driver=file,file.filename=",
                match disk.format {
                    DiskFormat::Raw => "raw",
                    DiskFormat::Qcow2 => "qcow2",
                }
            ),
            disk.path.as_os_str(),
        );
        // `file.driver=file` stops QEMU from reading a `proto:` prefix out of
        // the path. Writable disks pass discards through so a sparse overlay
        // shrinks when the guest trims.
        drive.push(if disk.read_only {
            ",readonly=on,cache=writeback"
        } else {
            ",readonly=off,cache=writeback,discard=unmap"
        });
        push(&[
            &os("-drive"),
            &drive,
            &os("-device"),
            &os(&format!("virtio-blk-device,drive=disk{i}")),
        ]);
    }

    // Network interfaces on the host's tap devices, which banger creates
    // (QEMU must not run its ifup scripts), or on QEMU's user-mode stack.
    for (i, net) in spec.nets.iter().enumerate() {
        let netdev = match &net.backend {
            NetBackend::Tap { name } => {
                let mut netdev = opt(&format!("tap,id=net{i},ifname="), OsStr::new(name));
                netdev.push(",script=no,downscript=no");
                netdev
            }
            NetBackend::User {
                net,
                prefix,
                host,
                dns,
                guest,
                forwards,
            } => {
                let mut s = format!(
                    "user,id=net{i},net={net}/{prefix},host={host},dns={dns},dhcpstart={guest},ipv6=off"
                );
                for f in forwards {
                    s.push_str(&format!(
                        ",hostfwd=tcp:{}:{}-{guest}:{}",
                        f.host.ip(),
                        f.host.port(),
                        f.guest_port
                    ));
                }
                os(&s)
            }
        };
        push(&[
            &os("-netdev"),
            &netdev,
            &os("-device"),
            &opt(
                &format!("virtio-net-device,netdev=net{i},mac="),
                OsStr::new(&net.mac),
            ),
        ]);
    }

    // Agent channel: a virtio-serial port backed by a Unix socket QEMU serves.
    push(&[
        &os("-device"),
        &os("virtio-serial-device,id=vserial"),
        &os("-chardev"),
        &opt(
            "socket,id=agent,server=on,wait=off,path=",
            paths.agent_socket().as_os_str(),
        ),
        &os("-device"),
        &os(&format!(
            "virtserialport,bus=vserial.0,chardev=agent,name={AGENT_PORT_NAME}"
        )),
    ]);

    // Guest entropy, so early getrandom() callers (sshd) never stall.
    push(&[&os("-device"), &os("virtio-rng-device")]);

    // QMP control socket.
    push(&[
        &os("-chardev"),
        &opt(
            "socket,id=qmp,server=on,wait=off,path=",
            paths.control_socket().as_os_str(),
        ),
        &os("-mon"),
        &os("chardev=qmp,mode=control"),
    ]);
    if let ArgsMode::Incoming { .. } = mode {
        push(&[&os("-S"), &os("-incoming"), &os("defer")]);
    }
    args
}
