//! Long-running operations (image builds, pulls...): what ran, on what, and
//! how it ended, so they can be listed and a crash noticed afterwards.

use crate::{Store, StoreError};
use rusqlite::{OptionalExtension, Row, params};
use std::fmt;

/// RFC 3339 UTC with milliseconds, from SQLite's clock (the same as ours).
const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
const SELECT: &str =
    "SELECT id, kind, target, state, message, error, started_at, finished_at FROM operations";

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(OperationState::Running),
            "succeeded" => Some(OperationState::Succeeded),
            "failed" => Some(OperationState::Failed),
            _ => None,
        }
    }
}

impl fmt::Display for OperationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A long-running operation as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub id: i64,
    /// What ran, e.g. `image.build`.
    pub kind: String,
    /// What it ran on, e.g. an image name.
    pub target: String,
    pub state: OperationState,
    /// Summary of a success.
    pub message: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: Option<String>,
}

impl Store {
    /// Records that an operation started now; returns its id.
    pub fn start_operation(&self, kind: &str, target: &str) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            &format!("INSERT INTO operations (kind, target, state, started_at) VALUES (?1, ?2, 'running', {NOW})"),
            params![kind, target],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Records how operation `id` ended: `Ok(message)` or `Err(error)`.
    pub fn finish_operation(&self, id: i64, outcome: Result<&str, &str>) -> Result<(), StoreError> {
        let (state, message, error) = match outcome {
            Ok(m) => (OperationState::Succeeded, Some(m), None),
            Err(e) => (OperationState::Failed, None, Some(e)),
        };
        let conn = self.conn();
        let n = conn.execute(
            &format!(
                "UPDATE operations SET state = ?2, message = ?3, error = ?4, finished_at = {NOW}
                 WHERE id = ?1 AND state = 'running'"
            ),
            params![id, state.as_str(), message, error],
        )?;
        if n == 0 {
            let exists = conn
                .query_row("SELECT 1 FROM operations WHERE id = ?1", [id], |_| Ok(()))
                .optional()?;
            return Err(match exists {
                Some(()) => StoreError::AlreadyFinished(id),
                None => StoreError::NotFound(format!("no operation with id {id}")),
            });
        }
        Ok(())
    }

    /// Marks every operation still running as failed with `error`; for the
    /// daemon's start, when no operation of a previous run can still be
    /// going. Returns how many there were.
    pub fn fail_running_operations(&self, error: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            &format!("UPDATE operations SET state = 'failed', error = ?1, finished_at = {NOW} WHERE state = 'running'"),
            [error],
        )?)
    }

    pub fn get_operation(&self, id: i64) -> Result<Operation, StoreError> {
        self.conn()
            .query_row(&format!("{SELECT} WHERE id = ?1"), [id], operation_row)
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no operation with id {id}")))?
    }

    /// The `limit` newest operations, newest first.
    pub fn list_operations(&self, limit: usize) -> Result<Vec<Operation>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY id DESC LIMIT ?1"))?;
        let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], operation_row)?;
        rows.map(|r| r?).collect()
    }
}

fn operation_row(r: &Row<'_>) -> rusqlite::Result<Result<Operation, StoreError>> {
    let id: i64 = r.get(0)?;
    let state: String = r.get(3)?;
    let Some(state) = OperationState::parse(&state) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "operation {id}: unknown state {state:?}"
        ))));
    };
    Ok(Ok(Operation {
        id,
        kind: r.get(1)?,
        target: r.get(2)?,
        state,
        message: r.get(4)?,
        error: r.get(5)?,
        started_at: r.get(6)?,
        finished_at: r.get(7)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_record_how_they_end() {
        let s = Store::open_in_memory().expect("db");
        let a = s
            .start_operation("image.build", "debian-bookworm")
            .expect("a");
        let b = s.start_operation("image.pull", "alpine").expect("b");
        let c = s.start_operation("kernel.pull", "k1").expect("c");

        let op = s.get_operation(a).expect("get");
        assert_eq!(op.state, OperationState::Running);
        assert_eq!(op.finished_at, None);
        // RFC 3339 UTC with milliseconds, e.g. 2026-01-01T00:00:00.000Z.
        assert_eq!(op.started_at.len(), 24, "{}", op.started_at);
        assert!(
            op.started_at.ends_with('Z') && op.started_at.as_bytes()[10] == b'T',
            "{}",
            op.started_at
        );

        s.finish_operation(a, Err("mirror unreachable"))
            .expect("fail a");
        s.finish_operation(b, Ok("pulled alpine"))
            .expect("finish b");
        let e = s.finish_operation(b, Ok("again")).expect_err("twice");
        assert_eq!(e.to_string(), format!("operation {b} has already finished"));
        let e = s.finish_operation(999, Ok("x")).expect_err("unknown");
        assert_eq!(e.to_string(), "no operation with id 999");

        let ops = s.list_operations(10).expect("list");
        assert_eq!(ops.iter().map(|o| o.id).collect::<Vec<_>>(), [c, b, a]);
        assert_eq!(ops[1].state, OperationState::Succeeded);
        assert_eq!(ops[1].message.as_deref(), Some("pulled alpine"));
        assert!(ops[1].finished_at.is_some());
        assert_eq!(ops[2].state, OperationState::Failed);
        assert_eq!(ops[2].error.as_deref(), Some("mirror unreachable"));
        assert_eq!(s.list_operations(1).expect("limited").len(), 1);

        // After a crash, what was running is recorded as failed.
        assert_eq!(
            s.fail_running_operations("bangerd restarted")
                .expect("fail running"),
            1
        );
        let op = s.get_operation(c).expect("c");
        assert_eq!(
            (op.state, op.error.as_deref()),
            (OperationState::Failed, Some("bangerd restarted"))
        );
        assert_eq!(s.fail_running_operations("again").expect("none left"), 0);
    }
}
