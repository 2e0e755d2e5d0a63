//! `banger vm ports` and the network lines of `vm show`.

use crate::connect;
use crate::output;
use banger_model::VmRecord;

/// Listening ports of a running VM, with URLs for detected HTTP(S).
pub async fn run(vm: &str, json: bool) -> anyhow::Result<i32> {
    let client = connect::client().await?;
    let ports = client.vm_ports(vm).await?;
    if json {
        output::json(&ports)?;
        return Ok(0);
    }
    let mut rows = vec![
        ["PORT", "ADDRESS", "PROTO", "PROCESS", "ENDPOINT"]
            .map(String::from)
            .to_vec(),
    ];
    for p in &ports {
        let process = match (p.pid, &p.command) {
            (Some(pid), Some(c)) => format!("{pid} {c}"),
            (Some(pid), None) => pid.to_string(),
            _ => "-".into(),
        };
        rows.push(vec![
            p.port.to_string(),
            p.addr.clone(),
            p.protocol.clone().unwrap_or_else(|| "-".into()),
            process,
            p.url
                .clone()
                .or_else(|| p.note.clone())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    output::table(&rows);
    Ok(0)
}

/// `vm show` rows for the VM's network.
pub fn network_rows(v: &VmRecord) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec![
            "ip".into(),
            match (v.ssh_port, v.ip) {
                (Some(_), _) => {
                    "10.0.2.15 (user-mode networking, not reachable from the host)".into()
                }
                (None, Some(ip)) => format!("{ip} ({}.vm)", v.name),
                (None, None) => "-".into(),
            },
        ],
        vec!["nat".into(), if v.nat { "on" } else { "off" }.into()],
    ];
    if let Some(tap) = &v.tap {
        rows.push(vec!["tap".into(), tap.clone()]);
    }
    if let Some(port) = v.ssh_port {
        rows.push(vec![
            "ssh".into(),
            format!("127.0.0.1:{port} (user-mode networking: ssh -p {port} root@127.0.0.1)"),
        ]);
    }
    rows
}
