//! Warm-start templates: one row per saved guest, keyed by its
//! [`banger_model::TemplateKey`]'s id.

use crate::{Store, StoreError, path_text};
use banger_model::{TemplateRecord, TemplateShape, TemplateState, VmBackend};
use rusqlite::{OptionalExtension, Row, params};
use std::path::PathBuf;

const SELECT: &str = "SELECT id, image, backend, vcpu, memory_mib, disk_bytes, dir, state, size_bytes, build_ms, created_at, last_used_at, uses, key FROM templates";

impl Store {
    /// Inserts or replaces the template `t`; `key` is its key as JSON.
    pub fn upsert_template(&self, t: &TemplateRecord, key: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO templates (id, image, backend, vcpu, memory_mib, disk_bytes, key, dir, state, size_bytes, build_ms, created_at, last_used_at, uses)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT(id) DO UPDATE SET image = excluded.image, backend = excluded.backend,
             vcpu = excluded.vcpu, memory_mib = excluded.memory_mib, disk_bytes = excluded.disk_bytes,
             key = excluded.key, dir = excluded.dir, state = excluded.state, size_bytes = excluded.size_bytes,
             build_ms = excluded.build_ms, created_at = excluded.created_at",
            params![
                t.id,
                t.image,
                t.backend.as_str(),
                t.shape.vcpu,
                t.shape.memory_mib as i64,
                t.disk_bytes as i64,
                key,
                path_text(&t.dir)?,
                t.state.as_str(),
                t.size_bytes as i64,
                t.build_ms.map(|ms| ms as i64),
                t.created_at,
                t.last_used_at,
                t.uses as i64,
            ],
        )?;
        Ok(())
    }

    /// The template with id `id` and its key (JSON), if any.
    pub fn get_template(&self, id: &str) -> Result<Option<(TemplateRecord, String)>, StoreError> {
        self.conn()
            .query_row(&format!("{SELECT} WHERE id = ?1"), [id], read)
            .optional()?
            .map(|(r, key)| Ok((r.into_record()?, key)))
            .transpose()
    }

    /// Templates of `image` for `backend` in `shape`, newest first, with
    /// their keys: what a create of that shape could restore.
    pub fn find_templates(
        &self,
        image: &str,
        backend: VmBackend,
        shape: TemplateShape,
    ) -> Result<Vec<(TemplateRecord, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{SELECT} WHERE image = ?1 AND backend = ?2 AND vcpu = ?3 AND memory_mib = ?4 ORDER BY julianday(created_at) DESC, rowid DESC"
        ))?;
        let rows = stmt.query_map(
            params![image, backend.as_str(), shape.vcpu, shape.memory_mib as i64],
            read,
        )?;
        rows.map(|r| {
            let (row, key) = r?;
            Ok((row.into_record()?, key))
        })
        .collect()
    }

    /// Every template (of `image` when given), oldest first.
    pub fn list_templates(&self, image: Option<&str>) -> Result<Vec<TemplateRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{SELECT} WHERE ?1 IS NULL OR image = ?1 ORDER BY julianday(created_at), rowid"
        ))?;
        let rows = stmt.query_map([image], read)?;
        rows.map(|r| r?.0.into_record()).collect()
    }

    /// Removes the row; an absent one is not an error (undo may run twice).
    pub fn delete_template(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM templates WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Counts one more use of the template, now.
    pub fn touch_template(&self, id: &str, now: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE templates SET uses = uses + 1, last_used_at = ?2 WHERE id = ?1",
            params![id, now],
        )?;
        Ok(())
    }
}

/// A `templates` row before its text columns are parsed.
struct Raw {
    id: String,
    image: String,
    backend: String,
    vcpu: u32,
    memory_mib: i64,
    disk_bytes: i64,
    dir: String,
    state: String,
    size_bytes: i64,
    build_ms: Option<i64>,
    created_at: String,
    last_used_at: Option<String>,
    uses: i64,
}

fn read(r: &Row<'_>) -> rusqlite::Result<(Raw, String)> {
    Ok((
        Raw {
            id: r.get(0)?,
            image: r.get(1)?,
            backend: r.get(2)?,
            vcpu: r.get(3)?,
            memory_mib: r.get(4)?,
            disk_bytes: r.get(5)?,
            dir: r.get(6)?,
            state: r.get(7)?,
            size_bytes: r.get(8)?,
            build_ms: r.get(9)?,
            created_at: r.get(10)?,
            last_used_at: r.get(11)?,
            uses: r.get(12)?,
        },
        r.get(13)?,
    ))
}

impl Raw {
    fn into_record(self) -> Result<TemplateRecord, StoreError> {
        let id = self.id;
        let corrupt =
            |what: &str, e: String| StoreError::Corrupt(format!("template {id}: {what}: {e}"));
        let unsigned = |what: &str, v: i64| {
            u64::try_from(v).map_err(|_| corrupt(what, format!("{v} is negative")))
        };
        Ok(TemplateRecord {
            image: self.image,
            backend: self.backend.parse().map_err(|e| corrupt("backend", e))?,
            shape: TemplateShape {
                vcpu: self.vcpu,
                memory_mib: unsigned("memory_mib", self.memory_mib)?,
            },
            disk_bytes: unsigned("disk_bytes", self.disk_bytes)?,
            dir: PathBuf::from(self.dir),
            state: self
                .state
                .parse::<TemplateState>()
                .map_err(|e| corrupt("state", e))?,
            size_bytes: unsigned("size_bytes", self.size_bytes)?,
            build_ms: self.build_ms.and_then(|v| u64::try_from(v).ok()),
            created_at: self.created_at,
            last_used_at: self.last_used_at,
            uses: unsigned("uses", self.uses)?,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_model::fixtures;

    fn store() -> Store {
        let s = Store::open_in_memory().expect("db");
        s.upsert_kernel(&fixtures::kernel("k")).expect("kernel");
        for name in ["img", "other"] {
            s.upsert_image(&fixtures::image(name, "k")).expect("image");
        }
        s
    }

    fn template(id: &str, image: &str, vcpu: u32, created_at: &str) -> TemplateRecord {
        TemplateRecord {
            id: id.into(),
            image: image.into(),
            backend: VmBackend::Qemu,
            shape: TemplateShape {
                vcpu,
                memory_mib: 1024,
            },
            disk_bytes: 8 << 30,
            dir: format!("/t/{id}").into(),
            state: TemplateState::Ready,
            size_bytes: 123,
            build_ms: Some(4567),
            created_at: created_at.into(),
            last_used_at: None,
            uses: 0,
        }
    }

    #[test]
    fn crud_find_and_touch() {
        let s = store();
        let a = template("aaaa", "img", 1, "2026-01-01T00:00:00Z");
        let b = template("bbbb", "img", 1, "2026-01-02T00:00:00Z");
        let c = template("cccc", "img", 2, "2026-01-03T00:00:00Z");
        let d = template("dddd", "other", 1, "2026-01-04T00:00:00Z");
        for t in [&a, &b, &c, &d] {
            s.upsert_template(t, &format!("{{\"id\":\"{}\"}}", t.id))
                .expect("upsert");
        }
        let (got, key) = s.get_template("aaaa").expect("get").expect("some");
        assert_eq!((got, key.as_str()), (a.clone(), "{\"id\":\"aaaa\"}"));
        assert!(s.get_template("zzzz").expect("get").is_none());
        let found: Vec<String> = s
            .find_templates("img", VmBackend::Qemu, a.shape)
            .expect("find")
            .into_iter()
            .map(|(t, _)| t.id)
            .collect();
        assert_eq!(
            found,
            ["bbbb", "aaaa"],
            "newest first, shape and image match"
        );
        assert!(
            s.find_templates("img", VmBackend::Firecracker, a.shape)
                .expect("find")
                .is_empty()
        );
        let ids = |v: Vec<TemplateRecord>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(s.list_templates(None).expect("list")).len(), 4);
        assert_eq!(
            ids(s.list_templates(Some("other")).expect("list")),
            ["dddd"]
        );
        s.touch_template("aaaa", "2026-02-01T00:00:00Z")
            .expect("touch");
        s.touch_template("aaaa", "2026-02-02T00:00:00Z")
            .expect("touch");
        let (got, _) = s.get_template("aaaa").expect("get").expect("some");
        assert_eq!(got.uses, 2);
        assert_eq!(got.last_used_at.as_deref(), Some("2026-02-02T00:00:00Z"));
        // A rebuild replaces the row but keeps its use count.
        s.upsert_template(&a, "{}").expect("upsert");
        assert_eq!(
            s.get_template("aaaa").expect("get").expect("some").0.uses,
            2
        );
        s.delete_template("aaaa").expect("delete");
        s.delete_template("aaaa").expect("delete twice");
        assert!(s.get_template("aaaa").expect("get").is_none());
    }

    #[test]
    fn templates_need_their_image_and_go_with_it() {
        let s = store();
        let e = s
            .upsert_template(&template("aaaa", "nope", 1, "2026-01-01T00:00:00Z"), "{}")
            .expect_err("unknown image");
        assert!(e.to_string().contains("database query failed"), "{e}");
        s.upsert_template(&template("aaaa", "img", 1, "2026-01-01T00:00:00Z"), "{}")
            .expect("upsert");
        s.delete_image("img").expect("delete image");
        assert!(s.list_templates(None).expect("list").is_empty());
    }
}
