//! Image and kernel records.

use crate::{Store, StoreError, is_constraint, path_text};
use banger_model::{ImageRecord, KernelRecord};
use rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY;
use rusqlite::{OptionalExtension, Row, params};
use std::path::PathBuf;

const IMAGE_SELECT: &str =
    "SELECT name, rootfs, kernel, managed, size_bytes, created_at, work_seed FROM images";
const KERNEL_SELECT: &str =
    "SELECT name, kernel, initrd, vmlinux, release, created_at, dir, banger_initramfs FROM kernels";

impl Store {
    /// Inserts an image, or replaces the one with that name (keeping its
    /// creation time). Its kernel must be recorded first.
    pub fn upsert_image(&self, img: &ImageRecord) -> Result<(), StoreError> {
        let size = i64::try_from(img.size_bytes).map_err(|_| {
            StoreError::Corrupt(format!(
                "image {}: size {} is too large",
                img.name, img.size_bytes
            ))
        })?;
        self.conn()
            .execute(
                "INSERT INTO images (name, rootfs, kernel, managed, size_bytes, created_at, work_seed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(name) DO UPDATE SET rootfs = excluded.rootfs, kernel = excluded.kernel,
                 managed = excluded.managed, size_bytes = excluded.size_bytes,
                 work_seed = excluded.work_seed",
                params![
                    img.name,
                    path_text(&img.rootfs)?,
                    img.kernel,
                    img.managed,
                    size,
                    img.created_at,
                    img.work_seed.as_deref().map(path_text).transpose()?
                ],
            )
            .map_err(|e| {
                if is_constraint(&e, SQLITE_CONSTRAINT_FOREIGNKEY, "") {
                    StoreError::NotFound(format!(
                        "image {}: no kernel named {}",
                        img.name, img.kernel
                    ))
                } else {
                    e.into()
                }
            })?;
        Ok(())
    }

    pub fn get_image(&self, name: &str) -> Result<ImageRecord, StoreError> {
        self.conn()
            .query_row(
                &format!("{IMAGE_SELECT} WHERE name = ?1"),
                [name],
                image_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no image named {name}")))
    }

    /// All images by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{IMAGE_SELECT} ORDER BY name"))?;
        let rows = stmt.query_map([], image_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes the record; an absent one is not an error. Refused with
    /// [`StoreError::InUse`] while VMs use the image.
    pub fn delete_image(&self, name: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        let users = names(
            &conn,
            "SELECT name FROM vms WHERE image = ?1 ORDER BY name",
            name,
        )?;
        if !users.is_empty() {
            return Err(StoreError::InUse {
                what: format!("image {name}"),
                users: prefixed("VM", users),
            });
        }
        // Templates are snapshots of this image's guest: never of another.
        conn.execute("DELETE FROM templates WHERE image = ?1", [name])?;
        conn.execute("DELETE FROM images WHERE name = ?1", [name])?;
        Ok(())
    }

    /// Inserts a kernel, or replaces the one with that name (keeping its
    /// creation time).
    pub fn upsert_kernel(&self, k: &KernelRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO kernels (name, kernel, initrd, vmlinux, release, created_at, dir, banger_initramfs)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(name) DO UPDATE SET kernel = excluded.kernel, initrd = excluded.initrd,
             vmlinux = excluded.vmlinux, release = excluded.release, dir = excluded.dir,
             banger_initramfs = excluded.banger_initramfs",
            params![
                k.name,
                path_text(&k.kernel)?,
                k.initrd.as_deref().map(path_text).transpose()?,
                k.vmlinux.as_deref().map(path_text).transpose()?,
                k.release,
                k.created_at,
                k.dir.as_deref().map(path_text).transpose()?,
                k.banger_initramfs.as_deref().map(path_text).transpose()?
            ],
        )?;
        Ok(())
    }

    pub fn get_kernel(&self, name: &str) -> Result<KernelRecord, StoreError> {
        self.conn()
            .query_row(
                &format!("{KERNEL_SELECT} WHERE name = ?1"),
                [name],
                kernel_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no kernel named {name}")))
    }

    /// All kernels by name.
    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{KERNEL_SELECT} ORDER BY name"))?;
        let rows = stmt.query_map([], kernel_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes the record; an absent one is not an error. Refused with
    /// [`StoreError::InUse`] while images boot with the kernel.
    pub fn delete_kernel(&self, name: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        let users = names(
            &conn,
            "SELECT name FROM images WHERE kernel = ?1 ORDER BY name",
            name,
        )?;
        if !users.is_empty() {
            return Err(StoreError::InUse {
                what: format!("kernel {name}"),
                users: prefixed("image", users),
            });
        }
        conn.execute("DELETE FROM kernels WHERE name = ?1", [name])?;
        Ok(())
    }
}

fn names(conn: &rusqlite::Connection, sql: &str, arg: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([arg], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn prefixed(kind: &str, names: Vec<String>) -> Vec<String> {
    names.into_iter().map(|n| format!("{kind} {n}")).collect()
}

fn image_row(r: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    let rootfs: String = r.get(1)?;
    let size: i64 = r.get(4)?;
    let work_seed: Option<String> = r.get(6)?;
    Ok(ImageRecord {
        name: r.get(0)?,
        rootfs: PathBuf::from(rootfs),
        kernel: r.get(2)?,
        managed: r.get(3)?,
        // The schema's CHECK keeps it non-negative.
        size_bytes: u64::try_from(size).unwrap_or(0),
        created_at: r.get(5)?,
        work_seed: work_seed.map(PathBuf::from),
    })
}

fn kernel_row(r: &Row<'_>) -> rusqlite::Result<KernelRecord> {
    let kernel: String = r.get(1)?;
    let initrd: Option<String> = r.get(2)?;
    let vmlinux: Option<String> = r.get(3)?;
    let dir: Option<String> = r.get(6)?;
    let banger_initramfs: Option<String> = r.get(7)?;
    Ok(KernelRecord {
        name: r.get(0)?,
        kernel: PathBuf::from(kernel),
        initrd: initrd.map(PathBuf::from),
        vmlinux: vmlinux.map(PathBuf::from),
        release: r.get(4)?,
        created_at: r.get(5)?,
        dir: dir.map(PathBuf::from),
        banger_initramfs: banger_initramfs.map(PathBuf::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_model::{Provenance, SpecValue, VmBackend, VmId, VmName, VmRecord, VmSpec, VmState};

    fn kernel(name: &str) -> KernelRecord {
        KernelRecord {
            name: name.into(),
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd.img".into()),
            vmlinux: None,
            release: Some("6.1.0-50-cloud-amd64".into()),
            dir: Some("/k".into()),
            banger_initramfs: Some("/k/banger-modules.cpio".into()),
            created_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn image(name: &str, kernel: &str) -> ImageRecord {
        ImageRecord {
            size_bytes: 2 << 30,
            ..banger_model::fixtures::image(name, kernel)
        }
    }

    #[test]
    fn kernels_round_trip_and_upsert() {
        let s = Store::open_in_memory().expect("db");
        let k = kernel("k1");
        s.upsert_kernel(&k).expect("insert");
        assert_eq!(s.get_kernel("k1").expect("get"), k);
        let k2 = KernelRecord {
            initrd: None,
            release: None,
            dir: None,
            banger_initramfs: None,
            created_at: "later".into(),
            ..k.clone()
        };
        s.upsert_kernel(&k2).expect("replace");
        // Replaced, but the creation time stays the first one.
        assert_eq!(
            s.get_kernel("k1").expect("get"),
            KernelRecord {
                created_at: k.created_at.clone(),
                ..k2
            }
        );
        s.upsert_kernel(&kernel("a0")).expect("second");
        let names: Vec<String> = s
            .list_kernels()
            .expect("list")
            .into_iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(names, ["a0", "k1"]);
        assert_eq!(
            s.get_kernel("nope").expect_err("missing").to_string(),
            "no kernel named nope"
        );
    }

    #[test]
    fn images_need_their_kernel() {
        let s = Store::open_in_memory().expect("db");
        let e = s
            .upsert_image(&image("debian-bookworm", "k1"))
            .expect_err("no kernel");
        assert_eq!(e.to_string(), "image debian-bookworm: no kernel named k1");
        s.upsert_kernel(&kernel("k1")).expect("k");
        let img = image("debian-bookworm", "k1");
        s.upsert_image(&img).expect("img");
        assert_eq!(s.get_image("debian-bookworm").expect("get"), img);
        s.upsert_image(&ImageRecord {
            size_bytes: 456,
            managed: false,
            work_seed: None,
            ..img.clone()
        })
        .expect("update");
        let got = s.get_image("debian-bookworm").expect("get");
        assert_eq!((got.size_bytes, got.managed), (456, false));
        assert_eq!(s.list_images().expect("list").len(), 1);
        let e = s
            .upsert_image(&ImageRecord {
                size_bytes: u64::MAX,
                ..img
            })
            .expect_err("huge");
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        assert_eq!(
            s.get_image("nope").expect_err("missing").to_string(),
            "no image named nope"
        );
    }

    #[test]
    fn in_use_records_are_not_deleted() {
        let s = Store::open_in_memory().expect("db");
        s.upsert_kernel(&kernel("k1")).expect("k");
        s.upsert_image(&image("debian-bookworm", "k1"))
            .expect("img");
        s.insert_vm(&VmRecord {
            id: VmId("aa11".into()),
            name: VmName::parse("calm-otter").expect("name"),
            image: "debian-bookworm".into(),
            state: VmState::Stopped,
            backend: VmBackend::Qemu,
            spec: VmSpec {
                vcpu: SpecValue::new(1, Provenance::Builtin),
                memory_mib: SpecValue::new(1024, Provenance::Builtin),
                disk_bytes: SpecValue::new(8 << 30, Provenance::Builtin),
            },
            dir: "/vms/aa11".into(),
            pid: None,
            created_at: "t".into(),
            last_error: None,
            start: Default::default(),
            nat: false,
            ip: None,
            tap: None,
            ssh_port: None,
            initramfs: Default::default(),
        })
        .expect("vm");

        let e = s.delete_kernel("k1").expect_err("kernel in use");
        assert_eq!(
            e.to_string(),
            "kernel k1 is in use by image debian-bookworm"
        );
        let e = s.delete_image("debian-bookworm").expect_err("image in use");
        assert_eq!(
            e.to_string(),
            "image debian-bookworm is in use by VM calm-otter"
        );

        s.delete_vm(&VmId("aa11".into())).expect("vm");
        s.delete_image("debian-bookworm").expect("image");
        s.delete_image("debian-bookworm").expect("image again");
        s.delete_kernel("k1").expect("kernel");
        assert!(matches!(
            s.get_image("debian-bookworm"),
            Err(StoreError::NotFound(_))
        ));
        assert!(s.list_kernels().expect("list").is_empty());
    }
}
