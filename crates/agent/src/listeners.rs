//! The guest's listening TCP sockets, for `banger vm ports`.
//!
//! Sockets come from `/proc/net/tcp` and `/proc/net/tcp6` (state `0A`,
//! LISTEN); their owners are found by matching socket inodes against the
//! `socket:[inode]` links in `/proc/<pid>/fd`.

use banger_agent_proto::Listener;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Listening sockets under `proc` (normally `/proc`), sorted by port, one
/// entry per address and port.
pub fn list(proc: &Path) -> std::io::Result<Vec<Listener>> {
    let mut sockets: BTreeMap<(u16, String), u64> = BTreeMap::new();
    for (file, v6) in [("net/tcp", false), ("net/tcp6", true)] {
        let text = match std::fs::read_to_string(proc.join(file)) {
            Ok(t) => t,
            // No IPv6 in the guest kernel: nothing listens there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && v6 => continue,
            Err(e) => return Err(e),
        };
        for (addr, port, inode) in parse_table(&text, v6) {
            sockets.entry((port, addr)).or_insert(inode);
        }
    }
    let owners = socket_owners(proc);
    Ok(sockets
        .into_iter()
        .map(|((port, addr), inode)| {
            let owner = owners.get(&inode);
            Listener {
                addr,
                port,
                pid: owner.map(|(pid, _)| *pid),
                command: owner.and_then(|(_, c)| c.clone()),
            }
        })
        .collect())
}

/// `(address, port, inode)` of the LISTEN rows of a `/proc/net/tcp{,6}` table.
fn parse_table(text: &str, v6: bool) -> Vec<(String, u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (addr, port) = f.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let addr = if v6 { parse_v6(addr)? } else { parse_v4(addr)? };
            let inode = f.get(9)?.parse().ok()?;
            Some((addr, port, inode))
        })
        .collect()
}

/// The kernel prints the address as the hex of its in-memory `u32`, which
/// is in network order, i.e. reversed on little-endian machines.
fn parse_v4(hex: &str) -> Option<String> {
    let n = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(n.to_ne_bytes()).to_string())
}

/// Four such words, each printed as a native-endian `u32`.
fn parse_v6(hex: &str) -> Option<String> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let a = Ipv6Addr::from(bytes);
    Some(match a.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => a.to_string(),
    })
}

/// Socket inode → (pid, command line) for every process we can inspect.
fn socket_owners(proc: &Path) -> HashMap<u64, (u32, Option<String>)> {
    let mut owners = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc) else {
        return owners;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        let mut command = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let cmd = command
                .get_or_insert_with(|| cmdline(&e.path().join("cmdline")))
                .clone();
            owners.entry(inode).or_insert((pid, cmd));
        }
    }
    owners
}

fn cmdline(path: &Path) -> Option<String> {
    let raw = std::fs::read(path).ok()?;
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_rows_only() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0\n\
   2: 0F0010AC:0016 010010AC:C350 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0\n";
        let rows = parse_table(tcp, false);
        if cfg!(target_endian = "little") {
            assert_eq!(
                rows,
                [
                    ("0.0.0.0".to_string(), 8080, 12345),
                    ("127.0.0.1".to_string(), 22, 222)
                ]
            );
        }
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1\n\
   1: 0000000000000000FFFF00000100007F:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1\n";
        let rows = parse_table(tcp6, true);
        if cfg!(target_endian = "little") {
            assert_eq!(
                rows,
                [
                    ("::".to_string(), 22, 444),
                    ("127.0.0.1".to_string(), 8081, 555)
                ]
            );
        }
    }

    #[test]
    fn finds_this_process_listening() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let found = list(Path::new("/proc")).expect("list");
        let me = found
            .iter()
            .find(|x| x.port == port && x.addr == "127.0.0.1")
            .expect("our listener");
        assert_eq!(me.pid, Some(std::process::id()));
        assert!(me.command.is_some());
    }
}
