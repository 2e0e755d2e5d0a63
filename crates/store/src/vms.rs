//! VM records.

use crate::{Store, StoreError, is_constraint, path_text};
use banger_model::{StartInfo, VmBackend, VmId, VmName, VmRecord, VmSpec, VmState};
use rusqlite::ffi::{SQLITE_CONSTRAINT_FOREIGNKEY, SQLITE_CONSTRAINT_UNIQUE};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::PathBuf;

const SELECT: &str = "SELECT id, name, image, state, backend, spec, dir, pid, created_at, last_error, nat, ip, tap, ssh_port, initramfs, start_kind, start_template, start_note, start_restore_ms FROM vms";
/// Oldest first. `julianday` compares instants, not strings (RFC 3339 texts
/// with different fraction lengths do not sort as text); rowid breaks ties.
const ORDER: &str = "ORDER BY julianday(created_at), rowid";

impl Store {
    /// Records a new VM. Fails with [`StoreError::NameTaken`] when the name
    /// is used, [`StoreError::NotFound`] when its image is unknown.
    pub fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let spec = spec_json(vm)?;
        self.conn()
            .execute(
                "INSERT INTO vms (id, name, image, state, backend, spec, dir, pid, created_at, last_error, nat, ip, tap, ssh_port, initramfs, start_kind, start_template, start_note, start_restore_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
                params![
                    vm.id.as_str(),
                    vm.name.as_str(),
                    vm.image,
                    vm.state.as_str(),
                    vm.backend.as_str(),
                    spec,
                    path_text(&vm.dir)?,
                    vm.pid,
                    vm.created_at,
                    vm.last_error,
                    vm.nat,
                    vm.ip.map(|ip| ip.to_string()),
                    vm.tap,
                    vm.ssh_port,
                    vm.initramfs.as_str(),
                    vm.start.kind.as_str(),
                    vm.start.template,
                    vm.start.note,
                    vm.start.restore_ms.map(|ms| ms as i64)
                ],
            )
            .map_err(|e| write_error(e, vm))?;
        Ok(())
    }

    /// Replaces every field of the VM with id `vm.id` but its creation time.
    pub fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let spec = spec_json(vm)?;
        let n = self
            .conn()
            .execute(
                "UPDATE vms SET name = ?2, image = ?3, state = ?4, backend = ?5, spec = ?6, dir = ?7, pid = ?8,
                 last_error = ?9, nat = ?10, ip = ?11, tap = ?12, ssh_port = ?13, initramfs = ?14,
                 start_kind = ?15, start_template = ?16, start_note = ?17, start_restore_ms = ?18 WHERE id = ?1",
                params![
                    vm.id.as_str(),
                    vm.name.as_str(),
                    vm.image,
                    vm.state.as_str(),
                    vm.backend.as_str(),
                    spec,
                    path_text(&vm.dir)?,
                    vm.pid,
                    vm.last_error,
                    vm.nat,
                    vm.ip.map(|ip| ip.to_string()),
                    vm.tap,
                    vm.ssh_port,
                    vm.initramfs.as_str(),
                    vm.start.kind.as_str(),
                    vm.start.template,
                    vm.start.note,
                    vm.start.restore_ms.map(|ms| ms as i64)
                ],
            )
            .map_err(|e| write_error(e, vm))?;
        if n == 0 {
            return Err(no_vm_with_id(&vm.id));
        }
        Ok(())
    }

    /// Records a state change with the VMM's pid (`None` when it does not
    /// run) and the error that caused it, if any.
    pub fn set_vm_state(
        &self,
        id: &VmId,
        state: VmState,
        pid: Option<u32>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET state = ?2, pid = ?3, last_error = ?4 WHERE id = ?1",
            params![id.as_str(), state.as_str(), pid, error],
        )?;
        if n == 0 {
            return Err(no_vm_with_id(id));
        }
        Ok(())
    }

    /// Records the host side of a VM's network while it runs: its TAP
    /// (bridge mode) or forwarded ssh port (user mode); `None`s when it stops.
    pub fn set_vm_net(
        &self,
        id: &VmId,
        tap: Option<&str>,
        ssh_port: Option<u16>,
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET tap = ?2, ssh_port = ?3 WHERE id = ?1",
            params![id.as_str(), tap, ssh_port],
        )?;
        if n == 0 {
            return Err(no_vm_with_id(id));
        }
        Ok(())
    }

    /// Records how the VM's latest start happened.
    pub fn set_vm_start(&self, id: &VmId, start: &StartInfo) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET start_kind = ?2, start_template = ?3, start_note = ?4, start_restore_ms = ?5 WHERE id = ?1",
            params![
                id.as_str(),
                start.kind.as_str(),
                start.template,
                start.note,
                start.restore_ms.map(|ms| ms as i64)
            ],
        )?;
        if n == 0 {
            return Err(no_vm_with_id(id));
        }
        Ok(())
    }

    /// Turns NAT on or off in the record.
    pub fn set_vm_nat(&self, id: &VmId, nat: bool) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET nat = ?2 WHERE id = ?1",
            params![id.as_str(), nat],
        )?;
        if n == 0 {
            return Err(no_vm_with_id(id));
        }
        Ok(())
    }

    pub fn get_vm(&self, id: &VmId) -> Result<VmRecord, StoreError> {
        query_one(
            &self.conn(),
            &format!("{SELECT} WHERE id = ?1"),
            id.as_str(),
        )?
        .ok_or_else(|| no_vm_with_id(id))
    }

    /// Removes the record. An absent VM is not an error, so undo steps can
    /// run twice.
    pub fn delete_vm(&self, id: &VmId) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM vms WHERE id = ?1", [id.as_str()])?;
        Ok(())
    }

    /// All VMs, oldest first.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        query_all(&self.conn(), &format!("{SELECT} {ORDER}"), [])
    }

    /// The VM a user means by `reference`: the one with that exact name,
    /// else with that exact id, else the only one whose id starts with it.
    pub fn resolve_vm(&self, reference: &str) -> Result<VmRecord, StoreError> {
        let conn = self.conn();
        if let Some(vm) = query_one(&conn, &format!("{SELECT} WHERE name = ?1"), reference)? {
            return Ok(vm);
        }
        if let Some(vm) = query_one(&conn, &format!("{SELECT} WHERE id = ?1"), reference)? {
            return Ok(vm);
        }
        let mut matches = if reference.is_empty() {
            Vec::new()
        } else {
            // substr, not LIKE: a ref may contain LIKE's wildcards.
            query_all(
                &conn,
                &format!("{SELECT} WHERE substr(id, 1, length(?1)) = ?1 {ORDER}"),
                [reference],
            )?
        };
        match matches.len() {
            0 => Err(StoreError::NotFound(format!(
                "no VM named or with id prefix '{reference}'"
            ))),
            1 => Ok(matches.remove(0)),
            _ => Err(StoreError::Ambiguous {
                reference: reference.to_string(),
                matches: matches
                    .iter()
                    .map(|v| format!("{} ({})", v.name, v.id))
                    .collect(),
            }),
        }
    }
}

fn no_vm_with_id(id: &VmId) -> StoreError {
    StoreError::NotFound(format!("no VM with id {id}"))
}

fn spec_json(vm: &VmRecord) -> Result<String, StoreError> {
    serde_json::to_string(&vm.spec)
        .map_err(|e| StoreError::Corrupt(format!("VM {}: spec: {e}", vm.id)))
}

fn write_error(e: rusqlite::Error, vm: &VmRecord) -> StoreError {
    if is_constraint(&e, SQLITE_CONSTRAINT_UNIQUE, "vms.name") {
        StoreError::NameTaken(vm.name.to_string())
    } else if is_constraint(&e, SQLITE_CONSTRAINT_UNIQUE, "vms.ip") {
        StoreError::AddressTaken(vm.ip.map(|ip| ip.to_string()).unwrap_or_default())
    } else if is_constraint(&e, SQLITE_CONSTRAINT_FOREIGNKEY, "") {
        StoreError::NotFound(format!("VM {}: no image named {}", vm.name, vm.image))
    } else {
        e.into()
    }
}

fn query_one(conn: &Connection, sql: &str, arg: &str) -> Result<Option<VmRecord>, StoreError> {
    conn.query_row(sql, [arg], VmRow::read)
        .optional()?
        .map(VmRow::into_record)
        .transpose()
}

fn query_all(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<VmRecord>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map(args, VmRow::read)?;
    rows.map(|r| r.map_err(StoreError::from).and_then(VmRow::into_record))
        .collect()
}

/// A `vms` row as stored, before its text columns are parsed.
struct VmRow {
    id: String,
    name: String,
    image: String,
    state: String,
    backend: String,
    spec: String,
    dir: String,
    pid: Option<u32>,
    created_at: String,
    last_error: Option<String>,
    nat: bool,
    ip: Option<String>,
    tap: Option<String>,
    ssh_port: Option<u16>,
    initramfs: String,
    start_kind: String,
    start_template: Option<String>,
    start_note: Option<String>,
    start_restore_ms: Option<i64>,
}

impl VmRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            name: r.get(1)?,
            image: r.get(2)?,
            state: r.get(3)?,
            backend: r.get(4)?,
            spec: r.get(5)?,
            dir: r.get(6)?,
            pid: r.get(7)?,
            created_at: r.get(8)?,
            last_error: r.get(9)?,
            nat: r.get(10)?,
            ip: r.get(11)?,
            tap: r.get(12)?,
            ssh_port: r.get(13)?,
            initramfs: r.get(14)?,
            start_kind: r.get(15)?,
            start_template: r.get(16)?,
            start_note: r.get(17)?,
            start_restore_ms: r.get(18)?,
        })
    }

    fn into_record(self) -> Result<VmRecord, StoreError> {
        let id = self.id;
        let corrupt = |what: &str, e: String| StoreError::Corrupt(format!("VM {id}: {what}: {e}"));
        Ok(VmRecord {
            name: VmName::parse(&self.name).map_err(|e| corrupt("name", e.to_string()))?,
            state: self
                .state
                .parse::<VmState>()
                .map_err(|e| corrupt("state", e))?,
            backend: self
                .backend
                .parse::<VmBackend>()
                .map_err(|e| corrupt("backend", e))?,
            spec: serde_json::from_str::<VmSpec>(&self.spec)
                .map_err(|e| corrupt("spec", e.to_string()))?,
            image: self.image,
            dir: PathBuf::from(self.dir),
            pid: self.pid,
            created_at: self.created_at,
            last_error: self.last_error,
            nat: self.nat,
            ip: self
                .ip
                .map(|ip| {
                    ip.parse()
                        .map_err(|e: std::net::AddrParseError| corrupt("ip", e.to_string()))
                })
                .transpose()?,
            tap: self.tap,
            ssh_port: self.ssh_port,
            initramfs: self
                .initramfs
                .parse()
                .map_err(|e| corrupt("initramfs", e))?,
            start: StartInfo {
                kind: self
                    .start_kind
                    .parse()
                    .map_err(|e| corrupt("start_kind", e))?,
                template: self.start_template,
                note: self.start_note,
                restore_ms: self.start_restore_ms.and_then(|ms| u64::try_from(ms).ok()),
            },
            id: VmId(id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_model::InitramfsMode;
    use banger_model::{Provenance, SpecValue, fixtures};

    /// A store with the image `debian-bookworm`, which test VMs use.
    fn store() -> Store {
        let s = Store::open_in_memory().expect("db");
        s.upsert_kernel(&fixtures::kernel("k")).expect("kernel");
        s.upsert_image(&fixtures::image("debian-bookworm", "k"))
            .expect("image");
        s
    }

    fn vm(name: &str, id: &str, created_at: &str) -> VmRecord {
        VmRecord {
            id: VmId(id.into()),
            name: VmName::parse(name).expect("name"),
            image: "debian-bookworm".into(),
            state: VmState::Creating,
            backend: VmBackend::Qemu,
            spec: VmSpec {
                vcpu: SpecValue::new(2, Provenance::Flag),
                memory_mib: SpecValue::new(1024, Provenance::Host),
                disk_bytes: SpecValue::new(8 << 30, Provenance::Builtin),
            },
            dir: PathBuf::from(format!("/vms/{id}")),
            pid: None,
            created_at: created_at.into(),
            last_error: None,
            nat: false,
            ip: None,
            tap: None,
            ssh_port: None,
            initramfs: InitramfsMode::Distro,
            start: Default::default(),
        }
    }

    #[test]
    fn resolve_by_name_id_and_prefix() {
        let s = store();
        s.insert_vm(&vm("calm-otter", "aa11bb", "2026-01-01T00:00:01Z"))
            .expect("a");
        s.insert_vm(&vm("bold-yak", "aa22cc", "2026-01-01T00:00:02Z"))
            .expect("b");
        // A name that is also a prefix of another VM's id: the name wins.
        s.insert_vm(&vm("aa2", "ff33dd", "2026-01-01T00:00:03Z"))
            .expect("c");
        assert_eq!(
            s.resolve_vm("calm-otter").expect("name").id.as_str(),
            "aa11bb"
        );
        assert_eq!(
            s.resolve_vm("aa22cc").expect("id").name.as_str(),
            "bold-yak"
        );
        assert_eq!(
            s.resolve_vm("aa1").expect("prefix").name.as_str(),
            "calm-otter"
        );
        assert_eq!(
            s.resolve_vm("aa2").expect("name over prefix").id.as_str(),
            "ff33dd"
        );
        assert_eq!(
            s.resolve_vm("f").expect("short prefix").name.as_str(),
            "aa2"
        );

        let e = s.resolve_vm("aa").expect_err("ambiguous");
        assert!(matches!(e, StoreError::Ambiguous { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "VM ref 'aa' is ambiguous: it matches calm-otter (aa11bb), bold-yak (aa22cc); \
             use the name or a longer id prefix"
        );

        let e = s.resolve_vm("zz").expect_err("none");
        assert!(matches!(e, StoreError::NotFound(_)), "{e}");
        assert_eq!(e.to_string(), "no VM named or with id prefix 'zz'");
        assert!(matches!(s.resolve_vm(""), Err(StoreError::NotFound(_))));
        // LIKE wildcards are not wildcards here.
        assert!(matches!(s.resolve_vm("%"), Err(StoreError::NotFound(_))));
        assert!(matches!(s.resolve_vm("a_"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn name_clash_is_reported() {
        let s = store();
        s.insert_vm(&vm("calm-otter", "aa11", "t")).expect("a");
        let e = s
            .insert_vm(&vm("calm-otter", "bb22", "t"))
            .expect_err("clash");
        assert!(
            matches!(e, StoreError::NameTaken(ref n) if n == "calm-otter"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "a VM named calm-otter already exists: pick another name or delete that VM"
        );
        // Renaming onto a taken name is the same clash.
        s.insert_vm(&vm("bold-yak", "bb22", "t")).expect("b");
        let e = s
            .update_vm(&vm("calm-otter", "bb22", "t"))
            .expect_err("rename clash");
        assert!(matches!(e, StoreError::NameTaken(_)), "{e}");
        assert_eq!(s.list_vms().expect("list").len(), 2);
    }

    #[test]
    fn unknown_image_is_refused() {
        let s = store();
        let v = VmRecord {
            image: "nope".into(),
            ..vm("calm-otter", "aa11", "t")
        };
        let e = s.insert_vm(&v).expect_err("fk");
        assert_eq!(e.to_string(), "VM calm-otter: no image named nope");
    }

    #[test]
    fn update_state_and_delete() {
        let s = store();
        let v = vm("calm-otter", "aa11", "2026-01-01T00:00:00Z");
        s.insert_vm(&v).expect("a");
        assert_eq!(s.get_vm(&v.id).expect("get"), v);

        s.set_vm_state(&v.id, VmState::Running, Some(42), None)
            .expect("set");
        let got = s.get_vm(&v.id).expect("get");
        assert_eq!(
            (got.state, got.pid, got.last_error.as_deref()),
            (VmState::Running, Some(42), None)
        );
        s.set_vm_state(
            &v.id,
            VmState::Error,
            None,
            Some("VMM exited with status 1"),
        )
        .expect("set");
        let got = s.get_vm(&v.id).expect("get");
        assert_eq!((got.state, got.pid), (VmState::Error, None));
        assert_eq!(got.last_error.as_deref(), Some("VMM exited with status 1"));

        let mut changed = got.clone();
        changed.name = VmName::parse("bold-yak").expect("name");
        changed.spec.vcpu = SpecValue::new(4, Provenance::Config);
        changed.dir = PathBuf::from("/elsewhere");
        changed.created_at = "ignored".into();
        s.update_vm(&changed).expect("update");
        let got = s.get_vm(&v.id).expect("get");
        assert_eq!(
            got,
            VmRecord {
                created_at: v.created_at.clone(),
                ..changed.clone()
            }
        );

        s.delete_vm(&v.id).expect("del");
        s.delete_vm(&v.id).expect("del again");
        let e = s.get_vm(&v.id).expect_err("gone");
        assert_eq!(e.to_string(), "no VM with id aa11");
        assert!(matches!(
            s.set_vm_state(&v.id, VmState::Stopped, None, None),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.update_vm(&changed),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn list_is_oldest_first_by_instant() {
        let s = store();
        // As text "…:01Z" sorts after "…:01.5Z"; as instants it is earlier.
        s.insert_vm(&vm("third", "cc", "2026-01-01T00:00:02Z"))
            .expect("c");
        s.insert_vm(&vm("second", "bb", "2026-01-01T00:00:01.5Z"))
            .expect("b");
        s.insert_vm(&vm("first", "aa", "2026-01-01T00:00:01Z"))
            .expect("a");
        let names: Vec<String> = s
            .list_vms()
            .expect("list")
            .into_iter()
            .map(|v| v.name.to_string())
            .collect();
        assert_eq!(names, ["first", "second", "third"]);
    }

    #[test]
    fn corrupt_rows_are_errors_not_panics() {
        let s = store();
        s.insert_vm(&vm("calm-otter", "aa11", "t")).expect("a");
        s.conn()
            .execute("UPDATE vms SET state = 'melting'", [])
            .expect("corrupt");
        let e = s.list_vms().expect_err("corrupt");
        assert_eq!(
            e.to_string(),
            "corrupt record: VM aa11: state: unknown VM state \"melting\""
        );
    }

    #[test]
    fn non_utf8_dirs_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let s = store();
        let v = VmRecord {
            dir: PathBuf::from(std::ffi::OsStr::from_bytes(b"/vms/\xff")),
            ..vm("calm-otter", "aa11", "t")
        };
        assert!(matches!(s.insert_vm(&v), Err(StoreError::NonUtf8Path(_))));
    }

    #[test]
    fn reopening_keeps_data_and_clones_share_it() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("banger.db");
        let v = vm("calm-otter", "aa11", "2026-01-01T00:00:00Z");
        {
            let s = Store::open(&p).expect("open");
            s.upsert_kernel(&fixtures::kernel("k")).expect("k");
            s.upsert_image(&fixtures::image("debian-bookworm", "k"))
                .expect("img");
            // Writers on several threads through clones of one store.
            std::thread::scope(|sc| {
                for i in 0..4 {
                    let s = s.clone();
                    sc.spawn(move || {
                        let name = format!("vm-{i}");
                        s.insert_vm(&vm(&name, &format!("{i:02}"), "t"))
                            .expect("insert");
                    });
                }
            });
            s.insert_vm(&v).expect("insert");
        }
        let s = Store::open(&p).expect("reopen");
        assert_eq!(s.schema_version().expect("v"), crate::MIGRATIONS.len());
        assert_eq!(s.get_vm(&v.id).expect("get"), v);
        assert_eq!(s.list_vms().expect("list").len(), 5);
    }

    #[test]
    fn addresses_are_unique_and_network_fields_round_trip() {
        let s = store();
        let mut a = vm("a", "aa", "2026-01-01T00:00:00Z");
        a.ip = Some("172.16.0.2".parse().expect("ip"));
        s.insert_vm(&a).expect("a");
        let mut b = vm("b", "bb", "2026-01-01T00:00:01Z");
        b.ip = a.ip;
        let e = s.insert_vm(&b).expect_err("same address");
        assert!(
            matches!(e, StoreError::AddressTaken(ref ip) if ip == "172.16.0.2"),
            "{e}"
        );
        // VMs without an address do not collide.
        let c = vm("c", "cc", "2026-01-01T00:00:02Z");
        let d = vm("d", "dd", "2026-01-01T00:00:03Z");
        s.insert_vm(&c).expect("c");
        s.insert_vm(&d).expect("d");

        s.set_vm_net(&a.id, Some("bgtap0abc"), None).expect("net");
        s.set_vm_nat(&a.id, true).expect("nat");
        let got = s.get_vm(&a.id).expect("get");
        assert_eq!(got.ip, a.ip);
        assert_eq!(got.tap.as_deref(), Some("bgtap0abc"));
        assert!(got.nat);
        s.set_vm_net(&a.id, None, Some(2222)).expect("net");
        let got = s.get_vm(&a.id).expect("get");
        assert_eq!((got.tap, got.ssh_port), (None, Some(2222)));
        // Deleting releases the address.
        s.delete_vm(&a.id).expect("delete");
        s.insert_vm(&b).expect("address free again");
    }
}
