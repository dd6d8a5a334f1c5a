//! The job queue, persisted in SQLite (DIR/.zlora-serve/jobs.sqlite) so that a restart loses
//! nothing: queued jobs stay queued, and a job that was running when the server went away is
//! marked interrupted (resumable from its last checkpoint).

use std::path::Path;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Done,
    Failed,
    Stopped,
    Interrupted,
}

impl State {
    const ALL: [State; 6] = [
        State::Queued,
        State::Running,
        State::Done,
        State::Failed,
        State::Stopped,
        State::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Stopped => "stopped",
            State::Interrupted => "interrupted",
        }
    }

    fn parse(s: &str) -> Option<State> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// A job that ended before its end, which a resume continues (a training from its last
    /// checkpoint; a validation runs again).
    pub fn resumable(self) -> bool {
        matches!(self, State::Stopped | State::Interrupted | State::Failed)
    }
}

/// One job as the API shows it (`config` and `resume` are the runner's).
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub state: State,
    pub step: u64,
    pub steps: u64,
    /// The run's folder, relative to DIR.
    pub output: String,
    /// Steps (images, bytes) per second, lately.
    pub rate: Option<f64>,
    /// What a job of several stages is doing: an experiment's way and stage (`base
    /// training`, `turbo-direct validating`), a fetch's `downloading REPO`; else null.
    pub phase: Option<String>,
    pub error: Option<String>,
    #[serde(skip)]
    pub config: String,
    /// The next run continues from the newest checkpoint.
    #[serde(skip)]
    pub resume: bool,
}

pub struct Store {
    conn: Connection,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    config TEXT NOT NULL,
    output TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL,
    rate REAL,
    error TEXT,
    resume INTEGER NOT NULL DEFAULT 0,
    phase TEXT
)";

/// Columns added since the first schema, each added to an older database when it opens.
const ADDED: [(&str, &str); 1] = [("phase", "TEXT")];

const COLUMNS: &str = "id, kind, state, step, steps, output, rate, error, config, resume, phase";

impl Store {
    /// Opens (or creates) the database; a job still marked running belonged to a server that
    /// went away, and becomes interrupted.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the job database {}", path.display()))?;
        // Write-ahead logging: a progress update is a short append, not a rewrite and sync.
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("cannot set up the job database {}", path.display()))?;
        add_columns(&conn)
            .with_context(|| format!("cannot update the job database {}", path.display()))?;
        conn.execute(
            "UPDATE jobs SET state = 'interrupted' WHERE state = 'running'",
            [],
        )?;
        Ok(Store { conn })
    }

    pub fn insert(
        &self,
        kind: &str,
        config: &str,
        output: &str,
        steps: u64,
    ) -> anyhow::Result<i64> {
        self.conn.execute(
            "INSERT INTO jobs (kind, state, config, output, steps) VALUES (?1, 'queued', ?2, ?3, ?4)",
            params![kind, config, output, steps],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn list(&self) -> anyhow::Result<Vec<Job>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM jobs ORDER BY id DESC"))?;
        let jobs = stmt.query_map([], job)?.collect::<Result<_, _>>()?;
        Ok(jobs)
    }

    pub fn get(&self, id: i64) -> anyhow::Result<Option<Job>> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
        Ok(self.conn.query_row(&sql, [id], job).optional()?)
    }

    /// The oldest queued job, marked running.
    pub fn start_next(&self) -> anyhow::Result<Option<Job>> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1");
        let Some(mut next) = self.conn.query_row(&sql, [], job).optional()? else {
            return Ok(None);
        };
        self.set_state(next.id, State::Running, None)?;
        next.state = State::Running;
        Ok(Some(next))
    }

    pub fn set_state(&self, id: i64, state: State, error: Option<&str>) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE jobs SET state = ?2, error = ?3 WHERE id = ?1",
            params![id, state.as_str(), error],
        )?;
        Ok(())
    }

    pub fn progress(
        &self,
        id: i64,
        step: u64,
        steps: u64,
        rate: Option<f64>,
        phase: Option<&str>,
    ) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE jobs SET step = ?2, steps = ?3, rate = ?4, phase = ?5 WHERE id = ?1",
            params![id, step, steps, rate, phase],
        )?;
        Ok(())
    }

    /// The folder a job made, known at its end (a fetch's snapshot), relative to DIR.
    pub fn set_output(&self, id: i64, output: &str) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE jobs SET output = ?2 WHERE id = ?1",
            params![id, output],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: i64) -> anyhow::Result<()> {
        self.conn.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Queues a stopped, interrupted or failed job again, to continue from its checkpoint.
    pub fn requeue(&self, id: i64) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE jobs SET state = 'queued', error = NULL, resume = 1 WHERE id = ?1",
            [id],
        )?;
        Ok(())
    }
}

/// Adds the columns of [`ADDED`] that a database made by an earlier version lacks.
fn add_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (name, kind) in ADDED {
        let present: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('jobs') WHERE name = ?1",
            [name],
            |row| row.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {name} {kind}"))?;
        }
    }
    Ok(())
}

fn job(row: &Row) -> rusqlite::Result<Job> {
    let state: String = row.get(2)?;
    Ok(Job {
        id: row.get(0)?,
        kind: row.get(1)?,
        state: State::parse(&state).ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(
                2,
                format!("state {state:?}"),
                rusqlite::types::Type::Text,
            )
        })?,
        step: row.get(3)?,
        steps: row.get(4)?,
        output: row.get(5)?,
        rate: row.get(6)?,
        error: row.get(7)?,
        config: row.get(8)?,
        resume: row.get(9)?,
        phase: row.get(10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reopened_store_keeps_queued_jobs_and_interrupts_the_running_one() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("jobs.sqlite");
        let store = Store::open(&path).unwrap();
        let a = store.insert("train", "a", "runs/a", 10).unwrap();
        let b = store.insert("train", "b", "runs/b", 10).unwrap();
        assert_eq!(store.start_next().unwrap().unwrap().id, a);
        store
            .progress(a, 3, 10, Some(2.0), Some("base training"))
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let ja = store.get(a).unwrap().unwrap();
        assert_eq!((ja.state, ja.step), (State::Interrupted, 3));
        assert_eq!(ja.phase.as_deref(), Some("base training"));
        assert_eq!(store.get(b).unwrap().unwrap().state, State::Queued);
        store.requeue(a).unwrap();
        let again = store.start_next().unwrap().unwrap();
        assert_eq!((again.id, again.resume), (a, true));
        store.delete(b).unwrap();
        assert!(store.get(b).unwrap().is_none());
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn a_database_of_the_first_schema_gets_the_phase_column_and_keeps_its_jobs() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("jobs.sqlite");
        let first = SCHEMA.replace(",\n    phase TEXT", "");
        assert!(!first.contains("phase"), "{first}");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&first).unwrap();
        conn.execute(
            "INSERT INTO jobs (kind, state, config, output, steps) VALUES ('train', 'done', 'c', 'runs/a', 5)",
            [],
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&path).unwrap();
        let old = store.list().unwrap();
        assert_eq!((old.len(), old[0].phase.clone()), (1, None));
        store.progress(old[0].id, 5, 5, None, Some("x")).unwrap();
        drop(store);
        let again = Store::open(&path).unwrap().get(old[0].id).unwrap().unwrap();
        assert_eq!(again.phase.as_deref(), Some("x"));
    }
}
